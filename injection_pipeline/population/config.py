"""conf/population.toml -> :class:`PopulationConfig` (every number documented in the file)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from injection_pipeline.population.deflector import DeflectorModel


@dataclass(frozen=True)
class SourcePopulation:
    z: Any            # manifests.Dist
    mag_r: Any        # manifests.Dist (apparent r) or source.UVLuminosityFunction
    reff_arcsec: Any
    n: Any
    e: Any
    phi_rad: Any
    uv_slope: Any     # manifests.Dist (independent of M_UV) or source.UVSlopeColourMagnitude
    balmer_break_mag: float
    igm: str             # "madau1995" or "none" (population.igm)


@dataclass(frozen=True)
class Acceptance:
    beta_max_arcsec: float
    mu_min: float
    snr_min: float
    depth_r: float
    dz_min: float


@dataclass(frozen=True)
class PopulationConfig:
    cosmology: str
    lambda_eff_aa: tuple[tuple[str, float], ...]
    bandpass_aa: tuple[tuple[str, tuple[float, float]], ...]
    deflector: DeflectorModel
    source: SourcePopulation
    acceptance: Acceptance

    @property
    def lambdas(self) -> dict[str, float]:
        return dict(self.lambda_eff_aa)

    @property
    def bandpasses(self) -> dict[str, tuple[float, float]]:
        return dict(self.bandpass_aa)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_population(path: Path) -> PopulationConfig:
    """Read and check conf/population.toml (ConfigError naming the file and key)."""
    from injection_pipeline.manifests import ConfigError, Dist, _read_toml, _req

    raw = _read_toml(path)
    w = str(path)
    cos, bands, dfl, src, acc = (_req(raw, k, w) for k in
                                 ("cosmology", "bands", "deflector", "source", "acceptance"))
    lam = _req(bands, "lambda_eff_aa", f"{w} [bands]")
    if set(lam) != {"g", "r", "z"} or any(not float(v) > 0 for v in lam.values()):
        raise ConfigError(f"{w} [bands].lambda_eff_aa: need positive g, r, z wavelengths, got {lam}")
    bp = _req(bands, "bandpass_aa", f"{w} [bands]")
    try:
        bandpass = tuple((b, (float(bp[b][0]), float(bp[b][1]))) for b in ("g", "r", "z"))
    except (KeyError, TypeError, IndexError, ValueError):
        raise ConfigError(f"{w} [bands].bandpass_aa: need g, r, z as [lo, hi] in Angstrom, "
                          f"got {bp}") from None
    for b, (lo, hi) in bandpass:
        if not 0 < lo < float(lam[b]) < hi:
            raise ConfigError(f"{w} [bands].bandpass_aa.{b}: need 0 < lo < lambda_eff < hi, got "
                              f"[{lo}, {hi}] with lambda_eff {lam[b]}")
    fields = {f.name for f in dataclasses.fields(DeflectorModel)} - {"lambda_r_aa", "lambda_z_aa"}
    unknown, missing = set(dfl) - fields, fields - set(dfl)
    if unknown or missing:
        raise ConfigError(f"{w} [deflector]: unknown key(s) {sorted(unknown)}, missing key(s) "
                          f"{sorted(missing)}; expected {sorted(fields)}")
    model = DeflectorModel(**{k: float(v) for k, v in dfl.items()},
                           lambda_r_aa=float(lam["r"]), lambda_z_aa=float(lam["z"]))

    def dist(key):
        return Dist.from_toml(_req(src, key, f"{w} [source]"), f"{w} [source].{key}")

    def mag_model(key):
        d = _req(src, key, f"{w} [source]")
        if isinstance(d, Mapping) and d.get("dist") == "uv_lf":
            from injection_pipeline.population.source import UVLuminosityFunction
            try:
                return UVLuminosityFunction.from_toml(d, f"{w} [source].{key}")
            except (ValueError, TypeError, KeyError) as exc:
                raise ConfigError(f"{w} [source].{key}: {exc}") from None
        return dist(key)

    def uv_slope_model(key, mag_r):
        d = _req(src, key, f"{w} [source]")
        if isinstance(d, Mapping) and d.get("dist") == "colour_magnitude":
            from injection_pipeline.population.source import (UVLuminosityFunction,
                                                              UVSlopeColourMagnitude)
            try:
                model = UVSlopeColourMagnitude.from_toml(d, f"{w} [source].{key}")
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"{w} [source].{key}: {exc}") from None
            if not isinstance(mag_r, UVLuminosityFunction):
                raise ConfigError(f"{w} [source].{key}: dist = 'colour_magnitude' needs the "
                                  f"source's absolute UV magnitude, i.e. [source.mag_r] "
                                  f"dist = 'uv_lf' (got {mag_r.describe()}); use an "
                                  f"independent distribution, e.g. {{ dist = \"normal\", "
                                  f"mean = -1.6, sd = 0.43 }}")
            return model
        return dist(key)

    mag_r = mag_model("mag_r")
    source = SourcePopulation(z=dist("z"), mag_r=mag_r, reff_arcsec=dist("reff_arcsec"),
                              n=dist("n"), e=dist("e"), phi_rad=dist("phi_rad"),
                              uv_slope=uv_slope_model("uv_slope", mag_r),
                              balmer_break_mag=float(_req(src, "balmer_break_mag", f"{w} [source]")),
                              igm=str(_req(src, "igm", f"{w} [source]")))
    if source.igm not in ("madau1995", "none"):
        raise ConfigError(f"{w} [source].igm: expected 'madau1995' or 'none', got {source.igm!r}")
    if source.igm == "madau1995":
        from injection_pipeline.population.igm import LYMAN_LIMIT_AA
        zd = source.z
        z_hi = min({"uniform": zd.b, "loguniform": zd.b, "fixed": zd.a}.get(zd.kind, float("inf")),
                   zd.clip_high)
        g_lo = dict(bandpass)["g"][0]
        if not LYMAN_LIMIT_AA * (1 + z_hi) <= g_lo:
            raise ConfigError(f"{w} [source].z: its upper bound {z_hi} puts the Lyman limit "
                              f"inside the g band, which [source].igm = 'madau1995' does not "
                              f"model (need z_s <= {g_lo / LYMAN_LIMIT_AA - 1:.2f}; bound an "
                              f"unbounded distribution with clip_high)")
    acceptance = Acceptance(**{k: float(_req(acc, k, f"{w} [acceptance]")) for k in
                               ("beta_max_arcsec", "mu_min", "snr_min", "depth_r", "dz_min")})
    if not acceptance.beta_max_arcsec > 0:
        raise ConfigError(f"{w} [acceptance].beta_max_arcsec must be > 0")
    name = str(_req(cos, "name", f"{w} [cosmology]"))
    from injection_pipeline.population.cosmology import get_cosmology
    try:
        get_cosmology(name)
    except ValueError as exc:
        raise ConfigError(f"{w} [cosmology].name: {exc}") from None
    return PopulationConfig(cosmology=name,
                            lambda_eff_aa=tuple((b, float(lam[b])) for b in ("g", "r", "z")),
                            bandpass_aa=bandpass,
                            deflector=model, source=source, acceptance=acceptance)


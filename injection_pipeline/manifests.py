"""Stage 4a core: injection task manifests with every random choice frozen (no Spark here).

Pure Python / NumPy / pandas / pyarrow, so every piece is unit-testable and runs identically
on the driver, on any executor and in any partitioning.  The Spark glue is
:mod:`injection_pipeline.stages.stage_4a`; the user documentation is ``docs/manifests.md``.

Pieces
------
* configuration: :func:`load_config` reads ``conf/experiments.toml``, ``grids.toml`` and
  ``priors.toml`` into frozen dataclasses (:class:`ManifestConfig`, :class:`Experiment`,
  :class:`Grid`, :class:`Priors`, :class:`Dist`, :class:`SplitConfig`);
* sky splits: :func:`assign_brick_splits` (HEALPix cell of the brick centre -> split by a
  blake2b hash of the cell, optional guard band);
* targets: :func:`classify_targets` (per-row exclusion reasons), :func:`target_keys`;
* identity and seeds: :func:`seed64` (blake2b, never Python's ``hash()``);
* frozen draws: :func:`philox_uniforms` -- a vectorised Philox4x64-10 that reproduces
  ``numpy.random.Generator(numpy.random.Philox(key=task_seed64)).random(n)`` bit for bit;
* fan-out: :func:`expand_targets` turns ranked targets into manifest rows
  (:data:`MANIFEST_COLUMNS`, :func:`manifest_schema`).

Conventions: angles in radians from +x toward +y; offsets in arcsec on the stamp's sky plane
(x along +column, which is toward decreasing RA); magnitudes AB, fluxes in nanomaggies
(22.5 zero point); ellipticity ``e = (1 - q) / (1 + q)`` everywhere (lenstronomy's |e|).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

SPLITS: tuple[str, ...] = ("train", "val", "test")
DR10_BANDS: tuple[str, ...] = ("g", "r", "z")
GRID_AXES: tuple[str, ...] = ("theta_e_arcsec", "src_dmag", "src_reff_arcsec", "src_e", "shear")
SAMPLINGS = ("grid", "random")
PAIRINGS = ("paired", "unpaired")
BRIGHTNESS_MODES = ("relative", "absolute")
#: "independent": theta_E, SIE and source from the priors/grids, unrelated to the target;
#: "conditioned": deflector from the target galaxy, source population, acceptance
#: (injection_pipeline.population, conf/population.toml)
LENS_MODELS = ("independent", "conditioned")
DEFAULT_CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

#: catalogue columns stage 4a needs (other columns are ignored)
REQUIRED_CATALOGUE_COLUMNS: tuple[str, ...] = ("brickname", "objid", "ra", "dec", "flux_r")
#: optional catalogue columns of the conditioned lens model (DR10 names, docs/dr10.md)
LENS_CATALOGUE_COLUMNS: tuple[str, ...] = (
    "z", "z_phot_median", "sigma", "flux_z", "mw_transmission_r", "mw_transmission_z",
    "shape_r", "shape_e1", "shape_e2")

#: per-row exclusion reasons, in the order they are tested (first match wins)
EXCLUSION_REASONS: tuple[str, ...] = (
    "missing_id",                 # brickname empty/null or objid null / not a number
    "nonfinite_radec",            # ra or dec NaN / inf / null
    "radec_out_of_range",         # dec outside [-90, 90] or ra outside [0, 360)
    "brick_not_in_bricks_table",  # brickname absent from survey-bricks
    "outside_brick_bounds",       # (ra, dec) outside the brick's unique area: out of footprint
    "bad_flux_r",                 # flux_r null, non-finite or <= 0 (no lens r magnitude)
    "bad_centre_maskbits",        # maskbits at the target centre carry an excluded bit
    "guard_band",                 # brick in the split guard band
    "duplicate_target",           # same (brickname, objid) seen before: only one row is kept
)

#: tolerance on the brick-bounds test [deg] (float32 round-off of catalogue coordinates)
BRICK_BOUNDS_TOL_DEG = 1e-6
#: number of hash buckets used to rank targets in parallel (top bits of target_key)
RANK_BUCKET_BITS = 6


# =========================================================================== configuration
class ConfigError(ValueError):
    """The stage-4a configuration is invalid (message names the file and key)."""


class TaskCountExceeded(RuntimeError):
    """The planned number of tasks exceeds --max-total-tasks."""


@dataclass(frozen=True)
class Dist:
    """A 1-D distribution drawn from two uniforms (u1, u2) in [0, 1) by a fixed transform.

    kind ``fixed`` (a = value), ``uniform`` (a = low, b = high), ``loguniform`` (a = low > 0,
    b = high), ``normal`` (a = mean, b = sd; Box-Muller with u1, u2), ``lognormal``
    (a = median > 0, b = sd of the natural log; Box-Muller), ``counts`` (a = low, b = high,
    c = slope: p(m) ~ 10^(slope m) on [low, high], galaxy number counts; inverse CDF of u1).
    ``clip_low``/``clip_high`` (optional, any kind) clip the draw (documented where used).
    """

    kind: str
    a: float
    b: float = 0.0
    c: float = 0.0
    clip_low: float = -math.inf
    clip_high: float = math.inf

    KINDS = ("fixed", "uniform", "loguniform", "normal", "lognormal", "counts")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise ConfigError(f"unknown distribution {self.kind!r}")
        if self.kind in ("uniform", "loguniform", "counts") and not self.b >= self.a:
            raise ConfigError(f"{self.kind}: need high >= low, got {self.a}, {self.b}")
        if self.kind == "loguniform" and not self.a > 0:
            raise ConfigError(f"loguniform: need low > 0, got {self.a}")
        if self.kind in ("normal", "lognormal") and not self.b >= 0:
            raise ConfigError(f"{self.kind}: need sd >= 0, got {self.b}")
        if self.kind == "lognormal" and not self.a > 0:
            raise ConfigError(f"lognormal: need median > 0, got {self.a}")
        if self.kind == "counts" and not self.c != 0:
            raise ConfigError("counts: need slope != 0")
        if not self.clip_low <= self.clip_high:
            raise ConfigError(f"need clip_low <= clip_high, got {self.clip_low}, {self.clip_high}")

    @classmethod
    def from_toml(cls, d: Mapping[str, Any], where: str) -> "Dist":
        clip = {k: float(d[k]) for k in ("clip_low", "clip_high") if k in d}
        try:
            kind = d["dist"]
            if kind == "fixed":
                return cls("fixed", float(d["value"]), **clip)
            if kind in ("uniform", "loguniform"):
                return cls(kind, float(d["low"]), float(d["high"]), **clip)
            if kind == "normal":
                return cls("normal", float(d["mean"]), float(d["sd"]), **clip)
            if kind == "lognormal":
                return cls("lognormal", float(d["median"]), float(d["sd_ln"]), **clip)
            if kind == "counts":
                return cls("counts", float(d["low"]), float(d["high"]), float(d["slope"]), **clip)
        except KeyError as exc:
            raise ConfigError(f"{where}: distribution lacks key {exc.args[0]!r}: {dict(d)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        raise ConfigError(f"{where}: unknown dist {d.get('dist')!r} ({', '.join(cls.KINDS)})")

    def sample(self, u1: np.ndarray, u2: np.ndarray | None = None) -> np.ndarray:
        """Transform uniforms in [0, 1) into draws (vectorised, elementwise)."""
        u1 = np.asarray(u1, dtype=np.float64)
        if self.kind == "fixed":
            out = np.full(u1.shape, self.a)
        elif self.kind == "uniform":
            out = self.a + (self.b - self.a) * u1
        elif self.kind == "loguniform":
            la, lb = math.log(self.a), math.log(self.b)
            out = np.exp(la + (lb - la) * u1)
        elif self.kind == "counts":
            lo, hi = 10.0 ** (self.c * self.a), 10.0 ** (self.c * self.b)
            out = np.log10(lo + (hi - lo) * u1) / self.c
        else:
            # Box-Muller (1 - u1 in (0, 1] keeps the log finite)
            g = np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2.0 * np.pi * u2)
            out = self.a + self.b * g if self.kind == "normal" else self.a * np.exp(self.b * g)
        if self.clip_low > -math.inf or self.clip_high < math.inf:
            out = np.clip(out, self.clip_low, self.clip_high)
        return out

    def describe(self) -> str:
        s = {"fixed": f"fixed {self.a:g}", "uniform": f"U({self.a:g}, {self.b:g})",
             "loguniform": f"logU({self.a:g}, {self.b:g})",
             "normal": f"N({self.a:g}, {self.b:g}^2)",
             "lognormal": f"lognormal(median {self.a:g}, sd_ln {self.b:g})",
             "counts": f"10^({self.c:g} m) on [{self.a:g}, {self.b:g}]"}[self.kind]
        if self.clip_low > -math.inf or self.clip_high < math.inf:
            s += f" clipped to [{self.clip_low:g}, {self.clip_high:g}]"
        return s


@dataclass(frozen=True)
class Grid:
    """A named parameter grid: values per axis of :data:`GRID_AXES`."""

    name: str
    axes: tuple[tuple[str, tuple[float, ...]], ...]

    def values(self, axis: str) -> tuple[float, ...]:
        return dict(self.axes)[axis]

    def points(self, collapse: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """Full factorial in C order over GRID_AXES (last axis fastest).

        Axes in ``collapse`` are left out (their column is NaN).  Returns {axis: (P,) array}.
        """
        live = [a for a in GRID_AXES if a not in collapse]
        combos = list(itertools.product(*[self.values(a) for a in live]))
        out = {a: np.full(len(combos), np.nan) for a in GRID_AXES}
        for j, a in enumerate(live):
            out[a] = np.array([c[j] for c in combos], dtype=np.float64)
        return out

    def n_points(self, collapse: Sequence[str] = ()) -> int:
        return int(np.prod([len(self.values(a)) for a in GRID_AXES if a not in collapse]))

    def range(self, axis: str) -> tuple[float, float]:
        v = self.values(axis)
        return float(min(v)), float(max(v))


@dataclass(frozen=True)
class Priors:
    """Priors of the per-task draws (conf/priors.toml)."""

    offset_frac_min: float
    offset_frac_max: float
    src_n: Dist
    src_phi: Dist
    colour_gr: Dist
    colour_rz: Dist
    mag_r_abs: Dist
    lens_q: Dist
    lens_phi: Dist
    shear_phi: Dist

    def __post_init__(self):
        if not 0.0 <= self.offset_frac_min <= self.offset_frac_max:
            raise ConfigError(f"priors: need 0 <= offset_frac_min <= offset_frac_max, got "
                              f"{self.offset_frac_min}, {self.offset_frac_max}")


@dataclass(frozen=True)
class SplitConfig:
    """Sky split: HEALPix (nested) cells of brick centres -> split by a seeded hash."""

    split_seed: int
    fractions: tuple[tuple[str, float], ...]  # ordered (split, fraction), sums to 1
    nside: int
    guard_band: bool = False
    guard_nside: int = 256

    def __post_init__(self):
        names = [s for s, _ in self.fractions]
        if set(names) - set(SPLITS) or len(set(names)) != len(names):
            raise ConfigError(f"split fractions must use names from {SPLITS}, got {names}")
        tot = sum(f for _, f in self.fractions)
        if any(f < 0 for _, f in self.fractions) or abs(tot - 1.0) > 1e-9:
            raise ConfigError(f"split fractions must be >= 0 and sum to 1, got {self.fractions}")
        for n in (self.nside, self.guard_nside):
            if n < 1 or n & (n - 1):
                raise ConfigError(f"HEALPix nside must be a power of 2, got {n}")
        if self.guard_band and self.guard_nside <= self.nside:
            raise ConfigError(f"guard_nside ({self.guard_nside}) must exceed healpix_nside "
                              f"({self.nside})")


@dataclass(frozen=True)
class Experiment:
    """One stage-4a experiment (a tier at one stamp size)."""

    experiment_id: str
    tier: str
    stamp_size: int
    bands: str
    grid: Grid
    sampling: str
    replicates: int
    control_frac: float
    control_pairing: str
    brightness: str
    n_per_config: int = 0
    n_total_per_split: int = 0
    metrics_only: bool = False
    lens_model: str = "independent"

    def __post_init__(self):
        where = f"experiment {self.experiment_id}"
        if self.lens_model not in LENS_MODELS:
            raise ConfigError(f"{where}: lens_model must be one of {LENS_MODELS}")
        if self.lens_model == "conditioned" and self.sampling != "random":
            raise ConfigError(f"{where}: lens_model = conditioned needs sampling = random (its "
                              f"theta_E comes from the lens galaxy, not from a grid)")
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"{where}: sampling must be one of {SAMPLINGS}")
        if self.control_pairing not in PAIRINGS:
            raise ConfigError(f"{where}: control_pairing must be one of {PAIRINGS}")
        if self.brightness not in BRIGHTNESS_MODES:
            raise ConfigError(f"{where}: brightness must be one of {BRIGHTNESS_MODES}")
        if not 0.0 <= self.control_frac < 1.0:
            raise ConfigError(f"{where}: control_frac must be in [0, 1), got {self.control_frac}")
        if self.control_pairing == "paired" and self.control_frac > 0.5:
            raise ConfigError(f"{where}: paired controls need control_frac <= 0.5 (one control "
                              f"per injection at most), got {self.control_frac}")
        if self.stamp_size < 8 or set(self.bands) - set(DR10_BANDS) or not self.bands:
            raise ConfigError(f"{where}: bad stamp size {self.stamp_size} or bands {self.bands!r}")
        if self.sampling == "grid" and (self.n_per_config < 1 or self.replicates < 1):
            raise ConfigError(f"{where}: grid sampling needs n_per_config >= 1, replicates >= 1")
        if self.sampling == "random" and self.n_total_per_split < 0:
            raise ConfigError(f"{where}: n_total_train_per_split must be >= 0")

    @property
    def collapsed_axes(self) -> tuple[str, ...]:
        """Grid axes not used: src_dmag when the brightness is absolute."""
        return ("src_dmag",) if self.brightness == "absolute" else ()

    @property
    def brightness_mode(self) -> str:
        """What the manifest's brightness_mode column says."""
        return "population" if self.lens_model == "conditioned" else self.brightness

    @property
    def pair_prob(self) -> float:
        """Probability that an injection unit gets a paired control: f / (1 - f)."""
        return self.control_frac / (1.0 - self.control_frac)

    def n_injection_units(self, n_splits: int = len(SPLITS)) -> int:
        """Injection units planned (grid: exact; random: per split x n_splits)."""
        if self.sampling == "grid":
            return self.grid.n_points(self.collapsed_axes) * self.n_per_config * self.replicates
        return self.train_units_per_split() * n_splits

    def train_units_per_split(self) -> int:
        """Random sampling: units per split (paired: N / (1 + p) so rows ~ N; else N)."""
        if self.control_pairing == "paired":
            return int(round(self.n_total_per_split / (1.0 + self.pair_prob)))
        return self.n_total_per_split

    def n_unpaired_grid_controls(self) -> int:
        """Grid sampling, unpaired: extra control rows so that controls are control_frac."""
        return int(round(self.n_injection_units() * self.pair_prob))

    def expected_tasks(self, n_splits: int = len(SPLITS)) -> float:
        """Expected manifest rows (injections + controls)."""
        if self.sampling == "random":
            if self.control_pairing == "unpaired":
                return float(self.n_total_per_split * n_splits)
            return self.train_units_per_split() * (1.0 + self.pair_prob) * n_splits
        return self.n_injection_units() * (1.0 + self.pair_prob)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = {"name": self.grid.name, **{a: list(v) for a, v in self.grid.axes}}
        return d


@dataclass(frozen=True)
class ManifestConfig:
    """Everything stage 4a needs, loaded from conf/ (plus CLI overrides)."""

    seed: int
    experiments: tuple[Experiment, ...]
    priors: Priors
    split: SplitConfig
    max_total_tasks: int
    sources: tuple[str, ...] = ()
    #: target manifest rows per Parquet file (files hold whole bricks)
    rows_per_file: int = 500_000
    #: conf/population.toml (None when no experiment uses lens_model = conditioned)
    population: Any = None
    #: targets whose centre maskbits carry any of these DR10 bits are excluded
    exclude_centre_maskbits: tuple[str, ...] = ()

    @property
    def exclude_maskbits_mask(self) -> int:
        from lensing.maskbits import maskbits_value
        return maskbits_value(self.exclude_centre_maskbits)

    def experiment(self, experiment_id: str) -> Experiment:
        for e in self.experiments:
            if e.experiment_id == experiment_id:
                return e
        raise KeyError(f"unknown experiment {experiment_id!r}; known: "
                       f"{[e.experiment_id for e in self.experiments]}")

    def config_sha(self, exp: Experiment) -> str:
        """16-hex blake2b of everything that shapes an experiment's rows (provenance column)."""
        blob = json.dumps({"seed": self.seed, "experiment": exp.to_dict(),
                           "priors": dataclasses.asdict(self.priors),
                           "split": dataclasses.asdict(self.split),
                           "exclude_centre_maskbits": list(self.exclude_centre_maskbits),
                           **({"population": self.population.to_dict()}
                              if exp.lens_model == "conditioned" else {})},
                          sort_keys=True, default=str).encode()
        return hashlib.blake2b(blob, digest_size=8).hexdigest()


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _req(d: Mapping, key: str, where: str):
    if key not in d:
        raise ConfigError(f"{where}: missing required key {key!r}")
    return d[key]


def load_grids(path: Path) -> dict[str, Grid]:
    raw = _read_toml(path)
    grids = {}
    for name, axes in raw.items():
        vals = []
        for a in GRID_AXES:
            v = _req(axes, a, f"{path} [{name}]")
            if not isinstance(v, list) or not v:
                raise ConfigError(f"{path} [{name}].{a}: need a non-empty list of numbers")
            vals.append((a, tuple(float(x) for x in v)))
        extra = set(axes) - set(GRID_AXES)
        if extra:
            raise ConfigError(f"{path} [{name}]: unknown axes {sorted(extra)}; known {GRID_AXES}")
        grids[name] = Grid(name, tuple(vals))
        if any(x < 0 for x in grids[name].values("src_reff_arcsec")) or \
                any(not 0 <= x < 1 for x in grids[name].values("src_e")) or \
                any(x <= 0 for x in grids[name].values("theta_e_arcsec")):
            raise ConfigError(f"{path} [{name}]: need theta_e > 0, src_reff > 0, 0 <= src_e < 1")
    return grids


def load_priors(path: Path) -> Priors:
    raw = _read_toml(path)
    src, lens, shear = (_req(raw, k, str(path)) for k in ("source", "lens", "shear"))
    w = str(path)

    def dist(section, key, name):
        return Dist.from_toml(_req(section, key, f"{w} [{name}]"), f"{w} [{name}].{key}")

    return Priors(
        offset_frac_min=float(_req(src, "offset_frac_min", f"{w} [source]")),
        offset_frac_max=float(_req(src, "offset_frac_max", f"{w} [source]")),
        src_n=dist(src, "n", "source"), src_phi=dist(src, "phi_rad", "source"),
        colour_gr=dist(src, "colour_gr", "source"), colour_rz=dist(src, "colour_rz", "source"),
        mag_r_abs=dist(src, "mag_r_abs", "source"),
        lens_q=dist(lens, "q", "lens"), lens_phi=dist(lens, "phi_rad", "lens"),
        shear_phi=dist(shear, "phi_rad", "shear"))


def load_config(conf: str | os.PathLike | None = None, *, experiments: Sequence[str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> ManifestConfig:
    """Load conf/experiments.toml (+ grids.toml, priors.toml next to it).

    ``conf``: a directory holding the three files, or the path of an experiments TOML (the
    other two are looked up in its directory).  ``experiments``: ids or tier names to keep
    (default all).  ``overrides`` (None values ignored): ``seed``, ``split_seed``,
    ``healpix_nside``, ``guard_band``, ``guard_nside``, ``replicates``, ``control_pairing``,
    ``max_total_tasks``, ``n_total_train_per_split``, ``stamp_sizes``, ``bands``,
    ``control_frac.<tier>``, ``n_per_config.<tier>``, ``brightness.<tier>``.
    """
    p = Path(conf) if conf is not None else DEFAULT_CONF_DIR
    exp_path = p / "experiments.toml" if p.is_dir() else p
    base = exp_path.parent
    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    raw = _read_toml(exp_path)
    grids = load_grids(base / "grids.toml")
    priors = load_priors(base / "priors.toml")
    w = str(exp_path)
    d = dict(raw.get("defaults", {}))
    sp = dict(raw.get("split", {}))
    for k in ("seed", "replicates", "control_pairing", "max_total_tasks", "stamp_sizes", "bands"):
        if k in ov:
            d[k] = ov[k]
    for k in ("split_seed", "healpix_nside", "guard_band", "guard_nside"):
        if k in ov:
            sp[k] = ov[k]
    fr = _req(sp, "fractions", f"{w} [split]")
    split = SplitConfig(split_seed=int(_req(sp, "split_seed", f"{w} [split]")),
                        fractions=tuple((s, float(fr[s])) for s in SPLITS if s in fr),
                        nside=int(_req(sp, "healpix_nside", f"{w} [split]")),
                        guard_band=bool(sp.get("guard_band", False)),
                        guard_nside=int(sp.get("guard_nside", 256)))
    template = d.get("id_template", "{tier}_stamp{stamp}_bands{bands}_gridgrid_{grid}")
    exps = []
    tiers = _req(raw, "tiers", w)
    for tier, t in tiers.items():
        wt = f"{w} [tiers.{tier}]"
        gname = _req(t, "grid", wt)
        if gname not in grids:
            raise ConfigError(f"{wt}: grid {gname!r} not in grids.toml ({sorted(grids)})")
        n_total = int(ov.get("n_total_train_per_split", t.get("n_total_train_per_split", 0)))
        for stamp in d.get("stamp_sizes", [64, 96]):
            bands = str(t.get("bands", d.get("bands", "grz")))
            eid = template.format(tier=tier, stamp=int(stamp), bands=bands, grid=gname)
            exps.append(Experiment(
                experiment_id=eid, tier=tier, stamp_size=int(stamp), bands=bands,
                grid=grids[gname], sampling=_req(t, "sampling", wt),
                replicates=int(t.get("replicates", d.get("replicates", 2))),
                control_frac=float(ov.get(f"control_frac.{tier}", t.get("control_frac", 0.0))),
                control_pairing=str(t.get("control_pairing", d.get("control_pairing", "paired"))),
                brightness=str(ov.get(f"brightness.{tier}", t.get("brightness", "relative"))),
                n_per_config=int(ov.get(f"n_per_config.{tier}", t.get("n_per_config", 0))),
                n_total_per_split=n_total, metrics_only=bool(t.get("metrics_only", False)),
                lens_model=str(ov.get(f"lens_model.{tier}", t.get("lens_model", "independent")))))
    if experiments:
        wanted = set(experiments)
        known = {e.experiment_id for e in exps} | {e.tier for e in exps}
        unknown = wanted - known
        if unknown:
            raise ConfigError(f"unknown experiment(s) {sorted(unknown)}; known ids/tiers: "
                              f"{sorted(known)}")
        exps = [e for e in exps if e.experiment_id in wanted or e.tier in wanted]
    ids = [e.experiment_id for e in exps]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{w}: duplicate experiment ids {ids}")
    population = None
    sources = [str(exp_path), str(base / "grids.toml"), str(base / "priors.toml")]
    if any(e.lens_model == "conditioned" for e in exps):
        from injection_pipeline.population.config import load_population
        population = load_population(base / "population.toml")
        sources.append(str(base / "population.toml"))
    from lensing.maskbits import MASKBITS
    tg = dict(raw.get("targets", {}))
    excl = tuple(str(b) for b in ov.get("exclude_centre_maskbits",
                                        tg.get("exclude_centre_maskbits", ())))
    bad = [b for b in excl if b not in MASKBITS]
    if bad:
        raise ConfigError(f"{w} [targets].exclude_centre_maskbits: unknown DR10 bit(s) {bad}; "
                          f"known {sorted(MASKBITS)}")
    return ManifestConfig(seed=int(_req(d, "seed", f"{w} [defaults]")), experiments=tuple(exps),
                          priors=priors, split=split,
                          max_total_tasks=int(d.get("max_total_tasks", 50_000_000)),
                          rows_per_file=int(d.get("rows_per_file", 500_000)),
                          sources=tuple(sources), population=population,
                          exclude_centre_maskbits=excl)


def check_task_budget(cfg: ManifestConfig, max_total_tasks: int | None = None) -> dict[str, float]:
    """Expected rows per experiment; raise TaskCountExceeded above the budget."""
    limit = cfg.max_total_tasks if max_total_tasks is None else int(max_total_tasks)
    n_splits = sum(1 for _, f in cfg.split.fractions if f > 0)
    est = {e.experiment_id: e.expected_tasks(n_splits) for e in cfg.experiments}
    total = sum(est.values())
    if total > limit:
        lines = "\n".join(f"  {k}: {v:,.0f}" for k, v in est.items())
        raise TaskCountExceeded(
            f"refusing to plan {total:,.0f} tasks (> --max-total-tasks {limit:,}):\n{lines}\n"
            f"reduce n_per_config / n_total_train_per_split / replicates / the grids, select "
            f"fewer experiments, or raise --max-total-tasks if this is intended")
    return est


# =========================================================================== hashing, seeds
_U64 = (1 << 64) - 1


def blake2b_u64(text: str) -> int:
    """Unsigned 64-bit blake2b digest (little endian) of a UTF-8 string."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def u64_to_i64(u: np.ndarray | int):
    """Reinterpret unsigned 64-bit values as signed int64 (two's complement; Spark LongType)."""
    return np.asarray(u, dtype=np.uint64).view(np.int64)


def seed64(global_seed: int, identities: Iterable[str]) -> np.ndarray:
    """task_seed64 (int64 storage of an unsigned 64-bit key) for each identity string.

    ``blake2b("<global_seed>|<identity>", digest_size=8)``.  Philox key = the value read as
    unsigned (``x.astype(np.uint64)`` / ``x & 0xFFFFFFFFFFFFFFFF``).
    """
    pre = f"{int(global_seed)}|"
    return u64_to_i64(np.fromiter((blake2b_u64(pre + s) for s in identities), dtype=np.uint64))


def target_keys(brickname: Sequence[str], objid: Sequence[int]) -> np.ndarray:
    """Unsigned 64-bit hash of (brickname, objid): the target's order within a split.

    Returned as int64 with the sign bit flipped so that signed order == unsigned order.
    """
    u = np.fromiter((blake2b_u64(f"target|{b}|{int(o)}") for b, o in zip(brickname, objid)),
                    dtype=np.uint64, count=len(brickname))
    return (u ^ np.uint64(1 << 63)).view(np.int64)


def rank_bucket(target_key: np.ndarray) -> np.ndarray:
    """Bucket 0..2**RANK_BUCKET_BITS-1 = top bits of the (order-preserving) target_key."""
    u = np.asarray(target_key, dtype=np.int64).view(np.uint64) ^ np.uint64(1 << 63)
    return (u >> np.uint64(64 - RANK_BUCKET_BITS)).astype(np.int32)


# =========================================================================== Philox4x64-10
_M0, _M1 = np.uint64(0xD2E7470EE14C6C93), np.uint64(0xCA5A826395121157)
_W0, _W1 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBB67AE8584CAA73B)
_MASK32, _S32 = np.uint64(0xFFFFFFFF), np.uint64(32)


def _mulhilo(a: np.uint64, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hi, lo) 64-bit halves of the 128-bit product a * b (b an array of uint64)."""
    a_lo, a_hi = a & _MASK32, a >> _S32
    b_lo, b_hi = b & _MASK32, b >> _S32
    ll, lh, hl, hh = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    mid = (ll >> _S32) + (lh & _MASK32) + (hl & _MASK32)
    hi = hh + (lh >> _S32) + (hl >> _S32) + (mid >> _S32)
    return hi, a * b


def philox_uniforms(keys: np.ndarray, n: int) -> np.ndarray:
    """(len(keys), n) doubles in [0, 1): row i == Generator(Philox(key=keys[i])).random(n).

    Vectorised Philox4x64-10 (Salmon et al. 2011, Random123), NumPy's default 10 rounds, key
    (k, 0), counter starting at 1 (NumPy increments before each block), doubles from the top
    53 bits.  Counter-based: a task's draws depend on its key only.
    """
    k0 = np.asarray(keys).astype(np.int64).view(np.uint64).copy()
    m = k0.shape[0]
    nblocks = -(-n // 4)
    out = np.empty((m, nblocks * 4), dtype=np.uint64)
    zero = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for blk in range(nblocks):
            c0, c1, c2, c3 = np.full(m, blk + 1, dtype=np.uint64), zero, zero, zero
            ka, kb = k0.copy(), zero.copy()
            for rnd in range(10):
                if rnd:
                    ka, kb = ka + _W0, kb + _W1
                hi0, lo0 = _mulhilo(_M0, c0)
                hi1, lo1 = _mulhilo(_M1, c2)
                c0, c1, c2, c3 = hi1 ^ c1 ^ ka, lo1, hi0 ^ c3 ^ kb, lo0
            out[:, 4 * blk:4 * blk + 4] = np.stack([c0, c1, c2, c3], axis=1)
    return (out[:, :n] >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


#: column of each named draw in the per-task uniform matrix (2 uniforms per quantity)
DRAW_SLOTS: dict[str, int] = {name: 2 * i for i, name in enumerate((
    "control", "src_offset", "src_phi", "src_n", "colour_gr", "colour_rz", "mag_r_abs",
    "lens_q", "lens_phi", "shear_phi", "theta_e", "src_dmag", "src_reff", "src_e", "shear",
    # appended for the conditioned lens model (earlier slots keep their uniforms)
    "src_z", "sigma_scatter", "mass_g1", "mass_g2", "src_beta", "uv_slope"))}
N_UNIFORMS = 2 * len(DRAW_SLOTS)


# =========================================================================== sky splits
def healpix_cells(ra_deg: np.ndarray, dec_deg: np.ndarray, nside: int) -> np.ndarray:
    """NESTED HEALPix index (int64) of each (ra, dec) [deg] at ``nside``."""
    import astropy.units as u
    from astropy_healpix import lonlat_to_healpix

    ra = np.asarray(ra_deg, dtype=np.float64) % 360.0
    return np.asarray(lonlat_to_healpix(ra * u.deg, np.asarray(dec_deg, np.float64) * u.deg,
                                        nside, order="nested"), dtype=np.int64)


def cell_splits(cells: np.ndarray, split: SplitConfig) -> np.ndarray:
    """Split index (into ``[s for s, _ in split.fractions]``) of each HEALPix cell.

    u = blake2b("split|<split_seed>|<nside>|nested|<cell>") / 2**64, then the split whose
    cumulative fraction interval contains u.  Depends on the cell only: adding or removing
    rows never moves a cell.
    """
    cells = np.asarray(cells, dtype=np.int64)
    uniq, inv = np.unique(cells, return_inverse=True)
    u = np.array([blake2b_u64(f"split|{split.split_seed}|{split.nside}|nested|{int(c)}")
                  for c in uniq], dtype=np.float64) / 2.0 ** 64
    edges = np.cumsum([f for _, f in split.fractions])
    edges[-1] = np.inf
    idx = np.searchsorted(edges, u, side="right").astype(np.int8)
    return idx[inv].reshape(cells.shape)


def assign_brick_splits(brick_ra: np.ndarray, brick_dec: np.ndarray,
                        split: SplitConfig) -> dict[str, np.ndarray]:
    """Split of each brick from its CENTRE's cell (a brick never straddles two splits).

    Returns ``cell`` (nested, nside = split.nside), ``split`` (str) and ``guard`` (bool: the
    brick centre's fine cell at guard_nside has a neighbouring fine cell whose coarse cell is
    in another split; always False without a guard band).
    """
    names = np.array([s for s, _ in split.fractions])
    ra, dec = np.asarray(brick_ra, np.float64), np.asarray(brick_dec, np.float64)
    if not split.guard_band:
        cell = healpix_cells(ra, dec, split.nside)
        return {"cell": cell, "split": names[cell_splits(cell, split)],
                "guard": np.zeros(cell.shape, bool)}
    from astropy_healpix import neighbours

    fine = healpix_cells(ra, dec, split.guard_nside)
    shift = 2 * (int(math.log2(split.guard_nside)) - int(math.log2(split.nside)))
    cell = fine >> shift
    own = cell_splits(cell, split)
    nb = np.asarray(neighbours(fine, split.guard_nside, order="nested"), dtype=np.int64)  # (8, N)
    valid = nb >= 0
    nb_split = cell_splits(np.where(valid, nb, fine[None, :]) >> shift, split)
    guard = np.any(valid & (nb_split != own[None, :]), axis=0)
    return {"cell": cell, "split": names[own], "guard": guard}


# =========================================================================== targets
def check_required_columns(columns: Iterable[str], source: str,
                           required: Sequence[str] = REQUIRED_CATALOGUE_COLUMNS) -> None:
    """Raise ValueError naming the file and every missing required column."""
    have = set(columns)
    missing = [c for c in required if c not in have]
    if missing:
        raise ValueError(f"{source}: parent catalogue lacks required column(s) {missing} "
                         f"(needs {list(required)}; has {sorted(have)})")


def brick_lookup(bricks: Mapping[str, np.ndarray], split: SplitConfig):
    """pandas DataFrame indexed by brickname: bounds, centre, HEALPix cell, split, guard."""
    import pandas as pd

    s = assign_brick_splits(bricks["ra"], bricks["dec"], split)
    df = pd.DataFrame({"ra1": bricks["ra1"], "ra2": bricks["ra2"], "dec1": bricks["dec1"],
                       "dec2": bricks["dec2"], "healpix_cell": s["cell"], "split": s["split"],
                       "guard": s["guard"]}, index=pd.Index(np.asarray(bricks["brickname"]).astype(str),
                                                            name="brickname"))
    if df.index.has_duplicates:
        dup = df.index[df.index.duplicated()].unique()[:5].tolist()
        raise ValueError(f"survey-bricks table has duplicated brick names, e.g. {dup}")
    return df


def classify_targets(cat, bricks, exclude_maskbits: int = 0) -> "pd.DataFrame":
    """Per-row validity of parent-catalogue rows (vectorised; pandas in, pandas out).

    ``cat``: DataFrame with REQUIRED_CATALOGUE_COLUMNS (and optionally ``maskbits`` and
    LENS_CATALOGUE_COLUMNS); ``bricks``: :func:`brick_lookup`; ``exclude_maskbits``: DR10 bits
    that exclude a target when set in its centre ``maskbits`` (a null maskbits is never
    excluded: the stage counts those rows).  Returns brickname, objid (int64), ra, dec,
    lens_mag_r, healpix_cell, split, target_key, rank_bucket, ``maskbits`` (int64, -1 = not
    in the catalogue), the lens columns (float64, NaN = null) and ``reason`` (None for valid
    rows, else the first failing entry of EXCLUSION_REASONS except duplicate_target, which
    needs all rows: see the Spark stage).
    """
    import pandas as pd

    n = len(cat)
    brick = cat["brickname"].astype("string").str.strip().str.lower().fillna("")
    objid = pd.to_numeric(cat["objid"], errors="coerce")
    ra = pd.to_numeric(cat["ra"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    dec = pd.to_numeric(cat["dec"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    flux = pd.to_numeric(cat["flux_r"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    maskbits = (pd.to_numeric(cat["maskbits"], errors="coerce").fillna(-1).to_numpy(np.int64)
                if "maskbits" in cat.columns else np.full(n, -1, np.int64))
    info = bricks.reindex(brick.to_numpy(str))
    known = info["ra1"].notna().to_numpy()
    ra1, ra2 = info["ra1"].to_numpy(np.float64), info["ra2"].to_numpy(np.float64)
    dec1, dec2 = info["dec1"].to_numpy(np.float64), info["dec2"].to_numpy(np.float64)
    with np.errstate(invalid="ignore"):
        width = (ra2 - ra1) % 360.0
        width = np.where(width == 0, 360.0, width)
        in_ra = ((ra - ra1 + BRICK_BOUNDS_TOL_DEG) % 360.0) <= width + 2 * BRICK_BOUNDS_TOL_DEG
        in_dec = (dec >= dec1 - BRICK_BOUNDS_TOL_DEG) & (dec <= dec2 + BRICK_BOUNDS_TOL_DEG)
        conds = [
            ("missing_id", (brick == "").to_numpy(bool) | objid.isna().to_numpy()),
            ("nonfinite_radec", ~(np.isfinite(ra) & np.isfinite(dec))),
            ("radec_out_of_range", (np.abs(dec) > 90) | (ra < 0) | (ra >= 360)),
            ("brick_not_in_bricks_table", ~known),
            ("outside_brick_bounds", ~(in_ra & in_dec)),
            ("bad_flux_r", ~(np.isfinite(flux) & (flux > 0))),
            ("bad_centre_maskbits", (maskbits >= 0) & ((np.maximum(maskbits, 0)
                                                         & int(exclude_maskbits)) != 0)),
            ("guard_band", info["guard"].to_numpy(dtype=bool, na_value=False)),
        ]
    reason = np.full(n, None, dtype=object)
    assigned = np.zeros(n, bool)
    for name, bad in conds:
        hit = bad & ~assigned
        reason[hit] = name
        assigned |= hit
    with np.errstate(divide="ignore", invalid="ignore"):
        mag = np.where(flux > 0, 22.5 - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), np.nan)
    objid_i = objid.fillna(-1).to_numpy(np.int64)
    key = target_keys(brick.to_numpy(str), objid_i)
    return pd.DataFrame({
        "brickname": brick.to_numpy(str), "objid": objid_i, "ra": ra, "dec": dec,
        "lens_mag_r": mag,
        "healpix_cell": info["healpix_cell"].fillna(-1).to_numpy(np.int64),
        "split": info["split"].fillna("").to_numpy(str),
        "target_key": key, "rank_bucket": rank_bucket(key), "flux_r": flux, "maskbits": maskbits,
        **{c: (pd.to_numeric(cat[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
               if c in cat.columns else np.full(n, np.nan)) for c in LENS_CATALOGUE_COLUMNS},
        "reason": reason})


# =========================================================================== manifest schema
@dataclass(frozen=True)
class Column:
    name: str
    type: str          # pyarrow type name: string, int64, int32, int16, int8, float64, bool
    unit: str
    description: str
    distribution: str = ""
    nullable: bool = False   # True: null on control rows (no injection)
    conditioned_only: bool = False   # True: null unless lens_model = conditioned


_INJ = dict(nullable=True)
_COND = dict(nullable=True, conditioned_only=True)
MANIFEST_COLUMNS: tuple[Column, ...] = (
    Column("task_id", "string", "", "Stable unique task id: `<experiment_id>/<brickname>/<objid>/"
           "<unit>` (unit `pNNNNrR` grid point/replicate, `tNNNNNN` training pass over the "
           "split's targets, `cNNNNNN` unpaired grid control); paired controls append `/ctl`.",
           "identity"),
    Column("task_seed64", "int64", "", "Seed of all draws of the task: blake2b-64 of "
           "`<global seed>|<task_id>|<grid point values>`, stored as signed int64; the Philox "
           "key is its unsigned reading (x & 2**64-1).", "hash"),
    Column("pair_id", "string", "", "task_id of the injection row a paired control shares its "
           "cutout with (same value on both rows); null when unpaired.", "identity",
           nullable=True),
    Column("experiment_id", "string", "", "Experiment id, e.g. train_stamp64_bandsgrz_gridgrid_small.",
           "config"),
    Column("tier", "string", "", "debug | grid | train.", "config"),
    Column("sampling", "string", "", "grid (full factorial) | random (uniform over grid ranges).",
           "config"),
    Column("grid_name", "string", "", "Name of the grid in conf/grids.toml.", "config"),
    Column("stamp_size_px", "int32", "pixel", "Stamp side (0.262\"/px).", "config"),
    Column("bands", "string", "", "Bands rendered, e.g. 'grz'.", "config"),
    Column("metrics_only", "bool", "", "4c may store metrics only (no stamps).", "config"),
    Column("config_sha", "string", "", "blake2b-64 (hex) of the experiment config, priors, "
           "split config and global seed that produced the row.", "provenance"),
    Column("split", "string", "", "train | val | test, from the HEALPix cell of the brick "
           "centre (see healpix_cell).", "hash of the cell"),
    Column("healpix_cell", "int64", "", "NESTED HEALPix index (nside = healpix_nside) of the "
           "brick centre.", "geometry"),
    Column("brickname", "string", "", "DR10 brick of the target.", "catalogue"),
    Column("objid", "int64", "", "Tractor objid of the target within its brick.", "catalogue"),
    Column("ra", "float64", "deg", "Target RA (ICRS); the lens centre (exact, sub-pixel).",
           "catalogue"),
    Column("dec", "float64", "deg", "Target Dec (ICRS).", "catalogue"),
    Column("lens_mag_r", "float64", "AB mag", "Target r magnitude 22.5 - 2.5 log10(flux_r).",
           "catalogue"),
    Column("point_index", "int32", "", "Index of the grid point (C order over theta_e, "
           "src_dmag, src_reff, src_e, shear); null for random sampling and unpaired grid "
           "controls.", "grid", nullable=True),
    Column("replicate", "int32", "", "Grid: replicate 0..replicates-1; random: pass over the "
           "split's targets; unpaired grid control: control slot.", "identity"),
    Column("is_control", "int8", "", "1 = control (no injection; injection columns null), 0 = "
           "injection.", "paired: Bernoulli(f/(1-f)) control per unit; unpaired: "
           "Bernoulli(f) per row (random) / fixed count (grid)"),
    Column("brightness_mode", "string", "", "relative (src_mag_r = lens_mag_r + src_dmag) | "
           "absolute (src_mag_r from the population prior).", "config", **_INJ),
    Column("theta_e_arcsec", "float64", "arcsec", "SIE Einstein radius (lenstronomy "
           "circularised convention).", "grid value | U(grid min, max)", **_INJ),
    Column("src_dmag", "float64", "mag", "src_mag_r - lens_mag_r.", "grid value | U(grid range) "
           "(relative); derived (absolute)", **_INJ),
    Column("src_reff_arcsec", "float64", "arcsec", "Source Sersic major-axis half-light radius.",
           "grid value | U(grid range)", **_INJ),
    Column("src_e", "float64", "", "Source ellipticity e = (1-q)/(1+q).",
           "grid value | U(grid range)", **_INJ),
    Column("src_q", "float64", "", "Source axis ratio b/a = (1-src_e)/(1+src_e).", "derived",
           **_INJ),
    Column("src_phi_rad", "float64", "rad", "Source major-axis position angle from +x toward +y.",
           "priors [source].phi_rad", **_INJ),
    Column("src_n", "float64", "", "Source Sersic index.", "priors [source].n", **_INJ),
    Column("src_offset_frac", "float64", "", "|source offset| / theta_E.",
           "sqrt(U(fmin^2, fmax^2)): uniform in area in the annulus", **_INJ),
    Column("src_x_arcsec", "float64", "arcsec", "Source centre minus lens centre along +x "
           "(+column, toward decreasing RA), source plane.",
           "offset_frac * theta_E * cos(U(0, 2pi))", **_INJ),
    Column("src_y_arcsec", "float64", "arcsec", "Source centre minus lens centre along +y "
           "(+row, north).", "offset_frac * theta_E * sin(U(0, 2pi))", **_INJ),
    Column("src_colour_gr", "float64", "mag", "Source g - r.", "priors [source].colour_gr",
           **_INJ),
    Column("src_colour_rz", "float64", "mag", "Source r - z.", "priors [source].colour_rz",
           **_INJ),
    Column("src_mag_g", "float64", "AB mag", "Unlensed source g = src_mag_r + g-r.", "derived",
           **_INJ),
    Column("src_mag_r", "float64", "AB mag", "Unlensed source r magnitude.",
           "lens_mag_r + src_dmag | priors [source].mag_r_abs", **_INJ),
    Column("src_mag_z", "float64", "AB mag", "Unlensed source z = src_mag_r - (r-z).", "derived",
           **_INJ),
    Column("src_flux_g", "float64", "nanomaggy", "Unlensed source total flux in g.", "derived",
           **_INJ),
    Column("src_flux_r", "float64", "nanomaggy", "Unlensed source total flux in r.", "derived",
           **_INJ),
    Column("src_flux_z", "float64", "nanomaggy", "Unlensed source total flux in z.", "derived",
           **_INJ),
    Column("lens_q", "float64", "", "SIE mass axis ratio b/a.", "priors [lens].q", **_INJ),
    Column("lens_e", "float64", "", "SIE ellipticity e = (1-q)/(1+q) (lenstronomy |e|).",
           "derived", **_INJ),
    Column("lens_phi_rad", "float64", "rad", "SIE major-axis position angle from +x toward +y.",
           "priors [lens].phi_rad", **_INJ),
    Column("shear", "float64", "", "External shear magnitude gamma.",
           "grid value | U(grid range)", **_INJ),
    Column("shear_phi_rad", "float64", "rad", "External shear angle from +x toward +y.",
           "priors [shear].phi_rad", **_INJ),
    Column("shear_g1", "float64", "", "gamma1 = gamma cos(2 phi).", "derived", **_INJ),
    Column("shear_g2", "float64", "", "gamma2 = gamma sin(2 phi).", "derived", **_INJ),
    Column("lens_model", "string", "", "independent (theta_E, SIE and source from priors/grids) | "
           "conditioned (deflector from the target galaxy, source population, acceptance: "
           "docs/population.md).", "config"),
    Column("lens_z", "float64", "", "Lens redshift (conditioned).", "catalogue z | z_phot_median",
           **_COND),
    Column("lens_z_source", "string", "", "spectroscopic (catalogue `z`) | photometric "
           "(`z_phot_median`).", "provenance", **_COND),
    Column("lens_sigma_kms", "float64", "km/s", "Velocity dispersion giving theta_E = 4 pi "
           "(sigma/c)^2 D_ls/D_s.", "catalogue sigma | Zahid+2016 M*-sigma with log-normal "
           "scatter", **_COND),
    Column("lens_sigma_source", "string", "", "spectroscopic | zahid2016_mstar_rz | "
           "zahid2016_mstar_r (no usable flux_z) (+ _noext: no MW extinction correction).",
           "provenance", **_COND),
    Column("lens_logmstar", "float64", "log10 Msun", "Stellar mass of the lens light (Taylor+2011 "
           "from rest-frame M_i); NaN when sigma is spectroscopic and no redshift is usable.",
           "derived", **_COND),
    Column("lens_light_q", "float64", "", "Axis ratio of the lens light (Tractor shape).",
           "catalogue shape_e1/e2", **_COND),
    Column("lens_light_phi_rad", "float64", "rad", "Major-axis angle of the lens light from +x "
           "toward +y (lensing.shapes).", "catalogue shape_e1/e2", **_COND),
    Column("lens_shape_source", "string", "", "light (SIE = light ellipticity + scatter) | prior "
           "(no valid Tractor shape: priors [lens]).", "provenance", **_COND),
    Column("src_z", "float64", "", "Source redshift.", "population [source].z", **_COND),
    Column("src_uv_slope", "float64", "", "Rest-UV slope beta (f_lambda ~ lambda^beta) giving the "
           "source colours.", "population [source].uv_slope", **_COND),
    Column("accept_mu_est", "float64", "", "Acceptance magnification estimate (SIS, offset "
           "floored at r_e).", "derived", **_COND),
    Column("accept_snr_est", "float64", "", "Acceptance total-flux arc S/N estimate at the "
           "[acceptance].depth_r galaxy depth.", "derived", **_COND),
)
MANIFEST_COLUMN_NAMES: tuple[str, ...] = tuple(c.name for c in MANIFEST_COLUMNS)
#: columns fully determined by the task identity + config (for bit-identity checks: all)
FROZEN_COLUMNS = MANIFEST_COLUMN_NAMES


def manifest_schema():
    """The ONE manifest schema as a pyarrow schema (Spark's is derived from it)."""
    import pyarrow as pa

    types = {"string": pa.string(), "int64": pa.int64(), "int32": pa.int32(),
             "int16": pa.int16(), "int8": pa.int8(), "float64": pa.float64(),
             "bool": pa.bool_()}
    return pa.schema([pa.field(c.name, types[c.type], nullable=c.nullable)
                      for c in MANIFEST_COLUMNS])


#: columns of the ranked target table that expand_targets needs
TARGET_COLUMNS = ("brickname", "objid", "ra", "dec", "lens_mag_r", "healpix_cell", "split",
                  "rank_global", "rank_split", "flux_r") + LENS_CATALOGUE_COLUMNS


# =========================================================================== fan-out
def _grid_units(rank: np.ndarray, m: int, exp: Experiment):
    """Grid sampling: slots s = 0..P*n-1 go to the target of global rank s mod M."""
    n_slots = exp.grid.n_points(exp.collapsed_axes) * exp.n_per_config
    count = np.maximum(0, -(-(n_slots - rank) // m))
    tgt = np.repeat(np.arange(rank.size), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    slot = rank[tgt] + m * k
    point = slot // exp.n_per_config
    reps = exp.replicates
    tgt, point = np.repeat(tgt, reps), np.repeat(point, reps)
    rep = np.tile(np.arange(reps), count.sum())
    return tgt, point.astype(np.int64), rep.astype(np.int64)


def _slots_by_rank(rank: np.ndarray, m: np.ndarray, n_slots: np.ndarray, offset: np.ndarray):
    """Slots j in [0, n_slots) with (j + offset) mod m == rank: returns (target idx, j div m)."""
    first = (rank - offset) % np.maximum(m, 1)
    count = np.where((m > 0) & (first < n_slots), -(-(n_slots - first) // np.maximum(m, 1)), 0)
    tgt = np.repeat(np.arange(rank.size), count)
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    return tgt, first[tgt] + m[tgt] * k, k


def expand_targets(targets: Mapping[str, np.ndarray], exp: Experiment, cfg: ManifestConfig,
                   n_targets: int, n_targets_by_split: Mapping[str, int],
                   include_rejected: bool = False):
    """Manifest rows (pyarrow Table, :func:`manifest_schema`) of ``exp`` for these targets.

    ``targets``: TARGET_COLUMNS as arrays (any subset of the ranked valid targets: the rows of
    a target depend on that target, its ranks and the counts only, never on the batch).
    ``n_targets``: number of valid targets M; ``n_targets_by_split``: M per split.

    grid sampling: slot s in [0, P * n_per_config) -> target of global rank s mod M, point
    s // n_per_config; each (target, point) x replicates is an injection unit.
    random sampling: for each split, slots j in [0, U) -> target of rank-in-split j mod M_s,
    unit = pass j // M_s.  Controls: see :class:`Experiment` and docs/manifests.md.

    lens_model = conditioned: every injection unit is a candidate of
    :func:`injection_pipeline.population.candidates.draw_candidates`; rejected candidates
    (and the paired controls they would have had) are not manifest rows.  With
    ``include_rejected`` the table gets a ``reject_reason`` column (null on manifest rows)
    and the rejected candidates as extra rows (stage 4a writes them to ``rejections/``).
    Target columns missing from ``targets`` (the optional lens columns) count as null.
    """
    import pyarrow as pa

    t = {k: np.asarray(targets[k]) for k in TARGET_COLUMNS if k in targets}
    pri = cfg.priors
    rank_g, rank_s = t["rank_global"].astype(np.int64), t["rank_split"].astype(np.int64)
    split = t["split"].astype(str)
    eid = exp.experiment_id

    if exp.sampling == "grid":
        if n_targets < exp.n_per_config:
            raise ValueError(f"{eid}: only {n_targets} valid targets for n_per_config="
                             f"{exp.n_per_config} (a target would repeat within a point)")
        tgt, point, rep = _grid_units(rank_g, n_targets, exp)
        pts = exp.grid.points(exp.collapsed_axes)
        units = np.char.add(np.char.add("p", np.char.zfill(point.astype(str), 4)),
                            np.char.add("r", rep.astype(str)))
        ident_extra = [
            "|".join(repr(float(pts[a][p])) for a in GRID_AXES) for p in point.tolist()]
        prim_ctrl_forced = np.zeros(tgt.size, bool)
        point_col = point
        if exp.control_pairing == "unpaired" and exp.control_frac > 0:
            n_c = exp.n_unpaired_grid_controls()
            ct, cslot, _ = _slots_by_rank(rank_g, np.full(rank_g.size, n_targets),
                                          np.full(rank_g.size, n_c),
                                          np.full(rank_g.size, n_targets // 2))
            tgt = np.concatenate([tgt, ct])
            units = np.concatenate([units, np.char.add("c", np.char.zfill(cslot.astype(str), 6))])
            ident_extra += [""] * ct.size
            point_col = np.concatenate([point, np.full(ct.size, -1)])
            rep = np.concatenate([rep, cslot])
            prim_ctrl_forced = np.concatenate([prim_ctrl_forced, np.ones(ct.size, bool)])
    else:
        m_s = np.array([int(n_targets_by_split.get(s, 0)) for s in split], dtype=np.int64)
        n_units = np.full(rank_s.size, exp.train_units_per_split())
        tgt, _, rep = _slots_by_rank(rank_s, m_s, n_units, np.zeros(rank_s.size, np.int64))
        units = np.char.add("t", np.char.zfill(rep.astype(str), 6))
        ident_extra = [""] * tgt.size
        point_col = np.full(tgt.size, -1)
        prim_ctrl_forced = np.zeros(tgt.size, bool)

    n = tgt.size
    brick, objid = t["brickname"].astype(str)[tgt], t["objid"].astype(np.int64)[tgt]
    task_id = np.char.add(np.char.add(np.char.add(f"{eid}/", brick),
                                      np.char.add("/", objid.astype(str))),
                          np.char.add("/", units.astype(str))) if n else np.array([], str)
    seeds = seed64(cfg.seed, (f"{a}|{b}" for a, b in zip(task_id.tolist(), ident_extra)))
    u = philox_uniforms(seeds, N_UNIFORMS) if n else np.zeros((0, N_UNIFORMS))

    def draw(name: str, dist: Dist) -> np.ndarray:
        j = DRAW_SLOTS[name]
        return dist.sample(u[:, j], u[:, j + 1])

    # --- which primary rows are controls; which get a paired control
    uc = u[:, DRAW_SLOTS["control"]]
    if exp.sampling == "random" and exp.control_pairing == "unpaired":
        is_ctrl = uc < exp.control_frac
    else:
        is_ctrl = prim_ctrl_forced.copy()
    has_pair = (~is_ctrl) & (uc < exp.pair_prob) if exp.control_pairing == "paired" \
        else np.zeros(n, bool)

    # --- injection parameters (computed for all primary rows, nulled on controls)
    lens_mag = t["lens_mag_r"].astype(np.float64)[tgt]
    shear_phi = draw("shear_phi", pri.shear_phi)
    cond: dict[str, np.ndarray] = {}
    reason = np.full(n, None, dtype=object)
    if exp.lens_model == "conditioned":
        from injection_pipeline.population.candidates import draw_candidates

        cand = draw_candidates({k: np.asarray(t[k])[tgt] if k in t else None
                                for k in ("flux_r", "lens_mag_r") + LENS_CATALOGUE_COLUMNS},
                               u, DRAW_SLOTS, cfg.population, draw("lens_q", pri.lens_q),
                               draw("lens_phi", pri.lens_phi), exp.grid.range("shear"), shear_phi)
        reason = np.where(is_ctrl, None, cand.pop("reject_reason"))
        cond = {c.name: cand.pop(c.name) for c in MANIFEST_COLUMNS if c.conditioned_only}
        inj = cand
    else:
        inj = _independent_parameters(exp, pri, point_col, draw, u, lens_mag, shear_phi)
    accepted = np.array([r is None for r in reason], dtype=bool) if n else np.zeros(0, bool)
    has_pair &= accepted

    # --- assemble: accepted primary rows, their paired controls (same target, pair_id =
    # primary id), then (include_rejected) the rejected candidates
    pc = np.flatnonzero(has_pair)
    keep = np.flatnonzero(accepted)
    rej = np.flatnonzero(~accepted) if include_rejected else np.zeros(0, np.int64)
    rows = np.concatenate([keep, pc, rej]).astype(np.int64)
    ctrl = np.concatenate([is_ctrl[keep], np.ones(pc.size, bool), np.zeros(rej.size, bool)])
    pid_prim = np.where(has_pair, task_id, None).astype(object) if n else np.array([], object)
    pid = np.concatenate([pid_prim[keep], task_id[pc].astype(object),
                          np.full(rej.size, None, object)]) if n else np.array([], object)
    tid = np.concatenate([task_id[keep], np.char.add(task_id[pc], "/ctl"), task_id[rej]]) \
        if n else task_id
    seeds_all = np.concatenate([seeds[keep], seed64(cfg.seed, (f"{a}/ctl|" for a in task_id[pc].tolist())),
                                seeds[rej]])
    tr = tgt[rows]
    sha = cfg.config_sha(exp)
    m = rows.size
    cols: dict[str, Any] = {
        "task_id": tid, "task_seed64": seeds_all, "pair_id": pid,
        "experiment_id": np.full(m, eid), "tier": np.full(m, exp.tier),
        "sampling": np.full(m, exp.sampling), "grid_name": np.full(m, exp.grid.name),
        "stamp_size_px": np.full(m, exp.stamp_size, np.int32), "bands": np.full(m, exp.bands),
        "metrics_only": np.full(m, exp.metrics_only), "config_sha": np.full(m, sha),
        "split": split[tr], "healpix_cell": t["healpix_cell"].astype(np.int64)[tr],
        "brickname": t["brickname"].astype(str)[tr], "objid": t["objid"].astype(np.int64)[tr],
        "ra": t["ra"].astype(np.float64)[tr], "dec": t["dec"].astype(np.float64)[tr],
        "lens_mag_r": t["lens_mag_r"].astype(np.float64)[tr],
        "point_index": point_col[rows].astype(np.int32), "replicate": rep[rows].astype(np.int32),
        "is_control": ctrl.astype(np.int8),
        "brightness_mode": np.full(m, exp.brightness_mode),
        "lens_model": np.full(m, exp.lens_model),
    }
    for k, v in inj.items():
        cols[k] = v[rows]
    not_cond = np.full(m, exp.lens_model != "conditioned")
    for c in MANIFEST_COLUMNS:
        if c.conditioned_only:
            v = cond.get(c.name)
            cols[c.name] = v[rows] if v is not None else np.full(
                m, None if c.type == "string" else np.nan, dtype=object if c.type == "string" else np.float64)
    schema = manifest_schema()
    arrays = []
    for c in MANIFEST_COLUMNS:
        v = cols[c.name]
        mask = None
        if c.nullable and c.name not in ("pair_id",):
            mask = ctrl.copy() if c.name != "point_index" else (cols["point_index"] < 0)
            if c.conditioned_only:
                # an unknown value is null, never NaN (e.g. no light shape, no stellar mass)
                mask = mask | not_cond
                if c.type == "float64":
                    mask = mask | ~np.isfinite(np.asarray(v, np.float64))
        if c.name == "pair_id":
            arrays.append(pa.array(v.tolist() if m else [], type=pa.string()))
        elif c.type == "string" and c.nullable:
            arrays.append(pa.array(np.asarray(v, dtype=object), type=pa.string(), mask=mask))
        else:
            arrays.append(pa.array(v, type=schema.field(c.name).type, mask=mask))
    table = pa.Table.from_arrays(arrays, schema=schema)
    if include_rejected:
        reasons = np.concatenate([np.full(keep.size + pc.size, None, object), reason[rej]])
        table = table.append_column(pa.field("reject_reason", pa.string(), nullable=True),
                                    pa.array(reasons.tolist(), type=pa.string()))
    return table


def _independent_parameters(exp: Experiment, pri: Priors, point_col, draw, u, lens_mag,
                            shear_phi) -> dict[str, np.ndarray]:
    """Injection columns of the independent model (priors and grids, unrelated to the target)."""
    if exp.sampling == "grid":
        pts = exp.grid.points(exp.collapsed_axes)
        pidx = np.clip(point_col, 0, None)
        par = {a: pts[a][pidx] for a in GRID_AXES}
    else:
        par = {}
        for a, slot in (("theta_e_arcsec", "theta_e"), ("src_dmag", "src_dmag"),
                        ("src_reff_arcsec", "src_reff"), ("src_e", "src_e"), ("shear", "shear")):
            lo, hi = exp.grid.range(a)
            par[a] = draw(slot, Dist("uniform", lo, hi))
    if exp.brightness == "absolute":
        src_mag_r = draw("mag_r_abs", pri.mag_r_abs)
        dmag = src_mag_r - lens_mag
    else:
        dmag = par["src_dmag"]
        src_mag_r = lens_mag + dmag
    f2 = draw("src_offset", Dist("uniform", pri.offset_frac_min ** 2, pri.offset_frac_max ** 2))
    offset_frac = np.sqrt(f2)
    ang = 2.0 * np.pi * u[:, DRAW_SLOTS["src_offset"] + 1]
    theta_e = par["theta_e_arcsec"]
    gr, rz = draw("colour_gr", pri.colour_gr), draw("colour_rz", pri.colour_rz)
    mag = {"g": src_mag_r + gr, "r": src_mag_r, "z": src_mag_r - rz}
    lens_q = draw("lens_q", pri.lens_q)
    return {
        "theta_e_arcsec": theta_e, "src_dmag": dmag, "src_reff_arcsec": par["src_reff_arcsec"],
        "src_e": par["src_e"], "src_q": (1 - par["src_e"]) / (1 + par["src_e"]),
        "src_phi_rad": draw("src_phi", pri.src_phi), "src_n": draw("src_n", pri.src_n),
        "src_offset_frac": offset_frac,
        "src_x_arcsec": offset_frac * theta_e * np.cos(ang),
        "src_y_arcsec": offset_frac * theta_e * np.sin(ang),
        "src_colour_gr": gr, "src_colour_rz": rz,
        **{f"src_mag_{b}": mag[b] for b in DR10_BANDS},
        **{f"src_flux_{b}": np.power(10.0, -0.4 * (mag[b] - 22.5)) for b in DR10_BANDS},
        "lens_q": lens_q, "lens_e": (1 - lens_q) / (1 + lens_q),
        "lens_phi_rad": draw("lens_phi", pri.lens_phi),
        "shear": par["shear"], "shear_phi_rad": shear_phi,
        "shear_g1": par["shear"] * np.cos(2 * shear_phi),
        "shear_g2": par["shear"] * np.sin(2 * shear_phi),
    }


def validate_manifest(table) -> None:
    """Raise ValueError if a non-nullable column holds nulls or NaN, or on schema mismatch."""
    import pyarrow.compute as pc

    if table.schema.remove_metadata() != manifest_schema().remove_metadata():
        raise ValueError(f"manifest schema mismatch:\n{table.schema}\nexpected\n{manifest_schema()}")
    for c in MANIFEST_COLUMNS:
        col = table.column(c.name)
        if not c.nullable and col.null_count:
            raise ValueError(f"manifest column {c.name} has {col.null_count} null(s)")
        if c.type == "float64":
            bad = pc.sum(pc.is_nan(col.fill_null(0.0))).as_py() or 0
            if bad:
                raise ValueError(f"manifest column {c.name} has {bad} NaN value(s)")


def schema_markdown() -> str:
    """The schema table of docs/manifests.md, generated from MANIFEST_COLUMNS."""
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| column | type | unit | meaning | distribution / origin | null on controls |",
             "|---|---|---|---|---|---|"]
    for c in MANIFEST_COLUMNS:
        null = ("see meaning" if c.name in ("pair_id", "point_index")
                else "yes; also null unless conditioned" if c.conditioned_only
                else "yes" if c.nullable else "no")
        lines.append(f"| `{c.name}` | {c.type} | {c.unit or '-'} | {esc(c.description)} | "
                     f"{esc(c.distribution)} | {null} |")
    return "\n".join(lines) + "\n"

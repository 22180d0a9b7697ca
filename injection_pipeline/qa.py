"""QA of a stage-4c output: a PNG gallery, histograms and a core-leakage check (no Spark).

    python -m injection_pipeline.qa --stamps <out>/phase4c/<variant>/stamps/<experiment_id> \
        --out qa_dir [--n-gallery 12] [--aperture-px 5] [--split train] \
        [--realism no|auto|yes] [--realism-conf conf/realism.toml]

Writes into ``--out``:

* ``qa_summary.json``: counts, quantiles and the core-leakage numbers (always);
* ``gallery.png``: per row one injection: grz colour of the original (image - arc), the
  injected image and the arc alone, same asinh stretch per row, a circle of radius theta_E
  around the lens centre (the target's exact position);
* ``histograms.png``: arc_snr and arc_snr_region (log), mu_total, log10 |image1_mu| (brightest point image),
  psf_fwhm_used_g/r/z;
* with ``--realism yes`` (or ``auto`` and a train-tier experiment): the realism audit
  (:mod:`injection_pipeline.analysis.realism`, docs/realism.md) ``realism_audit.json`` and
  ``realism_audit.png``, its table printed; its outcome is in ``qa_summary.json["realism"]``.
  Failed checks are reported, not raised; an error inside the audit is printed with its
  traceback and recorded as ``status = "error"`` (the QA step itself still succeeds).

PNGs need matplotlib, which is NOT a runtime dependency of the pipeline (it is present
locally only as a dependency of lenstronomy, a test extra): without it the JSON is still
written and the command says which files it skipped.

Core-leakage check (known-pitfalls.md, "Core brightness shortcut"): within a central
aperture of radius ``aperture_px`` pixels around the stamp centre, per band, (a) the mean
aperture flux of injections and of their paired controls (same cutout, no arc) and their
difference, and (b) the fraction of the arc's flux that falls inside the aperture (mean and
quantiles over injections).  A large (b) means the classifier can learn "bright core = lens".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Optional, Sequence

import numpy as np

from injection_pipeline import stamps_io
from lensing import DR10_PIXSCALE_ARCSEC

PIXSCALE = DR10_PIXSCALE_ARCSEC


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
        return True
    except ImportError:
        return False


def central_mask(n: int, radius_px: float) -> np.ndarray:
    """Pixels whose centre lies within ``radius_px`` of the stamp centre ((n-1)/2, (n-1)/2)."""
    c = (n - 1) / 2.0
    j, i = np.mgrid[0:n, 0:n]
    return (i - c) ** 2 + (j - c) ** 2 <= radius_px ** 2


def core_leakage(st: stamps_io.Stamps, aperture_px: float = 5.0) -> dict:
    """Aperture fluxes of injections vs paired controls and the arc fraction in the core."""
    meta = st.meta.to_pandas()
    n = st.image.shape[-1]
    ap = central_mask(n, aperture_px)
    bands = st.bands
    is_ctrl = meta["is_control"].to_numpy() == 1
    flux = st.image[:, :, ap].astype(np.float64).sum(axis=-1)          # (N, B)
    arcf_ap = st.arc[:, :, ap].astype(np.float64).sum(axis=-1)
    arcf = st.arc.astype(np.float64).sum(axis=(-2, -1))
    out = {"aperture_radius_px": aperture_px, "aperture_pixels": int(ap.sum()), "bands": {}}
    # pairs: injection task_id == control pair_id
    idx = {t: i for i, t in enumerate(meta["task_id"])}
    pairs = [(idx[p], i) for i, p in enumerate(meta["pair_id"])
             if is_ctrl[i] and isinstance(p, str) and p in idx]
    inj_i = np.array([a for a, _ in pairs], int)
    ctl_i = np.array([b for _, b in pairs], int)
    all_inj = np.flatnonzero(~is_ctrl)
    for k, b in enumerate(bands):
        d = {}
        if len(pairs):
            d["paired_n"] = len(pairs)
            d["mean_aperture_flux_injections"] = float(flux[inj_i, k].mean())
            d["mean_aperture_flux_paired_controls"] = float(flux[ctl_i, k].mean())
            d["mean_difference"] = float((flux[inj_i, k] - flux[ctl_i, k]).mean())
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = arcf_ap[all_inj, k] / arcf[all_inj, k]
        frac = frac[np.isfinite(frac)]
        if frac.size:
            d["arc_fraction_in_aperture_mean"] = float(frac.mean())
            d["arc_fraction_in_aperture_quantiles"] = {
                f"p{q}": float(np.percentile(frac, q)) for q in (5, 25, 50, 75, 95)}
        out["bands"][b] = d
    return out


def _asinh_rgb(planes: np.ndarray, bands: str, scale: Optional[float] = None):
    """grz -> RGB (z red, r green, g blue) with an asinh stretch; returns (rgb, scale)."""
    order = [bands.index(b) for b in ("z", "r", "g") if b in bands]
    rgb = np.stack([planes[i] for i in order], axis=-1).astype(np.float64)
    if rgb.shape[-1] < 3:
        rgb = np.concatenate([rgb] + [rgb[..., :1]] * (3 - rgb.shape[-1]), axis=-1)
    if scale is None:
        scale = float(np.percentile(np.abs(rgb), 99.5)) or 1.0
    img = np.arcsinh(rgb / (0.1 * scale)) / np.arcsinh(10.0)
    return np.clip(img, 0, 1), scale


def gallery(st: stamps_io.Stamps, path: str, n_rows: int = 12) -> int:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = st.meta.to_pandas()
    injs = np.flatnonzero(meta["is_control"].to_numpy() == 0)
    if injs.size == 0:
        return 0
    order = injs[np.argsort(meta["theta_e_arcsec"].to_numpy()[injs], kind="stable")]
    pick = order[np.linspace(0, order.size - 1, min(n_rows, order.size)).round().astype(int)]
    n = st.image.shape[-1]
    fig, axes = plt.subplots(len(pick), 3, figsize=(7.5, 2.5 * len(pick)), squeeze=False)
    for row, i in enumerate(pick):
        r = meta.iloc[i]
        orig = st.image[i] - st.arc[i]
        _, scale = _asinh_rgb(st.image[i], st.bands)
        cx = r["lens_x_arcsec"] / PIXSCALE + (n - 1) / 2
        cy = r["lens_y_arcsec"] / PIXSCALE + (n - 1) / 2
        for col, (title, planes) in enumerate((("original", orig), ("injected", st.image[i]),
                                               ("arc only", st.arc[i]))):
            ax = axes[row, col]
            rgb, _ = _asinh_rgb(planes, st.bands, scale)
            ax.imshow(rgb, origin="lower", interpolation="nearest")
            ax.add_patch(plt.Circle((cx, cy), r["theta_e_arcsec"] / PIXSCALE, fill=False,
                                    color="cyan", lw=0.8, ls="--"))
            ax.plot([cx], [cy], "+", color="cyan", ms=5)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if col == 0:
                ax.set_ylabel(f"tE={r['theta_e_arcsec']:.2f}\" mu={r['mu_total']:.1f}\n"
                              f"snr={r['arc_snr']:.0f}" if r["arc_snr"] == r["arc_snr"] else
                              f"tE={r['theta_e_arcsec']:.2f}\" mu={r['mu_total']:.1f}",
                              fontsize=7)
    fig.suptitle("4c gallery: grz (z,r,g = R,G,B), asinh; circle = theta_E about the lens",
                 fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return len(pick)


def histograms(meta, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inj = meta[(meta["is_control"] == 0) & (meta["status"] == "ok")]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5))
    snr = inj["arc_snr"].dropna()
    snr = snr[snr > 0]
    reg = inj["arc_snr_region"].dropna() if "arc_snr_region" in inj else snr[:0]
    reg = reg[reg > 0]
    both = np.log10(np.concatenate([snr.to_numpy(float), reg.to_numpy(float)]))
    bins = np.linspace(both.min(), both.max() + 1e-9, 31) if both.size else 30  # shared
    if len(snr):
        axes[0, 0].hist(np.log10(snr), bins=bins, histtype="step", label="arc_snr (matched filter)")
    if len(reg):
        axes[0, 0].hist(np.log10(reg), bins=bins, histtype="step",
                        label="arc_snr_region (best band)")
    if len(snr) or len(reg):
        axes[0, 0].legend(fontsize=7)
    axes[0, 0].set_xlabel("log10 arc S/N")
    axes[0, 1].hist(inj["mu_total"].dropna(), bins=30)
    axes[0, 1].set_xlabel("mu_total (flux-ratio magnification)")
    # the brightest point image's |mu| (mu_point = 11/(1 - shear^2) is nearly constant)
    mp = np.abs(inj["image1_mu"].dropna()) if "image1_mu" in inj else np.array([])
    axes[1, 0].hist(np.log10(np.clip(mp, 1e-3, None)), bins=30)
    axes[1, 0].set_xlabel("log10 |image1_mu| (brightest point image of the source centre)")
    for b, c in zip("grz", ("tab:blue", "tab:green", "tab:red")):
        col = f"psf_fwhm_used_{b}"
        if col in meta:
            axes[1, 1].hist(meta[col].dropna(), bins=30, histtype="step", color=c, label=b)
    axes[1, 1].set_xlabel("psf_fwhm_used [arcsec]")
    axes[1, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


REALISM_MODES = ("no", "auto", "yes")


def realism_step(stamps_path: str, out_dir: str, st: stamps_io.Stamps, mode: str = "no",
                 conf: Optional[str] = None, splits: Optional[Sequence[str]] = None) -> dict:
    """The realism audit as part of QA: ``mode`` no | auto (train-tier rows only) | yes.

    Returns ``{"status": "skipped" | "ran" | "error", ...}`` (paths and check counts when it
    ran); prints the audit's table.  ``splits``: the QA's splits (None: the audit conf's).
    """
    if mode not in REALISM_MODES:
        raise ValueError(f"realism mode {mode!r} not in {REALISM_MODES}")
    if mode == "no":
        return {"status": "skipped", "reason": "realism audit not requested (--realism no)"}
    tiers = set(st.meta.column("tier").to_pylist()) if "tier" in st.meta.column_names else set()
    if mode == "auto" and "train" not in tiers:
        return {"status": "skipped",
                "reason": f"tier(s) {sorted(map(str, tiers))}: the audit runs on train-tier "
                          f"experiments (--realism auto)"}
    from injection_pipeline.analysis import realism

    try:
        rep = realism.audit_stamps(stamps_path, out_dir, conf, splits=splits, stamps=st,
                                   png=_have_matplotlib())
    except Exception as exc:   # reported loudly, recorded; the QA outputs are still written
        traceback.print_exc()
        print(f"realism audit of {stamps_path} FAILED with an error: {type(exc).__name__}: "
              f"{exc}", file=sys.stderr)
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    print(realism.format_table(rep), flush=True)
    print(f"realism audit JSON: {rep['json']}\nrealism audit PNG:  {rep['png']}", flush=True)
    return {"status": "ran", "json": rep["json"], "png": rep["png"], **rep["summary"]}


def run_qa(stamps_path: str, out_dir: str, n_gallery: int = 12, aperture_px: float = 5.0,
           splits: Optional[Sequence[str]] = None, realism: str = "no",
           realism_conf: Optional[str] = None) -> dict:
    """Gallery, histograms, core leakage (and the realism audit, see :func:`realism_step`)."""
    if realism not in REALISM_MODES:
        raise ValueError(f"realism mode {realism!r} not in {REALISM_MODES}")
    os.makedirs(out_dir, exist_ok=True)
    st = stamps_io.load_stamps(stamps_path, columns=("image", "arc"), splits=splits)
    if len(st) == 0:
        raise SystemExit(f"{stamps_path}: no ok stamps")
    meta = st.meta.to_pandas()
    inj = meta[meta["is_control"] == 0]
    q = lambda s: {f"p{p}": float(np.percentile(s, p)) for p in (5, 25, 50, 75, 95)} \
        if len(s) else {}
    summary = {
        "stamps_path": stamps_path, "rows_ok": int(len(meta)),
        "injections": int(len(inj)), "controls": int((meta["is_control"] == 1).sum()),
        "arc_snr": q(inj["arc_snr"].dropna()),
        "arc_snr_region": q(inj["arc_snr_region"].dropna()) if "arc_snr_region" in inj else {},
        "mu_total": q(inj["mu_total"].dropna()),
        "psf_fwhm_used": {b: q(meta[f"psf_fwhm_used_{b}"].dropna()) for b in "grz"},
        "psf_source_counts": {b: meta[f"psf_source_{b}"].value_counts().to_dict()
                              for b in "grz"},
        "core_leakage": core_leakage(st, aperture_px), "pngs": [], "pngs_skipped": [],
    }
    if _have_matplotlib():
        gp, hp = os.path.join(out_dir, "gallery.png"), os.path.join(out_dir, "histograms.png")
        gallery(st, gp, n_gallery)
        histograms(meta, hp)
        summary["pngs"] = [gp, hp]
    else:
        summary["pngs_skipped"] = ["gallery.png", "histograms.png"]
        print("matplotlib is not installed: PNGs skipped (pip install matplotlib); "
              "qa_summary.json written", file=sys.stderr)
    summary["realism"] = realism_step(stamps_path, out_dir, st, realism, realism_conf, splits)
    with open(os.path.join(out_dir, "qa_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stamps", required=True, help="<out>/phase4c/<variant>/stamps/<exp>")
    ap.add_argument("--out", required=True, help="output directory for PNGs and JSON")
    ap.add_argument("--n-gallery", type=int, default=12)
    ap.add_argument("--aperture-px", type=float, default=5.0)
    ap.add_argument("--split", action="append", default=None)
    ap.add_argument("--realism", choices=REALISM_MODES, default="no",
                    help="realism audit (docs/realism.md): no, auto (train-tier experiments), "
                         "yes")
    ap.add_argument("--realism-conf", default=None,
                    help="realism audit settings (default conf/realism.toml)")
    a = ap.parse_args(argv)
    s = run_qa(a.stamps, a.out, a.n_gallery, a.aperture_px, a.split, realism=a.realism,
               realism_conf=a.realism_conf)
    print(json.dumps({k: s[k] for k in ("rows_ok", "injections", "controls", "pngs",
                                        "core_leakage", "realism")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""PSF kernels and a shift-free FFT convolution (pure NumPy).

Kernels are sampled at pixel centres on an odd-sized square grid centred on the middle pixel,
normalised to unit sum.  The DR10 psfsize maps give the PSF's Gaussian-equivalent FWHM as
measured on the pixelised images (pixel response included); the rendered arc is already
pixel-integrated (sub-pixel averaging), so sampling the kernel at pixel centres does not
count the pixel response twice.

Kernel size rule (half-width ``h`` pixels, kernel side ``2h + 1``):

* Gaussian: ``h = ceil(5 sigma / pixscale)``: the truncated wing holds < 4e-6 of the flux.
* Moffat ``(1 + (r/alpha)^2)^-beta``: ``h = ceil(R / pixscale)`` with R the radius enclosing
  ``1 - wing_tol`` of the untruncated profile (``wing_tol`` default 1e-3):
  ``R = alpha sqrt(wing_tol^(1/(1-beta)) - 1)``; for beta = 3.5 that is ~4.1 FWHM.
  (An earlier pipeline's 6 x FWHM rule made kernels larger than the 64-px stamp and crashed;
  here any kernel size is handled by padding.)

The truncated wing is restored by the unit-sum normalisation (flux is conserved, the wing
light is redistributed inside the kernel).
"""
from __future__ import annotations

import math

import numpy as np

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


def _check_fwhm(fwhm, pixscale):
    if not (math.isfinite(fwhm) and fwhm > 0):
        raise ValueError(f"PSF FWHM must be a positive finite number of arcsec, got {fwhm!r} "
                         "(a psfsize of 0 or NaN means 'no data': resolve a fallback first)")
    if not (math.isfinite(pixscale) and pixscale > 0):
        raise ValueError(f"pixscale must be positive arcsec/pixel, got {pixscale!r}")


def _offsets(half_width):
    return np.arange(-half_width, half_width + 1, dtype=np.float64)


def gaussian_kernel(fwhm, pixscale=0.262):
    """Unit-sum circular Gaussian kernel of FWHM ``fwhm`` [arcsec] on ``pixscale`` pixels."""
    _check_fwhm(fwhm, pixscale)
    sigma_pix = fwhm / FWHM_PER_SIGMA / pixscale
    half = max(1, int(math.ceil(5.0 * sigma_pix)))
    g = np.exp(-0.5 * (_offsets(half) / sigma_pix) ** 2)
    kernel = np.outer(g, g)
    return kernel / kernel.sum()


def moffat_alpha(fwhm, beta):
    """Moffat core radius alpha (same units as fwhm): FWHM = 2 alpha sqrt(2^(1/beta) - 1)."""
    return fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))


def moffat_kernel(fwhm, beta=3.5, pixscale=0.262, wing_tol=1e-3):
    """Unit-sum circular Moffat kernel with FWHM ``fwhm`` [arcsec] and index ``beta`` (> 1)."""
    _check_fwhm(fwhm, pixscale)
    if not (beta > 1 and math.isfinite(beta)):
        raise ValueError(f"Moffat beta must be > 1 (finite flux), got {beta!r}")
    if not (0 < wing_tol < 1):
        raise ValueError(f"wing_tol must be in (0, 1), got {wing_tol!r}")
    alpha_pix = moffat_alpha(fwhm, beta) / pixscale
    radius_pix = alpha_pix * math.sqrt(wing_tol ** (1.0 / (1.0 - beta)) - 1.0)
    half = max(1, int(math.ceil(radius_pix)))
    d = _offsets(half)
    r2 = d[:, None] ** 2 + d[None, :] ** 2
    kernel = (1.0 + r2 / alpha_pix**2) ** (-beta)
    return kernel / kernel.sum()


def psf_kernel(model, fwhm, pixscale=0.262, moffat_beta=3.5):
    """Kernel by model name: ``"gaussian"`` or ``"moffat"``."""
    if model == "gaussian":
        return gaussian_kernel(fwhm, pixscale)
    if model == "moffat":
        return moffat_kernel(fwhm, moffat_beta, pixscale)
    raise ValueError(f"unknown PSF model {model!r}; expected 'gaussian' or 'moffat'")


def fft_size(n):
    """Smallest 2^a 3^b 5^c >= n (fast FFT length)."""
    best = 1 << max(0, int(n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def convolve_fft(image, kernel):
    """'Same'-size linear convolution of ``image`` (..., H, W) with an odd-sized ``kernel``.

    Both are zero-padded to a full linear-convolution size (no wrap-around), multiplied in
    Fourier space and the full result is cropped at offset ``(k - 1) / 2``: an impulse at
    pixel (i, j) comes out centred on (i, j) for any kernel size, including kernels larger
    than the image.  Light that the PSF carries beyond the image edge is lost, as on a
    detector; pad the input beforehand when that light matters (render_lensed_arc does).
    """
    image = np.asarray(image, dtype=np.float64)
    kernel = np.asarray(kernel, dtype=np.float64)
    kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel must be odd-sized to have a centre pixel, got {kernel.shape}")
    h, w = image.shape[-2:]
    shape = (fft_size(h + kh - 1), fft_size(w + kw - 1))
    full = np.fft.irfft2(np.fft.rfft2(image, s=shape) * np.fft.rfft2(kernel, s=shape), s=shape)
    oy, ox = (kh - 1) // 2, (kw - 1) // 2
    return full[..., oy:oy + h, ox:ox + w]

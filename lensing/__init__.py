"""Pure-NumPy strong-lensing physics for injecting lensed sources into DR10 coadds.

No Spark, no I/O, NumPy only (shipped to executors).  Units: arcsec, radians (from +x toward
+y), nanomaggies (AB zero point 22.5), 0.262 arcsec/pixel by default.  See docs/conventions.md.
"""
from .photometry import AB_ZP_NMGY, DR10_PIXSCALE_ARCSEC, mag_to_nMgy, nMgy_to_mag
from .sersic import (sersic_bn, sersic_bn_ciotti_bertin, sersic_unit_total_flux,
                     sersic_profile_Ie1, sersic_elliptical_radius, regularized_lower_gamma)
from .mass_profiles import (LensModel, deflection_sis, hessian_sis, convergence_sis,
                            deflection_sie, hessian_sie, convergence_sie, deflection_shear,
                            hessian_shear, shear_components, point_magnification)
from .psf import (gaussian_kernel, moffat_kernel, moffat_alpha, psf_kernel, convolve_fft, fft_size,
                  PSF_MATCH, PsfKernel, build_psf, gaussian_nea, gaussian_kernel_nea, moffat_nea,
                  kernel_nea, psfsize_from_nea, moffat_alpha_nea_continuous, moffat_nea_alpha,
                  moffat_kernel_alpha, moffat_kernel_nea, gaussian_fine_matrix, moffat_fine_kernel)
from .sources import SersicSource, ClumpySource, Clump, SourceModel, SourceComponent
from .render import (LensedArc, render_lensed_arc, render_unit_lensed_source, render_unit_components,
                     pixel_centres)
from .maskbits import (MASKBITS, MASKBITS_BAD, MASKBITS_BAD_NAMES, MASKBITS_WISE,
                       MASKBITS_WISE_NAMES, maskbits_value, maskbit_names, has_any_bit)
from .metrics import (BandMetric, STAMP_METRIC_KEYS, good_pixel_mask, bad_pixel_frac,
                      wise_brightmask_frac, arc_snr, arc_peak_snr, arc_aperture_snr,
                      stamp_metrics, RegionMetric, ARC_REGION_K_DEFAULT, arc_region_snr)

__all__ = [name for name in dir() if not name.startswith("_")]

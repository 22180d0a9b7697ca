"""Lens and source populations of stage 4a (the ``conditioned`` lens model).

Split as SLSim splits its populations (a deflector tied to a real galaxy, a source drawn from
a population, and an acceptance that decides which pairs make a findable lens):

* :mod:`.cosmology`: angular-diameter distances (astropy.cosmology, tabulated for speed) and
  the SIS Einstein radius theta_E = 4 pi (sigma/c)^2 D_ls/D_s;
* :mod:`.deflector`: lens redshift, velocity dispersion (spectroscopic, or from the stellar
  mass of the lens light with the Taylor et al. 2011 and Zahid et al. 2016 relations), SIE
  axis ratio and orientation from the Tractor shape of the light;
* :mod:`.source`: redshift, size, Sersic index, magnitude and colours of z_s ~ 1-3
  star-forming sources;
* :mod:`.acceptance`: magnification and arc S/N floors applied by deterministic rejection;
* :mod:`.config`: ``conf/population.toml`` (every number with its source).

Everything is vectorised NumPy over arrays of candidates; the draws come from the task's
frozen uniforms (``manifests.DRAW_SLOTS``), so a candidate's fate depends on its seed only.
docs/population.md states the model and its references.
"""

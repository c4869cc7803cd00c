"""Spatial normalisation: templates (``template``), cached affine registration (``registration``),
transforms on the template grid (``normalise``), study templates from unlabeled scans
(``study_template``). Everything public is exported by :mod:`petmonai.transforms`."""

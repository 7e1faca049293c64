"""Datasets and loaders, calibration sets, and PTQ calibrators."""

if not __name__.startswith("repq."):  # one module, one name: `calibration` alone would load a second copy
    raise ImportError(f"import repq.calibration, not {__name__}: repq installs one namespace, `repq`")

"""QDQ ONNX export, the engine table and its engines, timing and the report."""

if not __name__.startswith("repq."):  # one module, one name: `engines` alone would load a second copy
    raise ImportError(f"import repq.engines, not {__name__}: repq installs one namespace, `repq`")

"""Quantizers (LSQ), RepQ layers and fine-tuning, and the adapter to NVIDIA's toolkit (ModelOpt)."""

if not __name__.startswith("repq."):  # one module, one name: `quant` alone would load a second copy
    raise ImportError(f"import repq.quant, not {__name__}: repq installs one namespace, `repq`")

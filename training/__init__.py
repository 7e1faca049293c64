"""The one training loop (FP training, toolkit QAT and RepQ fine-tuning), its resumable state and FP training."""

if not __name__.startswith("repq."):  # one module, one name: `training` alone would load a second copy
    raise ImportError(f"import repq.training, not {__name__}: repq installs one namespace, `repq`")

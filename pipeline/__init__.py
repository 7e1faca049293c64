"""Recipe, run folder, stages and the `repq` command line."""

if not __name__.startswith("repq."):  # one module, one name: `pipeline` alone would load a second copy
    raise ImportError(f"import repq.pipeline, not {__name__}: repq installs one namespace, `repq`")

"""Recipe, run folder, stages and the `repq` command line."""

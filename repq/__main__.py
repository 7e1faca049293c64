"""`python -m repq ...` is the `repq` command: `torchrun --nproc_per_node N -m repq train ...` runs it on N ranks."""

import sys

from repq.pipeline.cli import main

sys.exit(main())

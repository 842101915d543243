"""`python -m totobench` (also what `torchrun -m totobench run ...` starts)."""

import sys

from totobench.cli import entry

sys.exit(entry())

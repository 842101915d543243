"""Launching totobench under torchrun from the tests."""

from __future__ import annotations

import os
import subprocess
import sys


def torchrun_two(args, home, out, timeout: int = 280) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node=2 -m totobench ARGS --out OUT` with its own TOTOBENCH_HOME; must exit 0."""
    env = {**os.environ, "TOTOBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "totobench", *args, "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    return proc

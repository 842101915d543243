"""`totobench run`: evaluate a model on tasks at every requested layer (see totobench.runner)."""

from __future__ import annotations

from totobench.runner import run_command


def cli_run(args) -> int:
    return run_command(args)

"""`totobench data synth | check | robot-demos`: write the data world, check a dataset root,
record MetaWorld expert demonstrations."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from totobench.data.check import check_root, print_report
from totobench.data.synth import PLANS, synth, tree_size
from totobench.errors import ConfigError
from totobench.progress import progress_bar


def cli_synth(args) -> int:
    """`totobench data synth --out DIR [--seed N] [--size tiny|default]`: the data world, then its size."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: is a file; expected a folder to write the data world into")
    start = time.perf_counter()
    try:
        synth(out, seed=args.seed, size=args.size)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write the data world ({err.strerror or err})") from None
    n_files, n_bytes = tree_size(out)
    print(f"data world (size {args.size}, seed {args.seed}) in {out}: {n_files} files, "
          f"{n_bytes / 1e6:.1f} MB, {time.perf_counter() - start:.1f} s")
    for root in PLANS:
        print(f"  {out / root}")
    return 0


def cli_check(args) -> int:
    """`totobench data check --format FORMAT ROOT`: exit 0 when the root is usable, else 1."""
    console = Console()
    report = check_root(args.format, args.root, progress=console.is_terminal)
    print_report(report, console)
    return 0 if report.usable else 1


def cli_robot_demos(args) -> int:
    """`totobench data robot-demos`: record (or find cached) demonstrations for the robot task's
    environments (or --env ...), with the episode settings of tasks/robot.yaml."""
    # here, not at the top: importing robot sets up offscreen GL and loads triton
    from totobench.data.robot import load_or_record_demos, metaworld_name, short_name
    from totobench.tasks.config import load_task_config

    console = Console()
    ds = load_task_config("robot").dataset
    names = args.env or list(ds.env)
    root = Path(args.out).expanduser() if args.out else None
    settings = dict(episode_length=ds.episode_length, action_repeat=ds.action_repeat, camera=ds.camera)
    with progress_bar(console) as progress:
        for name in names:
            metaworld_name(name)
            job = progress.add_task(f"{short_name(name)} demos", total=args.demos, rate="")
            data, path = load_or_record_demos(root, name, args.demos, args.resolution, args.seed,
                                              on_episode=lambda: progress.update(job, advance=1),
                                              **settings)
            progress.update(job, completed=args.demos)
            console.print(f"{short_name(name)}: {len(data['seeds'])} demos, "
                          f"{int(data['length'].sum())} steps, mean first success at decision "
                          f"{data['success_step'].mean():.1f} -> {path}")
    return 0

"""Progress shows on a terminal as a bar and in a log file as plain lines while the work runs."""

import io

from rich.console import Console
from rich.progress import Progress

from totobench.progress import LineProgress, progress_bar


def test_a_log_gets_lines_while_the_work_runs_and_one_at_the_end():
    out = io.StringIO()
    now = [0.0]
    with LineProgress(Console(file=out, force_terminal=False, width=200), "{task.fields[rate]}", every=10,
                      clock=lambda: now[0]) as progress:
        job = progress.add_task("imagenet train", total=100, rate="")
        for step in range(100):
            now[0] += 0.5                       # 50 s of work in all
            progress.update(job, advance=1, rate=f"{step} items/s")
    lines = out.getvalue().splitlines()
    assert len(lines) == 5                      # at 10, 20, 30, 40 s and when done
    assert lines[0] == "imagenet train: 20/100 (20%) 19 items/s 10 s eta 40 s"
    assert lines[-1].startswith("imagenet train: 100/100 (100%) 99 items/s 50 s")


def test_a_terminal_gets_a_bar_and_a_file_gets_lines():
    assert isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=False)), LineProgress)
    assert isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=False), disable=True), Progress)

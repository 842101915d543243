"""The one progress display of every long loop (extraction, decoding, pre-training, rollouts).

On a terminal it is a rich progress bar. When the output goes to a file (a log, CI, nohup, a
cluster job) a bar would only appear when done, so a plain line per task is printed instead every
`LOG_EVERY_S` seconds and when the task completes: the log shows the run moving.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

from rich import get_console
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

LOG_EVERY_S = 10.0


def progress_bar(console: Console | None = None, *, fields: str = "{task.fields[rate]}",
                 transient: bool = False, disable: bool = False):
    """A progress display with rich's Progress interface (add_task, update, advance; a context
    manager): description, done/total, `fields` (a format string over the task's fields; add_task
    must pass them, e.g. rate=""), elapsed time and ETA. A bar on a terminal, log lines otherwise."""
    target = console or get_console()
    if not disable and not target.is_terminal:
        return LineProgress(target, fields)
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(fields), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=transient, disable=disable)


class _LineTask(SimpleNamespace):
    """One task of a LineProgress (the attributes of rich's Task that callers read)."""

    @property
    def speed(self) -> float | None:
        elapsed = self.clock() - self.start
        return self.completed / elapsed if elapsed > 0 and self.completed else None


class LineProgress:
    """Progress as plain lines: `<description>: <done>/<total> (<pct>%) <fields> <elapsed> eta <eta>`,
    at most one per task every `every` seconds, and one when a task completes."""

    def __init__(self, console: Console, fields: str = "", every: float = LOG_EVERY_S, clock=time.monotonic):
        self.console, self.fields, self.every, self.clock = console, fields, every, clock
        self.tasks: list[_LineTask] = []

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        for task_id, task in enumerate(self.tasks):
            if not task.reported_done and task.completed:
                self._print(task_id)

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields) -> int:
        now = self.clock()
        self.tasks.append(_LineTask(description=description, total=total, completed=completed, fields=fields,
                                    start=now, last=now, reported_done=False, clock=self.clock))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, advance: float | None = None, completed: float | None = None,
               total: float | None = None, description: str | None = None, **fields) -> None:
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        task.fields.update(fields)
        done = task.total is not None and task.completed >= task.total
        if (done and not task.reported_done) or self.clock() - task.last >= self.every:
            self._print(task_id)
            task.reported_done = done

    def _print(self, task_id: int) -> None:
        task = self.tasks[task_id]
        now = self.clock()
        task.last = now
        elapsed, done, total = now - task.start, task.completed, task.total
        parts = [f"{task.description}: {done:g}" + (f"/{total:g} ({100 * done / total:.0f}%)" if total else "")]
        try:
            extra = self.fields.format(task=task).strip()
        except (KeyError, ValueError, TypeError):
            extra = ""
        if extra:
            parts.append(extra)
        parts.append(f"{elapsed:.0f} s")
        if total and 0 < done < total:
            parts.append(f"eta {elapsed * (total - done) / done:.0f} s")
        self.console.print(" ".join(parts), markup=False, highlight=False, soft_wrap=True)

"""The one progress display of every long loop (extraction, decoding, pre-training, rollouts)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


def progress_bar(console: Console | None = None, *, fields: str = "{task.fields[rate]}",
                 transient: bool = False, disable: bool = False) -> Progress:
    """A rich Progress: description, bar, done/total, `fields` (a format string over the task's
    fields; add_task must pass them, e.g. rate=""), elapsed time and ETA."""
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn(fields), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, transient=transient, disable=disable)

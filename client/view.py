"""How the CLI shows the daemon's answers: tables and live progress, drawn with rich.

Values from the network go through `shown` (control characters escaped), and nothing here
reads rich markup, emoji codes or highlights: a file named `[red]x` prints as `[red]x`. When
the output is not a terminal rich draws no colours and no animation (a live display prints
its last state once), and lines are never wrapped, so scripts can read a row as one line.
"""

from __future__ import annotations

import sys
import unicodedata
from collections.abc import Iterable, Sequence

from rich.console import Console, RenderableType
from rich.padding import Padding
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.progress_bar import ProgressBar
from rich.table import Column, Table
from rich.text import Text

NOT_A_TERMINAL_WIDTH = 10_000  # wide enough that no row of a table wraps
BAR_WIDTH = 20


def shown(value: object) -> str:
    """A value from the network, safe to print: control characters (ANSI escapes, \r, bidi
    overrides...) appear escaped (\x1b) instead of acting on the terminal."""
    return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c) in ("Cc", "Cf")
                   else c for c in str(value))


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr) that takes every string literally."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, markup=False, emoji=False, highlight=False,
                   width=None if stream.isatty() else NOT_A_TERMINAL_WIDTH)


def right(header: str) -> Column:
    """A column of numbers."""
    return Column(header, justify="right")


def table(columns: Sequence[str | Column], rows: Iterable[Sequence[RenderableType]]) -> Table:
    """A borderless table; string cells are plain text, never markup."""
    t = Table(*columns, box=None, pad_edge=False, header_style="bold")
    for row in rows:
        t.add_row(*(Text(cell) if isinstance(cell, str) else cell for cell in row))
    return t


def indented(renderable: RenderableType) -> Padding:
    return Padding.indent(renderable, 2)


def bar(done: int, size: int) -> ProgressBar:
    """How much of `size` bytes is there, as a bar (a zero-size file is complete)."""
    return ProgressBar(total=size or 1, completed=done if size else 1, width=BAR_WIDTH)


def percent(done: int, size: int) -> str:
    return f"{100 * done / size if size else 100:.1f}%"


def transfer_progress(console: Console, disable: bool = False) -> Progress:
    """Live rows of bytes: name, bar, bytes done/total, rate, time left and a state; each
    task's description and `state` field are shown literally. `disable`: draw nothing."""
    return Progress(TextColumn("{task.description}", markup=False),
                    BarColumn(bar_width=BAR_WIDTH), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[state]}", markup=False),
                    console=console, disable=disable)

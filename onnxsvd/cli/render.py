"""What every command shows: the consoles, one progress-bar factory, and the formatters of table cells."""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

__all__ = [
    "NARROW",
    "add_name_column",
    "human_bytes",
    "human_flops",
    "number",
    "general",
    "progress_bar",
    "stderr",
    "stdout",
]

#: Tables go to stdout; a pipe or a file gets a fixed width so rows are not cut to the terminal's.
stdout = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
#: Below this console width, tables leave out or merge low-value columns (and say so) to keep rows whole.
NARROW = 100
#: Progress bars and notes go to stderr; bars are off when stderr is not a terminal.
stderr = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None = None, **fields: str) -> Iterator[Callable[..., None]]:
    """A transient rich progress bar on stderr; yields ``update(done, total, item)``.

    Extra ``fields`` (name → initial text) are shown after the bar and can be passed to ``update`` as
    keywords (fine-tuning shows its losses that way).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(f"{name} {{task.fields[{name}]}}") for name in fields]
    columns += [TimeElapsedColumn(), TextColumn("{task.fields[item]}")]
    bar = Progress(*columns, console=stderr, transient=True, disable=not stderr.is_terminal)
    task = bar.add_task(description, total=total, item="", **fields)

    def update(done: int, total: int | None, item: str = "", **values: str) -> None:
        bar.update(task, completed=done, total=total or None, item=item, **values)

    with bar:
        yield update


def number(value: float | None, digits: int = 4) -> str:
    """A fixed-point cell; ``-`` for missing, and NaN/∞ spelled out."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "∞" if value > 0 else "-∞"
    return f"{value:.{digits}f}"


def general(value: float | None) -> str:
    """Three significant digits; ``-`` for missing."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return number(value)
    return f"{value:.3g}"


def human_bytes(count: int | None) -> str:
    """``1536`` → ``"1.5 KB"``; ``None`` → ``"-"`` (:func:`onnxsvd.io.human_bytes`, as the reports write it)."""
    from onnxsvd.io import human_bytes as io_human_bytes  # io loads numpy and onnx: not at --help

    return io_human_bytes(count)


def human_flops(count: int | None) -> str:
    """``1.2e9`` → ``"1.2 GFLOP"``; ``None`` → ``"-"``."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("", "K", "M", "G", "T"):
        if value < 1000 or unit == "T":
            return f"{value:.3g} {unit}FLOP" if unit else f"{int(value)} FLOP"
        value /= 1000
    return f"{value:.3g} TFLOP"


def add_name_column(table: Table, header: str, names: list[str], console: Console) -> None:
    """A column of node names that folds long names onto more lines instead of cutting them to ``/blocks…``.

    Its width is fixed (the longest name, at most a quarter of the console and at least 16), so that the
    other columns shrink first and rows stay distinct on a narrow terminal.
    """
    longest = max((len(name) for name in names), default=len(header))
    table.add_column(header, overflow="fold", width=max(len(header), min(longest, max(16, console.width // 4))))

"""Options several commands share: one comma-list type, the site selection, the rank floors, and the
rank policy."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from onnxsvd.config import MIN_SHARE, RankPolicy
from onnxsvd.errors import UsageError

__all__ = ["CommaList", "PROVIDER_LIST", "RANK", "RankValue", "floor_options", "rank_policy", "selection_options"]


class CommaList(click.ParamType):
    """A comma-separated option (``--providers cpu,cuda``, ``--ratios 0.3,0.5``) as a tuple of ``kind``.

    Empty items are dropped; an empty list, or an item that does not convert, is a usage error that shows
    an example.
    """

    name = "list"

    def __init__(self, kind: Callable[[str], Any] = str, example: str = "a,b", lower: bool = False) -> None:
        self.kind = kind
        self.example = example
        self.lower = lower

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[Any, ...]:
        if isinstance(value, tuple):
            return value
        parts = [part.strip() for part in str(value).split(",") if part.strip()]
        if self.lower:
            parts = [part.lower() for part in parts]
        try:
            items = tuple(self.kind(part) for part in parts)
        except ValueError:
            items = ()
        if not items:
            self.fail(f"takes a comma-separated list such as {self.example}, got {value!r}", param, ctx)
        return items


#: ``--providers cpu,cuda``.
PROVIDER_LIST = CommaList(str, example="cpu,cuda", lower=True)


class RankValue(click.ParamType):
    """``--rank``: a positive integer, or ``full`` (every site at ``min(K, N)``, exact)."""

    name = "rank"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) or value == "full":
            return value
        text = str(value).strip().lower()
        if text == "full":
            return "full"
        try:
            return int(text)
        except ValueError:
            self.fail(f"takes a positive integer or 'full', got {value!r}", param, ctx)


#: ``--rank 32`` or ``--rank full``.
RANK = RankValue()


def floor_options(function: Any) -> Any:
    """``--min-rank`` and ``--min-share``: the floors under which a site stays dense."""
    for option in reversed(
        [
            click.option("--min-rank", type=int, metavar="R",
                         help="Keep a layer dense when its ratio or allocated rank is under R (an energy "
                              "rank is raised to R) [default: --align]."),
            click.option("--min-share", type=float, default=MIN_SHARE, show_default=True,
                         help="Keep a site dense when it holds less than this share of the largest site's "
                              "parameters (0: off)."),
        ]
    ):
        function = option(function)
    return function


def selection_options(function: Any) -> Any:
    """``--include``, ``--exclude`` and ``--min-params``: which sites are considered at all."""
    for option in reversed(
        [
            click.option("--include", metavar="REGEX", help="Only consider nodes whose name matches."),
            click.option("--exclude", metavar="REGEX", help="Keep nodes whose name matches dense."),
            click.option("--min-params", type=int, default=0, show_default=True, help="Keep smaller layers dense."),
        ]
    ):
        function = option(function)
    return function


def rank_policy(
    rank: int | str | None,
    ratio: float | None,
    energy: float | None,
    align: int,
    allow_growth: bool,
    min_rank: int | None = None,
) -> RankPolicy:
    """The one policy among ``--rank`` (an integer or ``full``), ``--ratio`` and ``--energy`` (ratio 0.5
    when none is given), with ``--align``, ``--allow-growth`` and ``--min-rank``.

    Raises:
        UsageError: more than one was given.
    """
    choices = (("rank", rank), ("ratio", ratio), ("energy", energy))
    given = [(kind, value) for kind, value in choices if value is not None]
    if len(given) > 1:
        raise UsageError("give only one of --rank, --ratio and --energy")
    kind, value = given[0] if given else ("ratio", 0.5)
    if value == "full":
        return RankPolicy(kind="full", value=0.0, align=align, allow_growth=True, min_rank=min_rank)
    return RankPolicy(kind=kind, value=float(value), align=align, allow_growth=allow_growth, min_rank=min_rank)

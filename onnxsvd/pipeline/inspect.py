"""``inspect``: every site with its shape, break-even rank and energy ranks; every skip with its reason."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxsvd.config import RewriteConfig
from onnxsvd.errors import FactorizationError, UsageError
from onnxsvd.factorize import spectrum as singular_values
from onnxsvd.graph import GraphIndex, Site, find_sites, load_weight
from onnxsvd.io import atomic_path, count_parameters
from onnxsvd.pipeline.group import byte_cost
from onnxsvd.rank import break_even_rank, energy_rank

__all__ = [
    "PLOT_FORMATS",
    "SiteSummary",
    "SkipSummary",
    "Inspection",
    "inspect_model",
    "plot_format",
    "plot_spectra",
    "spectra_figure",
]

DEFAULT_ENERGIES = (0.8, 0.9, 0.99)


@dataclasses.dataclass
class SiteSummary:
    """One site: its normal-form shape, parameters, break-even rank and the ranks keeping each energy.

    ``break_even_rank`` is in bytes: the first rank whose chain, in the factor dtype of ``config.dtype``,
    is no smaller than the weight as stored (``dense_bytes``), as the rewrite's guard counts it.
    """

    name: str
    op_type: str
    shape: list[int]
    params: int
    break_even_rank: int
    energy_ranks: dict[str, int]
    weight_side: str
    dtype: str
    shared_with: list[str]
    singular_values: list[float] | None = None
    note: str = ""
    dense_bytes: int = 0


def _conv_note(site: Site) -> str:
    """A Conv site's kernel, strides and form (``Conv 3×3 /2 channel form``), else empty."""
    if site.conv is None:
        return ""
    geometry = site.conv
    strides = "" if set(geometry.strides) == {1} else " /" + "×".join(map(str, geometry.strides))
    return f"Conv {'×'.join(map(str, geometry.kernel))}{strides}, {geometry.form} form"


@dataclasses.dataclass
class SkipSummary:
    """A node that is not a site, with the reason: a MatMul/Gemm (``kind="matmul"``), another op holding
    constant weights (``"weights"``: LSTM, Conv, MatMulInteger…) or a node inside an If/Loop/Scan body
    (``"subgraph"``, with its ``scope``). ``params`` counts the values of its constant weights."""

    name: str
    op_type: str
    reason: str
    shape: list[int] | None
    kind: str = "matmul"
    scope: str = ""
    params: int = 0


@dataclasses.dataclass
class Inspection:
    """What ``inspect`` shows: the sites, the skips, and the model's parameters.

    ``params_in_sites`` counts each stored weight once, however many sites read it, so it never exceeds
    ``params_total``; ``params_in_skipped`` counts, once each, the stored weights that only nodes which
    are not sites read (LSTM, Conv, bodies of If/Loop/Scan…).
    """

    sites: list[SiteSummary]
    skips: list[SkipSummary]
    params_total: int
    params_in_sites: int
    params_in_skipped: int = 0

    def to_dict(self, with_spectra: bool = False) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if not with_spectra:
            for site in data["sites"]:
                site.pop("singular_values", None)
        return data


def inspect_model(
    model: onnx.ModelProto,
    config: RewriteConfig | None = None,
    energies: Sequence[float] = DEFAULT_ENERGIES,
    base_dir: str | os.PathLike[str] | None = None,
) -> Inspection:
    """Survey ``model``: compute each weight's spectrum (plain SVD) and the ranks for ``energies``."""
    config = config or RewriteConfig()
    match = find_sites(model, config)
    index = GraphIndex(model.graph)
    spectra: dict[str, np.ndarray | None] = {}
    notes: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for site in match.sites:
        groups.setdefault(site.group, []).append(site.name)
    summaries: list[SiteSummary] = []
    for site in match.sites:
        if site.group not in spectra:
            try:
                spectra[site.group] = singular_values(
                    load_weight(index, site, str(base_dir) if base_dir else None)
                )  # [min(K, N)]
            except FactorizationError as error:
                spectra[site.group], notes[site.group] = None, str(error)
        spectrum = spectra[site.group]
        ranks = {f"{e:g}": energy_rank(spectrum, e) for e in energies} if spectrum is not None else {}
        summaries.append(
            SiteSummary(
                name=site.name,
                op_type=site.op_type,
                shape=[site.k, site.n],
                params=site.params,
                break_even_rank=break_even_rank(site.k, site.n, byte_cost(site, config)),
                dense_bytes=site.dense_bytes,
                energy_ranks=ranks,
                weight_side=site.weight_side,
                dtype=onnx.helper.tensor_dtype_to_string(site.weight.storage_dtype).replace("TensorProto.", ""),
                shared_with=[n for n in groups[site.group] if n != site.name],
                singular_values=[float(v) for v in spectrum] if spectrum is not None else None,
                note="; ".join(part for part in (_conv_note(site), notes.get(site.group, "")) if part),
            )
        )
    skips = [
        SkipSummary(
            s.name, s.op_type, s.reason, list(s.shape) if s.shape is not None else None, s.kind, s.scope, s.params
        )
        for s in match.skips
    ]
    # Each stored weight once: sites of one group, or groups over one stored tensor (a Gemm's α, a Cast
    # to another dtype), hold the same values.
    stored: dict[str, int] = {}
    for site in match.sites:
        stored.setdefault(site.weight.tensor, site.params)
    in_skipped: dict[str, int] = {}
    for skip in match.skips:
        for name in skip.weights:
            if name not in stored:
                tensor = index.constant_tensor(name)
                in_skipped.setdefault(name, int(np.prod(tensor.dims)) if tensor is not None else 0)
    return Inspection(
        summaries, skips, count_parameters(model), sum(stored.values()), sum(in_skipped.values())
    )


#: What ``--plot`` writes, by the file's suffix.
PLOT_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}
#: Line styles cycled with the colours, so that lines stay apart when colours come close.
_LINESTYLES = ("-", "--", "-.", ":")
#: Legend entries per column.
_LEGEND_ROWS = 25


def plot_format(path: str | os.PathLike[str]) -> str:
    """The format the suffix of ``path`` names (``png``, ``pdf``, ``svg``).

    Raises:
        UsageError: any other suffix (checked before any work).
    """
    suffix = Path(path).suffix.lower()
    if suffix not in PLOT_FORMATS:
        raise UsageError(
            f"--plot {path}: unknown suffix {suffix or '(none)'!r}; name the file .png, .pdf or .svg"
        )
    return PLOT_FORMATS[suffix]


def _pyplot() -> Any:
    try:  # matplotlib is optional (onnxsvd[plot]) and slow to import: only --plot loads it
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise UsageError("--plot needs matplotlib: pip install 'onnxsvd[plot]'") from error
    return plt


def spectra_figure(inspection: Inspection) -> Any:
    """The spectra (σ_i/σ_1 against i/min(K, N)) and cumulative energies, one line per site.

    Each site gets its own colour (sampled evenly from a colormap over the sites) and line style, the same
    in both panels, and one legend entry, beside the panels.
    """
    plt = _pyplot()
    figure, (axis_spectrum, axis_energy) = plt.subplots(1, 2, figsize=(12, 4.5))
    plotted = [site for site in inspection.sites if site.singular_values and site.singular_values[0] > 0]
    colormap = plt.get_cmap("tab10" if len(plotted) <= 10 else "tab20" if len(plotted) <= 20 else "turbo")
    for position, site in enumerate(plotted):
        values = np.asarray(site.singular_values)  # [min(K, N)]
        colour = colormap(position % 20 if len(plotted) <= 20 else position / max(1, len(plotted) - 1))
        style = {"color": colour, "linestyle": _LINESTYLES[position % len(_LINESTYLES)], "linewidth": 1}
        rank_share = np.arange(1, values.size + 1) / values.size  # [min(K, N)]
        axis_spectrum.semilogy(rank_share, values / values[0], label=site.name, **style)
        energy = np.cumsum(values**2) / np.sum(values**2)  # [min(K, N)]
        axis_energy.plot(rank_share, energy, **style)
    axis_spectrum.set_xlabel("rank / min(K, N)")
    axis_spectrum.set_ylabel("σ_i / σ_1")
    axis_spectrum.set_title("singular value spectra")
    axis_energy.set_xlabel("rank / min(K, N)")
    axis_energy.set_ylabel("kept energy Σσ² share")
    axis_energy.set_title("cumulative energy")
    for level in (0.8, 0.9, 0.99):
        axis_energy.axhline(level, color="grey", linestyle=":", linewidth=0.8)
    figure.tight_layout()
    if plotted:
        columns = -(-len(plotted) // _LEGEND_ROWS)
        figure.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, ncol=columns, frameon=False)
    return figure


def plot_spectra(inspection: Inspection, path: str | os.PathLike[str]) -> Path:
    """Draw :func:`spectra_figure` to ``path`` in the format its suffix names (``.png``, ``.pdf``, ``.svg``).

    Raises:
        UsageError: another suffix, or no matplotlib.
    """
    path = Path(path)
    fmt = plot_format(path)
    plt = _pyplot()
    figure = spectra_figure(inspection)
    try:
        with atomic_path(path, suffix=path.suffix) as temporary:
            figure.savefig(temporary, dpi=120, format=fmt, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path

"""``onnxsvd rewrite``: parse → :class:`~onnxsvd.files.RewriteJob` → :func:`~onnxsvd.files.rewrite_file`
→ the site table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from onnxsvd.cli.options import PROVIDER_LIST, RANK, CommaList, floor_options, rank_policy, selection_options
from onnxsvd.cli.render import NARROW, add_name_column, human_bytes, progress_bar, stdout
from onnxsvd.config import (
    ALLOCATIONS,
    CONV_FORMS,
    DEVICES,
    FACTOR_DTYPES,
    LAYOUTS,
    METHODS,
    QUANT_ALGORITHMS,
    QUANT_TYPES,
    STORAGE_DTYPES,
    SVD_SOLVERS,
    QuantizeConfig,
    RewriteConfig,
)
from onnxsvd.errors import TORCH_CUDA_INSTALL_HINT, ProviderError, UsageError

__all__ = ["rewrite_command", "render_rewrite"]

#: ``--stage-ranks 32,16``.
STAGE_RANKS = CommaList(int, example="32,16")


@click.command("rewrite")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the rewritten model.")
@click.option("--rank", type=RANK, help="Fixed rank for every layer, or 'full': min(K, N), an exact rewrite.")
@click.option("--ratio", type=float,
              help="Kept fraction of each layer's parameters, 0 < ρ ≤ 1 [default: 0.5]; 1 is not exact.")
@click.option("--energy", type=float, help="Smallest rank keeping this share of Σσ², 0 < β ≤ 1.")
@click.option("--align", type=int, default=8, show_default=True, help="Round ranks to a multiple of this.")
@click.option("--allow-growth", is_flag=True, help="Factorize even at or above the break-even rank.")
@click.option("--stages", type=int, default=1, show_default=True, help="Residual SVD stages.")
@click.option("--stage-ranks", type=STAGE_RANKS, metavar="R1,R2,…",
              help="Explicit rank of each stage (overrides the policy).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="fused", show_default=True,
              help="fused: two MatMuls; stages: one chain per stage, summed.")
@click.option("--method", type=click.Choice(METHODS), default="svd", show_default=True,
              help="svd: plain; asvd: activation scaling; whiten: SVD-LLM whitening (need --stats or --data).")
@click.option("--alpha", type=float, default=0.5, show_default=True, help="ASVD exponent α.")
@click.option("--damping", type=float, default=1e-2, show_default=True, help="Whitening damping (relative).")
@click.option("--ridge", type=float, default=5e-2, show_default=True,
              help="Sequential rewrite: pull the least-squares target towards the original weight (relative).")
@click.option("--stats", type=click.Path(path_type=Path), help="Calibration statistics from 'onnxsvd calibrate'.")
@click.option("--data", "data_path", type=click.Path(path_type=Path),
              help="Calibration data (.npz or folder): calibrate in the same command.")
@click.option("--sequential", is_flag=True,
              help="Fit each level to the partly compressed model's own inputs (needs --data).")
@click.option("--conv", "conv_form", type=click.Choice(CONV_FORMS), default="channel", show_default=True,
              help="Conv sites: channel (k×k Conv to r, then 1×1), spatial (k_h×1, then 1×k_w; data-free), or "
                   "auto (per weight, the form with the smaller output error at the same parameters).")
@click.option("--patch-rows", type=int, default=8192, show_default=True,
              help="Calibration: im2col patches kept per batch of each Conv input (more are sampled, seeded).")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Calibration samples per run.")
@click.option("--max-samples", type=int, help="Use at most this many calibration samples.")
@click.option("--providers", type=PROVIDER_LIST, default="cpu", show_default=True,
              help="ONNX Runtime providers for calibration and --keep-dense-if-slower: cpu or cuda.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default="auto", show_default=True,
              help="Storage dtype of the factors.")
@click.option("--keep-dense-if-slower", is_flag=True,
              help="Time each factorized site dense against factorized on --providers; keep dense the "
              "sites whose chain is not faster.")
@click.option("--shape", "shapes", multiple=True, metavar="NAME=d0,d1,…",
              help="Input shape for --keep-dense-if-slower timing (repeat per input; default: a --data batch).")
@click.option("--speed-iters", type=int, default=30, show_default=True,
              help="Timed runs of each form per site for --keep-dense-if-slower.")
@click.option("--threads", type=int, help="onnxruntime intra-op threads for --keep-dense-if-slower timing.")
@selection_options
@floor_options
@click.option("--report", type=click.Path(path_type=Path), help="Write the report as JSON here.")
@click.option("--dry-run", is_flag=True, help="Plan and report, write no model.")
@click.option("--force", is_flag=True, help="Allow overwriting the input model.")
@click.option("--allow-unchanged", is_flag=True,
              help="Write the output even when no site is factorized (an unchanged copy, with a warning); "
                   "without it that is an error and nothing is written.")
@click.option("--allocate", type=click.Choice(ALLOCATIONS), default="uniform", show_default=True,
              help="uniform: each layer by the policy; global: one --ratio/--energy budget over all sites "
                   "(ranks by discarded energy × sensitivity measured on --data, which it needs).")
@click.option("--svd", "svd_solver", type=click.Choice(SVD_SOLVERS), default="auto", show_default=True,
              help="exact, randomized (range finder), or auto: randomized when the rank is well below min(K, N).")
@click.option("--device", type=click.Choice(DEVICES), default="cpu", show_default=True,
              help="Where the SVDs run (cuda through torch).")
@click.option("--jobs", type=int, default=0, show_default=True,
              help="Weights factorized in parallel (0: from the cores).")
@click.option("--external-data/--no-external-data", default=None,
              help="Write weights to <output>.data [default: when the input does, or above 2 GB].")
@click.option("--quantize", type=click.Choice(tuple(QUANT_TYPES)),
              help="Quantize each weight with ONNX Runtime (MatMulNBits) and fit the rank policy's factors to "
                   "the quantization error; --rank 0 quantizes only.")
@click.option("--block", type=int, help="--quantize: values per quantization block along K [default: 32].")
@click.option("--accuracy-level", type=int,
              help="--quantize: MatMulNBits accuracy_level, 0–4 (4: int8 activations inside the kernel) [default: 0].")
@click.option("--symmetric/--asymmetric", default=None,
              help="--quantize: symmetric blocks, or a zero point per block [default: symmetric].")
@click.option("--quant-algo", type=click.Choice(QUANT_ALGORITHMS),
              help="--quantize: rtn (round to nearest) or hqq (ORT's half-quadratic quantizer) [default: rtn].")
@click.option("--factor-dtype", type=click.Choice(FACTOR_DTYPES),
              help="--quantize: storage of the correction's factors (int8: a scale per rank component) "
                   "[default: auto, the weight's own float dtype].")
def rewrite_command(
    model: Path,
    output: Path | None,
    rank: int | str | None,
    ratio: float | None,
    energy: float | None,
    align: int,
    allow_growth: bool,
    stages: int,
    stage_ranks: tuple[int, ...] | None,
    layout: str,
    method: str,
    alpha: float,
    damping: float,
    ridge: float,
    stats: Path | None,
    data_path: Path | None,
    sequential: bool,
    conv_form: str,
    patch_rows: int,
    batch_size: int,
    max_samples: int | None,
    providers: tuple[str, ...],
    dtype: str,
    keep_dense_if_slower: bool,
    shapes: tuple[str, ...],
    speed_iters: int,
    threads: int | None,
    include: str | None,
    exclude: str | None,
    min_params: int,
    min_rank: int | None,
    min_share: float,
    report: Path | None,
    dry_run: bool,
    force: bool,
    allow_unchanged: bool,
    external_data: bool | None,
    svd_solver: str,
    device: str,
    jobs: int,
    allocate: str,
    quantize: str | None,
    block: int | None,
    accuracy_level: int | None,
    symmetric: bool | None,
    quant_algo: str | None,
    factor_dtype: str | None,
) -> None:
    """Replace constant-weight MatMul/Gemm nodes by low-rank factor chains.

    The ratio ρ is the kept fraction of each layer's parameters: rank r = ⌊ρ·K·N/(K+N)⌋, aligned down to
    --align. A layer whose chain would not be smaller (r·(K+N) ≥ K·N, in bytes) stays dense, as does one
    whose rank falls under --min-rank or that holds less than --min-share of the largest site's parameters,
    each with the reason in the report. --rank full rewrites every site exactly, at min(K, N).
    """
    from onnxsvd.calibrate import CalibrateConfig
    from onnxsvd.files import RewriteJob, nothing_factorized, rewrite_file

    quantization = _quantize_config(quantize, rank, block, accuracy_level, symmetric, quant_algo, factor_dtype)
    if quantization is not None and not quantization.correction:
        rank = None  # --rank 0: quantize only; no rank policy applies
    config = RewriteConfig(
        policy=rank_policy(rank, ratio, energy, align, allow_growth, min_rank),
        stages=stages,
        stage_ranks=stage_ranks,
        layout=layout,
        method=method,
        alpha=alpha,
        damping=damping,
        ridge=ridge,
        include=include,
        exclude=exclude,
        min_params=min_params,
        min_share=min_share,
        dtype=dtype,
        svd=svd_solver,
        device=device,
        jobs=jobs,
        allocate=allocate,
        quantize=quantization,
        conv=conv_form,
    )
    if device == "cuda":
        _require_torch_cuda()
    if output is None and not dry_run:
        raise UsageError("missing -o/--output: say where to write the rewritten model (or use --dry-run)")
    calibration = CalibrateConfig(
        batch_size=batch_size, max_samples=max_samples, providers=providers, patch_rows=patch_rows
    )
    job = RewriteJob(
        model=model,
        output=None if dry_run else output,
        config=config,
        stats=stats,
        data=data_path,
        calibration=calibration,
        sequential=sequential,
        external_data=external_data,
        speed_check=_speed_check(keep_dense_if_slower, shapes, providers, speed_iters, threads),
        report=report,
        force=force,
        allow_unchanged=allow_unchanged,
    )
    with progress_bar("factorizing") as update:
        outcome = rewrite_file(job, progress=update)
    render_rewrite(outcome)
    if report is not None:
        stdout.print(f"report: {report}")
    unchanged = nothing_factorized(outcome)
    if unchanged is not None:  # a dry run, or --allow-unchanged: the copy is written, but not silently
        what = "nothing would be factorized" if dry_run else "nothing was factorized"
        copy = "" if dry_run else f"; {output} is an unchanged copy of the input"
        click.echo(f"onnxsvd: warning: {what}: {unchanged}{copy}", err=True)


def _quantize_config(
    quantize: str | None,
    rank: int | None,
    block: int | None,
    accuracy_level: int | None,
    symmetric: bool | None,
    quant_algo: str | None,
    factor_dtype: str | None,
) -> QuantizeConfig | None:
    """The ``--quantize`` configuration, or None; its options without ``--quantize`` are a usage error."""
    given = {"--block": block, "--accuracy-level": accuracy_level, "--symmetric/--asymmetric": symmetric,
             "--quant-algo": quant_algo, "--factor-dtype": factor_dtype}
    if quantize is None:
        stray = [flag for flag, value in given.items() if value is not None]
        if stray:
            raise UsageError(f"{', '.join(stray)} only apply with --quantize int4|int8|int2; add it or drop them")
        return None
    algorithm = quant_algo or "rtn"
    return QuantizeConfig(
        bits=QUANT_TYPES[quantize],
        block_size=32 if block is None else block,
        symmetric=(algorithm != "hqq") if symmetric is None else symmetric,
        accuracy_level=accuracy_level or 0,
        algorithm=algorithm,
        correction=rank != 0,
        factor_dtype=factor_dtype or "auto",
    )


def _speed_check(
    enabled: bool, shapes: tuple[str, ...], providers: tuple[str, ...], iters: int, threads: int | None
) -> Any:
    """The ``--keep-dense-if-slower`` configuration, or None."""
    if not enabled:
        if shapes:
            raise UsageError("--shape only sets the timing shapes of --keep-dense-if-slower; add that flag")
        return None
    from onnxsvd.pipeline.speed import SpeedCheckConfig, parse_shape  # the library, when the command runs

    declared = dict(parse_shape(text) for text in shapes)
    return SpeedCheckConfig(providers=providers, input_shapes=declared, iters=iters, threads=threads)


def _require_torch_cuda() -> None:
    try:
        import torch  # optional (onnxsvd[torch]) and heavy: only --device cuda needs it here
    except ImportError as error:
        raise ProviderError(f"--device cuda needs a CUDA build of torch: {TORCH_CUDA_INSTALL_HINT}") from error
    if not torch.cuda.is_available():
        raise ProviderError("--device cuda: torch sees no CUDA GPU here; use --device cpu")


#: Columns of the site table, and those a narrow console (below ``NARROW``) leaves out.
SITE_COLUMNS = ("site", "op", "K×N", "action", "rank", "params", "kept energy", "reason")
NARROW_DROPS = ("op", "kept energy")


def _rank_cell(site: Any) -> str:
    """``16``, or ``8+8`` for residual stages; ``-`` when kept dense."""
    if not site.rank:
        return "-"
    return "+".join(str(rank) for rank in site.stage_ranks) if len(site.stage_ranks) > 1 else str(site.rank)


def _site_counts(report: Any) -> str:
    """Sites factorized and kept dense, apart from the nodes that are not sites at all (a MatMul/Gemm
    without a usable constant weight, another op holding weights, a node inside a subgraph)."""
    kept = [site for site in report.kept if site.shape]
    others = [site for site in report.kept if not site.shape]
    text = f"sites: {len(report.factorized)} factorized, {len(kept)} kept dense"
    if others:
        reasons: dict[str, int] = {}
        for site in others:
            reasons[site.reason] = reasons.get(site.reason, 0) + 1
        why = "; ".join(reason if len(reasons) == 1 else f"{count}× {reason}" for reason, count in reasons.items())
        nodes = "node is not a site" if len(others) == 1 else "nodes are not sites"
        text += f"; {len(others)} other {nodes}: {why}"
    return text


def _bytes_line(report: Any) -> str:
    """``weight bytes: 65,541 → 49,152 (75.0% kept)\n``: the weights' bytes in their stored dtypes (what the
    break-even guard weighs); empty for a report without them."""
    before, after = getattr(report, "bytes_before", None), getattr(report, "bytes_after", None)
    if before is None or after is None:
        return ""
    return f"weight bytes: {before:,} → {after:,} ({after / before if before else 1.0:.1%} kept)\n"


def render_rewrite(report: Any, console: Any = None) -> None:
    """The site table and the summary lines of a rewrite report (on ``console``, default stdout).

    Site names fold onto more lines rather than being cut, so rows stay distinct on a narrow terminal.
    """
    console = console if console is not None else stdout
    narrow = console.width < NARROW
    shown = [column for column in SITE_COLUMNS if not (narrow and column in NARROW_DROPS)]
    table = Table(title=f"{report.input} → {report.output or '(dry run, nothing written)'}")
    for column in shown:
        if column == "site":  # folded, never cut: rows stay distinct on a narrow console
            add_name_column(table, column, [site.name for site in report.sites], console)
        elif column == "reason":
            table.add_column(column, overflow="fold")  # so the table can always shrink to the console
        else:
            table.add_column(column, justify="right" if column in ("rank", "params", "kept energy") else "left")
    for site in report.sites:
        params = (
            f"{site.params_before:,} → {site.params_after:,}"
            if site.action == "factorized"
            else f"{site.params_before:,}"
        )
        cells = {
            "site": site.name,
            "op": site.op_type,
            "K×N": f"{site.shape[0]}×{site.shape[1]}" if site.shape else "-",
            "action": site.action,
            "rank": _rank_cell(site),
            "params": params,
            "kept energy": f"{site.kept_energy:.3f}" if site.kept_energy is not None else "-",
            "reason": site.reason,
        }
        table.add_row(*(cells[column] for column in shown))
    console.print(table)
    if narrow:
        console.print(f"(columns {' and '.join(NARROW_DROPS)} left out to fit {console.width} columns; "
                      "--report has every field)")
    ratio = report.params_after / report.params_before if report.params_before else 1.0
    console.print(
        f"method {report.method}, policy {report.policy}, layout {report.layout}\n"
        f"{_site_counts(report)}\n"
        f"parameters: {report.params_before:,} → {report.params_after:,} ({ratio:.1%} kept)\n"
        f"{_bytes_line(report)}"
        f"file size: {human_bytes(report.file_size_before)} → {human_bytes(report.file_size_after)}\n"
        f"time: {report.seconds:.2f} s"
    )
    for note in report.notes:
        console.print(f"note: {note}")

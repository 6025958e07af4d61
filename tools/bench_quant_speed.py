"""Speed of the correction branch on CPU (issue 12, point 6): which form ONNX Runtime runs fastest.

Every form is timed A/B against the same int4 model without a correction, alternating in one process
(ONNX Runtime CPU, ``--threads`` threads, no spinning, batch 32 × sequence 64), so the number is what the
correction costs on top of the quantized layer alone:

- layers of MiniLM-L6's shapes (384×384, 384×1536, 1536×384; activations ``[32, 64, K]``): one MatMul of a
  random weight rewritten by onnxsvd itself, so the nodes timed are the nodes ``rewrite`` writes;
- the whole MiniLM-L6 (whitened correction from the 256 calibration sentences), with its fidelity on the
  512 held-out sentences beside the latency (the fused form quantizes ``A``: this is its accuracy price).

Forms: ``unfused`` (``MatMulNBits(X) + (X·A)·B``), ``fused`` (``A`` as extra columns of the quantized weight,
one ``MatMulNBits`` and a ``Split``), fp16 against fp32 factors, and ranks aligned to 16/32 against an
unaligned rank. Writes ``quant_speed<tag>.json`` and ``.md``.

    python tools/bench_quant_speed.py [--ranks 8,16,32] [--iters 30] [--threads 2] [--skip-model]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import tempfile
from pathlib import Path

# onnxsvd first: it sets OpenBLAS's idle-thread timeout before numpy loads, as it does for the CLI.
import onnxsvd

# isort: split
import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from onnxsvd import io
from onnxsvd.calibrate import CalibrateConfig, batch_source, calibrate
from onnxsvd.validate.latency import open_session, time_models

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import embed, mean_cosine, nearest_neighbours  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ((384, 384), (384, 1536), (1536, 384))


def forms(ranks: list[int], only: str | None = None) -> list[tuple[str, int, str, str]]:
    """(label, rank, branch, factor dtype) of every form timed (those whose label matches ``only``)."""
    rows = []
    for rank in ranks:
        rows += [(f"rank {rank} unfused fp32", rank, "unfused", "fp32"),
                 (f"rank {rank} unfused fp16", rank, "unfused", "fp16"),
                 (f"rank {rank} fused (A int4 in the base, B fp32)", rank, "fused", "fp32")]
    rows.append(("rank 20 unfused fp32 (not aligned to 16)", 20, "unfused", "fp32"))
    rows.append(("rank 24 unfused fp32 (aligned to 8, not 16)", 24, "unfused", "fp32"))
    return [row for row in rows if only is None or re.search(only, row[0])]


def config_for(rank: int, branch: str, factor_dtype: str, method: str, accuracy_level: int) -> onnxsvd.RewriteConfig:
    quantize = onnxsvd.QuantizeConfig(bits=4, block_size=32, accuracy_level=accuracy_level, correction=rank > 0,
                                      factor_dtype=factor_dtype, branch=branch)
    return onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", max(rank, 1), align=1), method=method,
                                 quantize=quantize)


def layer_model(rng: np.random.Generator, k: int, n: int) -> onnx.ModelProto:
    weight = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="layer")], "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [32, 64, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [32, 64, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def timed(base: Path, other: Path, feeds: dict, args: argparse.Namespace) -> dict:
    timing = time_models(base, other, feeds, "cpu", args.warmup, args.iters, args.threads)
    cost = timing.rewritten.p50_ms / timing.original.p50_ms - 1.0
    return {"base_ms": timing.original.p50_ms, "ms": timing.rewritten.p50_ms, "cost": cost,
            "speedup_p10_p90": [timing.speedup_p10, timing.speedup_p90]}


#: Node names of an unfused branch, as emit_quant writes them (``site/q_corr_a``, ``/q_corr_b``, ``/q_add``).
BRANCH_NODES = ("/q_corr_a", "/q_corr_b", "/q_add")


def branch_share(path: Path, feeds: dict, args: argparse.Namespace, runs: int = 12) -> float:
    """The unfused branch's kernels' share of all kernel time, from ONNX Runtime's profile of the corrected
    model itself (both parts slowed alike by a busy machine, so steadier than two timings): the correction's
    cost over the int4 model alone is then ``share / (1 − share)``."""
    with tempfile.TemporaryDirectory(prefix="bench-quant-profile-") as folder:
        session, _ = open_session(path, "cpu", args.threads, profile_prefix=str(Path(folder) / "trace"))
        for _ in range(runs + 1):
            session.run(None, feeds)
        trace = json.loads(Path(session.end_profiling()).read_text())
    starts = sorted(e["ts"] + e.get("dur", 0) for e in trace if e.get("name") == "model_run")
    first = starts[0] if starts else 0  # the first run warms up
    branch = total = 0.0
    for event in trace:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time") or event.get("ts", 0) < first:
            continue
        total += event.get("dur", 0)
        if any(part in name for part in BRANCH_NODES):
            branch += event.get("dur", 0)
    return branch / total if total else float("nan")


def run_layers(args: argparse.Namespace, ranks: list[int], scratch: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for k, n in LAYERS:
        model = layer_model(rng, k, n)
        feeds = {"x": rng.standard_normal((32, 64, k)).astype(np.float32)}
        base = scratch / f"layer_{k}_{n}_base.onnx"
        io.save_model(onnxsvd.rewrite(model, config_for(0, "unfused", "auto", "svd", args.accuracy_level)).model, base)
        for label, rank, branch, factor_dtype in forms(ranks, args.only):
            path = scratch / f"layer_{k}_{n}_{rank}_{branch}_{factor_dtype}.onnx"
            io.save_model(onnxsvd.rewrite(model, config_for(rank, branch, factor_dtype, "svd",
                                                            args.accuracy_level)).model, path)
            row = {"layer": f"{k}x{n}", "form": label, "rank": rank, "branch": branch, "factor_dtype": factor_dtype,
                   **timed(base, path, feeds, args)}
            if branch == "unfused":
                share = branch_share(path, feeds, args)
                row["profiled_cost"] = share / (1.0 - share)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def run_model(args: argparse.Namespace, ranks: list[int], scratch: Path) -> tuple[list[dict], dict]:
    model = io.load_model(args.minilm / "model.onnx")
    evaluation = dict(np.load(args.minilm / "eval.npz"))
    feeds = {name: value[:32] for name, value in evaluation.items()}  # [32, 64]
    calibration = CalibrateConfig(batch_size=64)
    batches, count = batch_source(args.minilm / "calib.npz", model, calibration)
    statistics = calibrate(model, batches, calibration, total_batches=count)
    reference = embed(model, evaluation, args.threads)
    neighbours = nearest_neighbours(reference)

    def build(rank: int, branch: str, factor_dtype: str, name: str) -> tuple[Path, dict]:
        result = onnxsvd.rewrite(model, config_for(rank, branch, factor_dtype, "whiten", args.accuracy_level),
                                 statistics)
        path = scratch / f"{name}.onnx"
        io.save_model(result.model, path)
        embeddings = embed(str(path), evaluation, args.threads)
        linear = [site for site in result.report.sites if site.action == "factorized"]
        return path, {"cosine": mean_cosine(reference, embeddings),
                      "nn_agreement": float(np.mean(nearest_neighbours(embeddings) == neighbours)),
                      "linear_bytes": sum(site.factor_bytes for site in linear),
                      "linear_fp32_bytes": sum(site.dense_bytes for site in linear)}

    base, base_quality = build(0, "unfused", "auto", "base")
    summary = dict(base_quality)
    if not args.quality_only:
        fp32_timing = time_models(args.minilm / "model.onnx", base, feeds, "cpu", args.warmup, args.iters,
                                  args.threads)
        summary.update(int4_speedup_vs_fp32=fp32_timing.speedup, fp32_ms=fp32_timing.original.p50_ms,
                       int4_ms=fp32_timing.rewritten.p50_ms)
    print(json.dumps({"int4 base": summary}), flush=True)
    rows = []
    for label, rank, branch, factor_dtype in forms(ranks, args.only):
        path, quality = build(rank, branch, factor_dtype, f"model_{rank}_{branch}_{factor_dtype}")
        row = {"form": label, "rank": rank, "branch": branch, "factor_dtype": factor_dtype, **quality}
        if not args.quality_only:
            row.update(timed(base, path, feeds, args))
        if branch == "unfused" and not args.quality_only:
            share = branch_share(path, feeds, args)
            row["profiled_cost"] = share / (1.0 - share)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows, summary


def _profiled(row: dict) -> str:
    """The profile's estimate (unfused forms only: a fused branch runs inside the MatMulNBits kernel)."""
    return f"{row['profiled_cost']:+.1%}" if "profiled_cost" in row else "inside MatMulNBits"


def markdown(record: dict) -> str:
    timing = record["timing"]
    lines = [
        "# Speed of the correction branch: ONNX Runtime CPU",
        "",
        f"Each form A/B against the same int4 (MatMulNBits b32, accuracy_level {record['accuracy_level']}) model "
        f"without a correction, alternating in one process: batch {timing['batch']} × sequence "
        f"{timing['sequence']}, {timing['threads']} threads, no spinning, {timing['iters']} rounds after "
        f"{timing['warmup']} warm-up; median times. 'cost' is the correction's extra latency over the int4 "
        f"model alone (the target: ≤ 10% at rank ≤ 32). onnxruntime {record['onnxruntime']}, "
        f"{record['machine']}; the machine was shared with other work, so single numbers move by several %.",
        "",
    ]
    if record.get("model"):
        base = record["model_base"]
        timing_line = (f"{base['int4_ms']:.1f} ms ({base['int4_speedup_vs_fp32']:.2f}× against fp32's "
                       f"{base['fp32_ms']:.1f} ms), " if "int4_ms" in base else "")
        lines += [
            "## Whole MiniLM-L6 (36 linear layers, whitened correction)",
            "",
            f"int4 base alone: {timing_line}cosine {base['cosine']:.4f}, nn-agreement {base['nn_agreement']:.3f}.",
            "",
            "| form | cosine | nn-agreement | linear bytes / fp32 | ms | cost vs int4 alone, A/B (p10–p90 of "
            "the paired speedups) | cost from the profile |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in record["model"]:
            timing = "| not timed | not timed | not timed"
            if "cost" in row:
                low, high = row["speedup_p10_p90"]
                timing = f"| {row['ms']:.1f} | {row['cost']:+.1%} ({low:.2f}–{high:.2f}) | {_profiled(row)}"
            lines.append(
                f"| {row['form']} | {row['cosine']:.4f} | {row['nn_agreement']:.3f} | "
                f"{row['linear_bytes'] / row['linear_fp32_bytes']:.3f} {timing} |"
            )
        lines.append("")
    if record.get("layers"):
        lines += ["## Single layers of MiniLM-L6's shapes (activations [32, 64, K])", "",
                  "| layer | form | int4 ms | with correction ms | cost, A/B | cost from the profile |",
                  "|---|---|---|---|---|---|"]
        for row in record["layers"]:
            lines.append(f"| {row['layer']} | {row['form']} | {row['base_ms']:.2f} | {row['ms']:.2f} | "
                         f"{row['cost']:+.1%} | {_profiled(row)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--ranks", default="8,16,32")
    parser.add_argument("--accuracy-level", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--skip-model", action="store_true", help="time the single layers only")
    parser.add_argument("--skip-layers", action="store_true", help="time the whole model only")
    parser.add_argument("--quality-only", action="store_true",
                        help="whole model: fidelity and bytes of each form, no timing")
    parser.add_argument("--only", help="a regular expression: time the forms whose label matches it")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ranks = [int(rank) for rank in args.ranks.split(",")]
    record: dict = {"accuracy_level": args.accuracy_level, "onnxruntime": onnxruntime.__version__,
                    "onnxsvd": onnxsvd.__version__, "machine": platform.machine(),
                    "timing": {"batch": 32, "sequence": 64, "threads": args.threads, "iters": args.iters,
                               "warmup": args.warmup, "spinning": False}}
    with tempfile.TemporaryDirectory(prefix="bench-quant-speed-") as folder:
        scratch = Path(folder)
        if not args.skip_layers:
            record["layers"] = run_layers(args, ranks, scratch)
        if not args.skip_model:
            record["model"], record["model_base"] = run_model(args, ranks, scratch)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"quant_speed{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

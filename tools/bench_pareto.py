"""Pareto benchmark (issue 12, point 8): fidelity, bytes and CPU latency of quantized MiniLM-L6 models.

ONNX Runtime's own quantizers (``quantize_dynamic`` int8 per channel and per tensor; ``MatMulNBits`` int4
RTN at block 32 and 128, accuracy level 4) against onnxsvd's quantized rewrite (an int4 base from the same
quantizer, plus a low-rank correction of its error fitted in the data metric), all measured in one run:

- fidelity: mean cosine of the mean-pooled sentence embedding to fp32's on the 512 held-out sentences of
  ``tools/bench_quality.py``, and nearest-neighbour agreement;
- bytes: the linear layers' weights (quantized values, scales, zero points, correction factors) relative
  to their fp32 bytes;
- latency: alternating A/B against fp32 in the same process, batch 32 × sequence 64, non-spinning pools
  (``onnxsvd.validate.latency``); the corrected rows are also timed A/B against their int4 base alone.

Writes ``pareto.json``, ``pareto.md`` and ``pareto.png`` (fidelity against bytes and against speedup).

    python tools/bench_pareto.py [--out docs/results] [--rows all] [--threads 2] [--iters 30]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

# onnxsvd first: it sets OpenBLAS's idle-thread timeout before numpy loads, as it does for the CLI.
import onnxsvd

# isort: split
import numpy as np
import onnx

from onnxsvd import io
from onnxsvd.calibrate import CalibrateConfig, batch_source, calibrate
from onnxsvd.calibrate.collect import find_mask_input
from onnxsvd.graph import find_sites
from onnxsvd.validate.latency import time_models
from tools.bench_quality import embed, ensure_minilm, mean_cosine, nearest_neighbours

ROOT = Path(__file__).resolve().parent.parent


def ort_dynamic(per_channel: bool):
    def build(model_path: Path, out: Path, context: dict) -> dict:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(model_path, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=per_channel,
                         weight_type=QuantType.QInt8)
        return {}
    return build


def ort_nbits(block: int, accuracy_level: int = 4):
    def build(model_path: Path, out: Path, context: dict) -> dict:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(str(model_path), bits=4, block_size=block, is_symmetric=True,
                                         accuracy_level=accuracy_level)
        quantizer.process()
        onnx.save(quantizer.model.model, str(out))
        return {}
    return build


def onnxsvd_quantized(rank: int, method: str, block: int = 32, accuracy_level: int = 4, factor_dtype: str = "auto",
                      sequential: bool = False, preserve: int | None = None, bits_per_weight: float | None = None,
                      bits: int = 4):
    """An onnxsvd quantized rewrite with an int``bits`` base: correction rank ``rank`` (``bits_per_weight``:
    ranks from that byte budget instead), ``preserve``: ``--order lowrank-first`` with that stage-1 rank."""
    def build(model_path: Path, out: Path, context: dict) -> dict:
        quantize = onnxsvd.QuantizeConfig(
            bits=bits, block_size=block, accuracy_level=accuracy_level,
            correction=rank > 0 or bits_per_weight is not None,
            factor_dtype=factor_dtype, order="lowrank-first" if preserve else "quant-first", preserve_rank=preserve,
            bits_per_weight=bits_per_weight,
        )
        policy = onnxsvd.RankPolicy() if bits_per_weight is not None else onnxsvd.RankPolicy("rank", max(rank, 1))
        config = onnxsvd.RewriteConfig(policy=policy, method=method, quantize=quantize)
        tick = time.perf_counter()
        if sequential:
            result = onnxsvd.rewrite_quantized(context["model"], config, batches=context["batches"], sequential=True,
                                               mask_input=find_mask_input(context["model"]))
        else:
            statistics = context["statistics"] if method != "svd" else None
            batches = context["sensitivity_batches"] if bits_per_weight is not None else None
            result = onnxsvd.rewrite(context["model"], config, statistics, batches=batches)
        seconds = time.perf_counter() - tick
        io.save_model(result.model, out)
        kept = [site for site in result.report.sites if site.op_type in ("MatMul", "Gemm") and site.shape
                and site.action != "factorized"]
        ranks = [site.rank for site in result.report.sites if site.action == "factorized"]
        return {"rewrite_seconds": seconds, "sites_kept_dense": len(kept),
                "ranks": {"min": min(ranks, default=0), "max": max(ranks, default=0), "sum": sum(ranks)}}
    return build


#: Row name → (label, builder, int4 base to time the correction against).
ROWS = {
    "ort_int8_channel": ("ORT quantize_dynamic int8, per channel", ort_dynamic(True), None),
    "ort_int8_tensor": ("ORT quantize_dynamic int8, per tensor", ort_dynamic(False), None),
    "ort_int4_b32": ("ORT MatMulNBits int4 RTN, block 32, accuracy_level 4", ort_nbits(32), None),
    "ort_int4_b128": ("ORT MatMulNBits int4 RTN, block 128, accuracy_level 4", ort_nbits(128), None),
    "onnxsvd_int4_b32_r0": ("onnxsvd int4 b32, no correction (--rank 0)", onnxsvd_quantized(0, "svd"), None),
    "onnxsvd_int4_b32_whiten_r8": ("onnxsvd int4 b32 + whiten rank 8", onnxsvd_quantized(8, "whiten"),
                                   "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b32_whiten_r16": ("onnxsvd int4 b32 + whiten rank 16", onnxsvd_quantized(16, "whiten"),
                                    "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b32_whiten_r32": ("onnxsvd int4 b32 + whiten rank 32", onnxsvd_quantized(32, "whiten"),
                                    "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b32_svd_r32": ("onnxsvd int4 b32 + plain SVD rank 32 (LoRC)", onnxsvd_quantized(32, "svd"),
                                 "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b32_whiten_r32_int8": ("onnxsvd int4 b32 + whiten rank 32, int8 factors",
                                         onnxsvd_quantized(32, "whiten", factor_dtype="int8"), "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b128_r0": ("onnxsvd int4 b128, no correction", onnxsvd_quantized(0, "svd", block=128), None),
    "onnxsvd_int4_b128_whiten_r16": ("onnxsvd int4 b128 + whiten rank 16", onnxsvd_quantized(16, "whiten", block=128),
                                     "onnxsvd_int4_b128_r0"),
    "onnxsvd_int4_b128_whiten_r16_int8": ("onnxsvd int4 b128 + whiten rank 16, int8 factors",
                                          onnxsvd_quantized(16, "whiten", block=128, factor_dtype="int8"),
                                          "onnxsvd_int4_b128_r0"),
    "onnxsvd_int4_b128_whiten_r8_fp16": ("onnxsvd int4 b128 + whiten rank 8, fp16 factors",
                                         onnxsvd_quantized(8, "whiten", block=128, factor_dtype="fp16"),
                                         "onnxsvd_int4_b128_r0"),
    "onnxsvd_int4_b32_whiten_r16_int8": ("onnxsvd int4 b32 + whiten rank 16, int8 factors",
                                         onnxsvd_quantized(16, "whiten", factor_dtype="int8"), "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b32_whiten_seq_r16": ("onnxsvd int4 b32 + whiten rank 16, sequential",
                                        onnxsvd_quantized(16, "whiten", sequential=True), "onnxsvd_int4_b32_r0"),
    # --order lowrank-first: stage 1 of rank p kept, the residual quantized, a rank-r correction of its error;
    # one fused branch of rank p + r, the same bytes as quant-first at rank p + r.
    "onnxsvd_int4_b32_whiten_lrf_p8_r8": ("onnxsvd int4 b32, lowrank-first: whiten preserve 8 + correction 8",
                                          onnxsvd_quantized(8, "whiten", preserve=8), "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b32_whiten_lrf_p16_r16": ("onnxsvd int4 b32, lowrank-first: whiten preserve 16 + correction 16",
                                            onnxsvd_quantized(16, "whiten", preserve=16), "onnxsvd_int4_b32_r0"),
    "onnxsvd_int4_b128_whiten_lrf_p8_r8": ("onnxsvd int4 b128, lowrank-first: whiten preserve 8 + correction 8",
                                           onnxsvd_quantized(8, "whiten", block=128, preserve=8),
                                           "onnxsvd_int4_b128_r0"),
    "onnxsvd_int4_b32_whiten_seq_lrf_p8_r8": ("onnxsvd int4 b32, lowrank-first sequential: preserve 8 + correction 8",
                                              onnxsvd_quantized(8, "whiten", sequential=True, preserve=8),
                                              "onnxsvd_int4_b32_r0"),
    # --bits-per-weight: the bases paid first, correction ranks by measured sensitivity per byte.
    "onnxsvd_int4_b128_whiten_bpw4.5": ("onnxsvd int4 b128 + whiten, --bits-per-weight 4.5",
                                        onnxsvd_quantized(0, "whiten", block=128, bits_per_weight=4.5),
                                        "onnxsvd_int4_b128_r0"),
    "onnxsvd_int4_b128_whiten_bpw5": ("onnxsvd int4 b128 + whiten, --bits-per-weight 5.0",
                                      onnxsvd_quantized(0, "whiten", block=128, bits_per_weight=5.0),
                                      "onnxsvd_int4_b128_r0"),
    "onnxsvd_int4_b128_whiten_bpw5_int8": ("onnxsvd int4 b128 + whiten, --bits-per-weight 5.0, int8 factors",
                                           onnxsvd_quantized(0, "whiten", block=128, bits_per_weight=5.0,
                                                             factor_dtype="int8"), "onnxsvd_int4_b128_r0"),
    # ORT int4 b128's bytes (4.25 bits a weight) spent another way: an int2 b128 base (2.25 bits) and the two bits
    # it leaves spent on int8 correction ranks (a block of 256 would pad MiniLM's K = 384 to 512 and cost more).
    "onnxsvd_int2_b128_whiten_bpw4.25_int8": ("onnxsvd int2 b128 + whiten, --bits-per-weight 4.25, int8 factors",
                                              onnxsvd_quantized(0, "whiten", block=128, bits_per_weight=4.25,
                                                                factor_dtype="int8", bits=2), None),
    "onnxsvd_int2_b128_whiten_lrf_bpw4.25_int8": (
        "onnxsvd int2 b128, lowrank-first: whiten preserve 32, --bits-per-weight 4.25, int8 factors",
        onnxsvd_quantized(0, "whiten", block=128, bits_per_weight=4.25, factor_dtype="int8", bits=2, preserve=32),
        None),
    "onnxsvd_int4_b32_whiten_bpw6.7_int8": ("onnxsvd int4 b32 + whiten, --bits-per-weight 6.7, int8 factors",
                                            onnxsvd_quantized(0, "whiten", bits_per_weight=6.7, factor_dtype="int8"),
                                            "onnxsvd_int4_b32_r0"),
}
#: The rows of issue 12's points 2 and 4 (``--rows quant2``), with the rows they are compared against.
QUANT2_ROWS = [
    "ort_int8_channel", "ort_int4_b32", "ort_int4_b128",
    "onnxsvd_int4_b32_r0", "onnxsvd_int4_b32_whiten_r16", "onnxsvd_int4_b32_whiten_lrf_p8_r8",
    "onnxsvd_int4_b32_whiten_r32", "onnxsvd_int4_b32_whiten_lrf_p16_r16",
    "onnxsvd_int4_b32_whiten_seq_r16", "onnxsvd_int4_b32_whiten_seq_lrf_p8_r8",
    "onnxsvd_int4_b128_r0", "onnxsvd_int4_b128_whiten_r16", "onnxsvd_int4_b128_whiten_lrf_p8_r8",
    "onnxsvd_int4_b128_whiten_bpw4.5", "onnxsvd_int4_b128_whiten_bpw5", "onnxsvd_int4_b128_whiten_bpw5_int8",
    "onnxsvd_int4_b32_whiten_bpw6.7_int8",
]
#: The rows of a plain run; ``--rows all`` adds the sequential fit and the smaller-factor variants.
DEFAULT_ROWS = [
    name for name in ROWS
    if name not in ("onnxsvd_int4_b32_whiten_seq_r16", "onnxsvd_int4_b128_whiten_r16_int8",
                    "onnxsvd_int4_b128_whiten_r8_fp16", "onnxsvd_int4_b32_whiten_r16_int8")
    and "_lrf_" not in name and "_bpw" not in name
]


def linear_bytes(model: onnx.ModelProto, other_bytes: int) -> int:
    """The bytes of the linear layers: every initializer's bytes less those of the model's other tensors
    (embeddings, norms, biases), which no row changes."""
    return io.count_bytes(model) - other_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--rows", default="default",
                        help="comma-separated row names, 'default', 'quant2' (orders and byte budgets) or 'all'")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tag", default="", help="suffix of the output files (pareto<tag>.json, .md, .png)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    named = {"default": DEFAULT_ROWS, "all": list(ROWS), "quant2": QUANT2_ROWS}
    names = named[args.rows] if args.rows in named else args.rows.split(",")
    unknown = [name for name in names if name not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    ensure_minilm(args.minilm)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.minilm / "model.onnx"
    model = io.load_model(model_path)
    evaluation = dict(np.load(args.minilm / "eval.npz"))
    feeds = {name: value[: args.batch] for name, value in evaluation.items()}  # [32, 64] each
    config = CalibrateConfig(batch_size=64)
    batches, count = batch_source(args.minilm / "calib.npz", model, config)
    statistics = calibrate(model, batches, config, total_batches=count)
    # --bits-per-weight measures each site's sensitivity on two batches: 2 × 16 calibration sentences here.
    sensitivity_batches, _ = batch_source(args.minilm / "calib.npz", model, CalibrateConfig(batch_size=16))
    context = {"model": model, "statistics": statistics, "batches": batches,
               "sensitivity_batches": sensitivity_batches}
    linear_fp32 = sum(site.dense_bytes for site in find_sites(model).sites)
    other_bytes = io.count_bytes(model) - linear_fp32
    reference = embed(model, evaluation, args.threads)
    reference_neighbours = nearest_neighbours(reference)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pareto-") as scratch:
        paths = {}
        for name in names:
            label, build, base = ROWS[name]
            out = Path(scratch) / f"{name}.onnx"
            extra = build(model_path, out, context)
            paths[name] = out
            candidate = embed(str(out), evaluation, args.threads)
            timing = time_models(model_path, out, feeds, "cpu", args.warmup, args.iters, args.threads)
            row = {
                "name": name,
                "label": label,
                "mean_cosine": mean_cosine(reference, candidate),
                "nn_agreement": float(np.mean(nearest_neighbours(candidate) == reference_neighbours)),
                "linear_bytes": linear_bytes(onnx.load(str(out)), other_bytes) / linear_fp32,
                "speedup": timing.speedup,
                "speedup_p10_p90": [timing.speedup_p10, timing.speedup_p90],
                "fp32_ms": timing.original.p50_ms,
                "ms": timing.rewritten.p50_ms,
                **extra,
            }
            if base is not None and base not in paths:
                row["vs_base"] = None  # its base row was not run
            elif base is not None:
                against = time_models(paths[base], out, feeds, "cpu", args.warmup, args.iters, args.threads)
                row["vs_base"] = {"base": base, "speedup": against.speedup,
                                  "p10_p90": [against.speedup_p10, against.speedup_p90]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "model": "all-MiniLM-L6-v2 (36 constant MatMuls), mean-pooled sentence_embedding",
        "evaluation_sentences": int(len(evaluation["input_ids"])),
        "calibration": str(args.minilm / "calib.npz"),
        "linear_fp32_bytes": linear_fp32,
        "timing": {"batch": args.batch, "sequence": int(feeds["input_ids"].shape[1]), "threads": args.threads,
                   "iters": args.iters, "warmup": args.warmup, "spinning": False},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "onnxruntime": __import__("onnxruntime").__version__,
        "rows": rows,
    }
    stem = f"pareto{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out / f"{stem}.md")
    plot(rows, args.out / f"{stem}.png")
    print(f"wrote {args.out / stem}.json, .md and .png")
    return 0


def write_markdown(summary: dict, path: Path) -> None:
    timing = summary["timing"]
    lines = [
        f"# Pareto: {summary['model']}",
        "",
        f"{summary['evaluation_sentences']} held-out sentences; bytes of the linear layers relative to fp32 "
        f"({summary['linear_fp32_bytes']:,} B); CPU speedup A/B against fp32 in one process, batch "
        f"{timing['batch']} × sequence {timing['sequence']}, {timing['threads']} threads, no spinning, "
        f"{timing['iters']} rounds; onnxruntime {summary['onnxruntime']}.",
        "",
        "| model | cosine | nn-agreement | bytes | CPU speedup (p10–p90) | vs its int4 base |",
        "|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        low, high = row["speedup_p10_p90"]
        base = row.get("vs_base")
        against = f"{base['speedup']:.2f}×" if base else ""
        lines.append(
            f"| {row['label']} | {row['mean_cosine']:.4f} | {row['nn_agreement']:.3f} | {row['linear_bytes']:.3f} | "
            f"{row['speedup']:.2f}× ({low:.2f}–{high:.2f}) | {against} |"
        )
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        marker = "s" if row["name"].startswith("ort") else "o"
        for axis, key in zip(axes, ("linear_bytes", "speedup"), strict=True):
            axis.scatter(row[key], row["mean_cosine"], marker=marker)
            axis.annotate(row["name"].replace("onnxsvd_", "").replace("ort_", "ORT "), (row[key], row["mean_cosine"]),
                          fontsize=7, xytext=(3, 3), textcoords="offset points")
    axes[0].set_xlabel("bytes of the linear layers / fp32")
    axes[1].set_xlabel("CPU speedup against fp32 (A/B)")
    for axis in axes:
        axis.set_ylabel("mean cosine of sentence embeddings")
        axis.grid(alpha=0.3)
    figure.suptitle("MiniLM-L6: ONNX Runtime's quantizers (squares) and onnxsvd's quantized rewrite (circles)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())

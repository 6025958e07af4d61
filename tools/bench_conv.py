"""Conv benchmark (issue 13): top-1 accuracy of the character ResNet against kept conv parameters, and CPU speed.

On ``models/chars_resnet.onnx`` (tools/make_char_cnn.py: 20 classes, 21 Conv layers), every Conv site
is rewritten through the library (``onnxsvd.rewrite`` / ``rewrite_sequential`` / ``finetune``) for each
conv form (``--conv channel|spatial|auto``), each kept ratio and each method:

- ``svd``: plain truncated SVD, data-free;
- ``whiten``: whitened SVD in the metric of the Conv's input patches (``calibrate`` on ``chars_calib.npz``);
- ``whiten+sequential``: the same, level by level against the partly compressed model's own activations;
- ``whiten+sequential+finetune``: then distilled from the dense model (``onnxsvd finetune``) on
  ``--finetune-samples`` extra rendered images (no labels used; disjoint draws from train/calib/eval).

Rows beside them: the dense model and ONNX Runtime's static int8 QDQ quantization
(``quantize_static``, per-channel weights, a ``CalibrationDataReader`` over ``chars_calib.npz``), whose
conv weights take 25% of fp32's bytes (the ratio-0.25 rows have the same conv bytes in fp32).

Accuracy: top-1 on the 2000 images of ``chars_eval.npz`` through ONNX Runtime on CPU. Kept conv
parameters: the Conv sites' values after (factors, or the weight for a site kept dense) over before, from
the rewrite report. Speed: each rewrite (one per conv form and ratio; the method does not change the
ranks) timed against the dense model alternately (A B A B …) in one process with non-spinning sessions
(``onnxsvd.validate.latency.time_models``), batch ``--batch``, ``--threads`` intra-op threads, against the
FLOP bound ``1 / ((1 − s) + s·ρ)`` (``s``: the Conv sites' share of the dense model's node time in an
ONNX Runtime profile; ``ρ``: the FLOPs their chains keep, from the shapes of the graph).

Writes ``conv.json``, ``conv.md`` and ``conv.png`` under ``--out`` (default docs/results).

    python tools/bench_conv.py [--ratios 0.25,0.5,0.7] [--conv channel,spatial]
        [--methods svd,whiten,whiten+sequential,whiten+sequential+finetune] [--finetune-ratios 0.5]
        [--threads 2] [--batch 128] [--iters 40] [--align 1]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
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
from onnxsvd.finetune import FinetuneConfig, finetune
from onnxsvd.validate import open_session, time_models
from onnxsvd.validate.profile import profile_original

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

OUTPUT = "logits"
METHODS = ("svd", "whiten", "whiten+sequential", "whiten+sequential+finetune")


def accuracy(model: onnx.ModelProto | str | Path, images: np.ndarray, labels: np.ndarray, threads: int) -> float:
    """Top-1 accuracy through ONNX Runtime on CPU, in batches of 500."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    predictions = [
        session.run([OUTPUT], {"input": images[start : start + 500]})[0].argmax(axis=1)
        for start in range(0, len(images), 500)
    ]
    return float(np.mean(np.concatenate(predictions) == labels))


def conv_output_positions(model: onnx.ModelProto, batch: int) -> dict[str, int]:
    """Output positions (``batch·H_out·W_out``) of every Conv node, by name, from ONNX shape inference."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        value.name: [dim.dim_value for dim in value.type.tensor_type.shape.dim]
        for value in list(inferred.graph.value_info) + list(inferred.graph.output)
    }
    positions = {}
    for node in inferred.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes:
            dims = shapes[node.output[0]]
            positions[node.name] = batch * int(np.prod(dims[2:]))
    return positions


def conv_macs(model: onnx.ModelProto, batch: int) -> dict[str, int]:
    """Multiply-accumulates of every Conv node on a batch: ``positions · N · C/g · k_h · k_w``."""
    weights = {tensor.name: tuple(tensor.dims) for tensor in model.graph.initializer}
    positions = conv_output_positions(model, batch)
    macs = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[1] in weights and node.name in positions:
            macs[node.name] = positions[node.name] * int(np.prod(weights[node.input[1]]))
    return macs


def conv_time_share(path: Path, feeds: dict, threads: int, runs: int = 10) -> dict:
    """The share of the dense model's node time in Conv kernels (any fused or NCHWc form), per profiled run.

    Every Conv of the model is a site, so kernels are matched by op (``Conv``, ``FusedConv``, NCHWc
    ``Conv``) rather than by node name: ONNX Runtime's NCHWc transformer renames the Convs it rewrites.
    """
    profile = profile_original(path, feeds, "cpu", threads, runs=runs)
    bounds = sorted((event["ts"], event["ts"] + event.get("dur", 0)) for event in profile.events
                    if event.get("cat") == "Session" and event.get("name") == "model_run")[profile.warmup :]
    conv_us = [0.0] * len(bounds)
    total_us = [0.0] * len(bounds)
    for event in profile.events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        for run, (begin, end) in enumerate(bounds):
            if begin <= event.get("ts", 0) <= end:
                total_us[run] += event.get("dur", 0)
                if "Conv" in str(event.get("args", {}).get("op_name", "")):
                    conv_us[run] += event.get("dur", 0)
                break
    shares = [conv / total for conv, total in zip(conv_us, total_us, strict=True) if total > 0]
    return {"share": float(np.median(shares)), "per_run": shares}


def conv_parameters(report: onnxsvd.RewriteReport) -> tuple[int, int]:
    """Values of the Conv sites' weights before and after (factors when factorized, the weight when kept)."""
    sites = [site for site in report.sites if site.op_type == "Conv" and site.shape]
    before = sum(site.params_before for site in sites)
    after = sum(site.params_after if site.action == "factorized" else site.params_before for site in sites)
    return before, after


def qdq_model(model_path: Path, calib_images: np.ndarray, out: Path) -> None:
    """ONNX Runtime's static int8 QDQ quantization (per-channel weights, MinMax calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            starts = range(0, len(calib_images), 64)
            self.batches = iter([{"input": calib_images[start : start + 64]} for start in starts])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    prepared = out.with_suffix(".pre.onnx")
    quant_pre_process(str(model_path), str(prepared))
    quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


class Bench:
    """The model, its data and calibration, shared by every row."""

    def __init__(self, args: argparse.Namespace, calibrated: bool = True) -> None:
        self.args = args
        self.model_path: Path = args.model
        self.model = io.load_model(self.model_path)
        with np.load(args.eval) as archive:
            self.eval_images, self.eval_labels = archive["input"], archive["labels"]
        with np.load(args.calib) as archive:
            self.calib_images = archive["input"]
        config = CalibrateConfig(batch_size=64)
        self.batches, count = batch_source(args.calib, self.model, config)
        tick = time.perf_counter()
        self.statistics = calibrate(self.model, self.batches, config, total_batches=count) if calibrated else None
        self.calibrate_seconds = time.perf_counter() - tick if calibrated else None
        self.finetune_path: Path | None = None
        self.cache: dict = {}
        self.dense_macs = conv_macs(self.model, args.batch)
        self.feeds = {"input": self.eval_images[: args.batch]}
        self.share = conv_time_share(self.model_path, self.feeds, args.threads)

    def _sites(self):
        from onnxsvd.graph import find_sites

        return [site for site in find_sites(self.model).sites if site.op_type == "Conv"]

    def finetune_data(self, scratch: Path) -> Path:
        """Render ``--finetune-samples`` unlabelled images (a seed no other set uses) once."""
        if self.finetune_path is None:
            from make_char_cnn import CLASSES, find_fonts, render_characters

            count = self.args.finetune_samples
            labels = np.arange(count, dtype=np.int64) % len(CLASSES)
            images = render_characters(labels, find_fonts(), seed=1000)
            self.finetune_path = scratch / "finetune.npz"
            np.savez(self.finetune_path, input=images)
        return self.finetune_path

    def rewrite(self, conv: str, ratio: float, method: str, scratch: Path) -> tuple[onnx.ModelProto, dict]:
        base, *flags = method.split("+")
        policy = onnxsvd.RankPolicy("ratio", ratio, align=self.args.align, min_rank=1)
        config = onnxsvd.RewriteConfig(policy=policy, method=base, conv=conv)
        key = (conv, ratio, base, "sequential" in flags)
        tick = time.perf_counter()
        if key in self.cache:  # +finetune starts from the rewrite of the row without it
            result = self.cache[key]
        elif "sequential" in flags:
            result = onnxsvd.rewrite_sequential(self.model, config, self.batches)
        else:
            result = onnxsvd.rewrite(self.model, config, self.statistics if base != "svd" else None)
        self.cache = {key: result}
        extra: dict = {"rewrite_seconds": time.perf_counter() - tick}
        rewritten = result.model
        if "finetune" in flags:
            extra["accuracy_before_finetune"] = accuracy(rewritten, self.eval_images, self.eval_labels,
                                                         self.args.threads)
            tuning = FinetuneConfig(steps=self.args.finetune_steps, lr=self.args.finetune_lr,
                                    threads=self.args.threads, batch_size=64)
            tick = time.perf_counter()
            tuned = finetune(rewritten, self.model, dict(np.load(self.finetune_data(scratch))), tuning)
            rewritten = tuned.model
            extra.update(finetune_seconds=time.perf_counter() - tick, finetune_steps_run=tuned.report.steps_run,
                         finetune_best_step=tuned.report.best_step, heldout_before=tuned.report.heldout_before,
                         heldout_after=tuned.report.heldout_after)
        before, after = conv_parameters(result.report)
        convs = [site for site in result.report.sites if site.op_type == "Conv"]
        extra.update(kept_conv_params=after / before,
                     conv_sites_kept_dense={site.name: site.reason for site in convs if site.action != "factorized"},
                     ranks={site.name: site.rank for site in convs})
        return rewritten, extra

    def speed(self, path: Path, rewritten: onnx.ModelProto) -> dict:
        """Alternating A/B against the dense model, and the FLOP bound from the dense profile."""
        after = conv_macs(rewritten, self.args.batch)
        before_total = sum(self.dense_macs.values())
        after_total = sum(after.values())
        kept_flops = after_total / before_total
        share = self.share["share"]
        bound = 1.0 / ((1.0 - share) + share * kept_flops)
        sessions = (open_session(self.model_path, "cpu", self.args.threads),
                    open_session(path, "cpu", self.args.threads))
        timing = time_models(self.model_path, path, self.feeds, "cpu", warmup=10, iters=self.args.iters,
                             threads=self.args.threads, sessions=sessions)
        return {"speedup": timing.speedup, "speedup_p10_p90": [timing.speedup_p10, timing.speedup_p90],
                "dense_ms": timing.original.p50_ms, "ms": timing.rewritten.p50_ms, "kept_conv_flops": kept_flops,
                "bound": bound, "fraction_of_bound": timing.speedup / bound, "load_average": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "chars_resnet.onnx")
    parser.add_argument("--calib", type=Path, default=ROOT / "models" / "chars_calib.npz")
    parser.add_argument("--eval", type=Path, default=ROOT / "models" / "chars_eval.npz")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--ratios", default="0.25,0.5,0.7")
    parser.add_argument("--conv", default="channel,spatial", help="conv forms, comma-separated")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--align", type=int, default=1, help="rank alignment (1: ranks exactly at the ratio)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=40)
    parser.add_argument("--finetune-ratios", default="0.5", help="ratios that get the +finetune rows")
    parser.add_argument("--finetune-samples", type=int, default=4000)
    parser.add_argument("--finetune-steps", type=int, default=FinetuneConfig().steps)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneConfig().lr)
    parser.add_argument("--rows-from", type=Path, default=None,
                        help="render the JSON rows (one per line) of an earlier run's log or partial file instead "
                             "of measuring them")
    parser.add_argument("--tag", default="", help="suffix of the output files (conv<tag>.json, .md, .png)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    methods = args.methods.split(",")
    unknown = [method for method in methods if method not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    finetune_ratios = {float(value) for value in args.finetune_ratios.split(",")}
    bench = Bench(args, calibrated=args.rows_from is None)
    dense_accuracy = accuracy(bench.model_path, bench.eval_images, bench.eval_labels, args.threads)
    conv_weights = {site.name: site.dense_bytes for site in bench._sites()}
    print(f"dense: accuracy {dense_accuracy:.4f}; conv share of node time {bench.share['share']:.3f}", flush=True)
    rows: list[dict] = []
    if args.rows_from is not None:  # render rows measured by an earlier (interrupted) run
        rows = [json.loads(line) for line in args.rows_from.read_text().splitlines() if line.startswith("{")]
    else:
        with tempfile.TemporaryDirectory(prefix="bench-conv-") as scratch_name:
            scratch = Path(scratch_name)
            qdq_path = scratch / "qdq.onnx"
            qdq_model(bench.model_path, bench.calib_images, qdq_path)
            qdq = {"name": "ort-int8-qdq", "method": "ORT quantize_static QDQ int8 (per-channel weights)",
                   "conv": None, "ratio": None, "kept_conv_params": 1.0, "conv_bytes": 0.25,
                   "accuracy": accuracy(qdq_path, bench.eval_images, bench.eval_labels, args.threads)}
            qdq.update(bench.speed(qdq_path, bench.model))
            qdq.pop("bound"), qdq.pop("fraction_of_bound"), qdq.pop("kept_conv_flops")
            rows.append(qdq)
            print(json.dumps(qdq), flush=True)
            for conv in args.conv.split(","):
                for ratio in [float(value) for value in args.ratios.split(",")]:
                    timed = False
                    for method in methods:
                        if "finetune" in method and ratio not in finetune_ratios:
                            continue
                        rewritten, extra = bench.rewrite(conv, ratio, method, scratch)
                        path = scratch / f"{conv}-{ratio}-{method}.onnx"
                        io.save_model(rewritten, path)
                        row = {"name": f"{method} {conv} {ratio}", "method": method, "conv": conv, "ratio": ratio,
                               "accuracy": accuracy(path, bench.eval_images, bench.eval_labels, args.threads),
                               "conv_bytes": extra["kept_conv_params"], **extra}
                        if not timed:  # the ranks depend on the ratio alone: time one rewrite per form and ratio
                            row.update(bench.speed(path, rewritten))
                            timed = True
                        rows.append(row)
                        print(json.dumps({key: value for key, value in row.items() if key != "ranks"}), flush=True)
                        with open(args.out / f"conv{args.tag}.partial.jsonl", "a") as partial:
                            partial.write(json.dumps(row) + "\n")
    summary = {
        "model": "models/chars_resnet.onnx (20 classes, 21 Conv + 1 Gemm; tools/make_char_cnn.py)",
        "dense_accuracy": dense_accuracy,
        "eval_images": int(len(bench.eval_labels)),
        "calibration_images": int(len(bench.calib_images)),
        "calibrate_seconds": bench.calibrate_seconds,
        "conv_weight_bytes_fp32": int(sum(conv_weights.values())),
        "conv_share_of_time": bench.share["share"],
        "align": args.align,
        "timing": {"batch": args.batch, "threads": args.threads, "iters": args.iters, "spinning": False,
                   "alternating": True},
        "finetune": {"ratios": sorted(finetune_ratios), "samples": args.finetune_samples,
                     "steps": args.finetune_steps, "lr": args.finetune_lr, "batch_size": 64},
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "onnxruntime": __import__("onnxruntime").__version__,
        "rows": rows,
    }
    stem = f"conv{args.tag}"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out / f"{stem}.md")
    plot(summary, args.out / f"{stem}.png")
    print((args.out / f"{stem}.md").read_text())
    return 0


def write_markdown(summary: dict, path: Path) -> None:
    dense = summary["dense_accuracy"]
    timing = summary["timing"]
    lines = [
        f"{summary['model']}: top-1 on {summary['eval_images']} evaluation images; dense {dense:.4f}. "
        f"Calibration on {summary['calibration_images']} images"
        + (f" ({summary['calibrate_seconds']:.1f} s). " if summary["calibrate_seconds"] is not None else ". ")
        +
        f"Speed: batch {timing['batch']}, {timing['threads']} threads, A/B alternating against dense, "
        f"non-spinning sessions; Conv share of dense node time {summary['conv_share_of_time']:.2f}.",
        "",
        "| row | conv form | kept conv params | conv bytes | top-1 | Δ vs dense (points) | speedup (p10–p90) "
        "| FLOP bound | of bound | load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        speed = (f"{row['speedup']:.2f}× ({row['speedup_p10_p90'][0]:.2f}–{row['speedup_p10_p90'][1]:.2f})"
                 if "speedup" in row else "")
        bound = f"{row['bound']:.2f}×" if "bound" in row else ""
        fraction = f"{row['fraction_of_bound']:.0%}" if "fraction_of_bound" in row else ""
        load = f"{row['load_average']:.1f}" if "load_average" in row else ""
        label = row["method"] if row["ratio"] is None else f"{row['method']} @ {row['ratio']}"
        if "accuracy_before_finetune" in row:
            label += f" (from {row['accuracy_before_finetune']:.4f})"
        lines.append(f"| {label} | {row['conv'] or '-'} | {row['kept_conv_params']:.1%} | {row['conv_bytes']:.1%} "
                     f"| {row['accuracy']:.4f} | {100 * (row['accuracy'] - dense):+.2f} | {speed} | {bound} "
                     f"| {fraction} | {load} |")
    lines += ["", "Conv bytes: of the fp32 conv weights (int8 QDQ stores them in 25%: compare it with the 0.25 rows). "
              "Speed is timed once per form and ratio (the method does not change the ranks); load: the machine's "
              "1-minute load average at that moment (2 cores)."]
    path.write_text("\n".join(lines) + "\n")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key in dict.fromkeys((row["method"], row["conv"]) for row in rows if row["ratio"] is not None):
        points = sorted((row["kept_conv_params"], row["accuracy"]) for row in rows
                        if (row["method"], row["conv"]) == key)
        left.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{key[0]} ({key[1]})")
    left.axhline(summary["dense_accuracy"], color="black", linestyle="--", label="dense fp32")
    for row in rows:
        if row["ratio"] is None:
            left.scatter([row["conv_bytes"]], [row["accuracy"]], marker="*", s=120, color="red",
                         label="ORT int8 QDQ (x = bytes)")
    left.set_xlabel("kept fraction of conv parameters (QDQ: of conv bytes)")
    left.set_ylabel("top-1 accuracy")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    timed = [row for row in rows if "bound" in row]
    for conv in dict.fromkeys(row["conv"] for row in timed):
        points = sorted((row["bound"], row["speedup"]) for row in timed if row["conv"] == conv)
        right.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=conv)
    top = max([row["bound"] for row in timed] + [1.0])
    right.plot([1, top], [1, top], color="gray", linestyle=":", label="bound")
    right.plot([1, top], [0.9, 0.9 * top], color="gray", linestyle="--", label="90% of bound")
    right.set_xlabel("FLOP bound 1/((1-s)+s·ρ)")
    right.set_ylabel("measured CPU speedup (A/B)")
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    figure.suptitle("chars_resnet: Conv low-rank rewrites")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

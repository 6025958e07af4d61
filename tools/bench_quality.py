"""Quality benchmark: MiniLM-L6 sentence embeddings after low-rank rewrites, per method and ratio.

Exports MiniLM-L6 (tools/export_minilm.py) if needed, calibrates on 256 English sentences, and for every
ratio and method rewrites the model and compares mean-pooled sentence embeddings on 512 other sentences:
mean cosine to the original and nearest-neighbour agreement (the share of sentences whose nearest other
sentence is the same as with the original model). Writes JSON, a markdown table and a PNG plot.

    python tools/bench_quality.py [--out docs/results] [--ratios 0.3,0.5,0.7,0.9]
        [--methods svd,asvd,whiten,whiten+sequential,whiten+global] [--threads 2]

``+global`` is ``--allocate global``: the ratio is then the kept fraction of all linear layers together,
ranks chosen by whitened discarded energy times each site's measured sensitivity. ``+finetune`` rows are
calibrated and fine-tuned (``onnxsvd finetune``) on ``--finetune-data``; ``+activations`` adds the matched
site activations to the fine-tuning loss (``--match-activations``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

# onnxsvd first: it sets OpenBLAS's idle-thread timeout before numpy loads, as it does for the CLI.
import onnxsvd

# isort: split
import numpy as np
import onnx

from onnxsvd.calibrate import CalibrateConfig, batch_source, calibrate
from onnxsvd.calibrate.collect import find_mask_input, session_for
from onnxsvd.finetune import FinetuneConfig, finetune
from onnxsvd.pipeline.sequential import rewrite_sequential

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = "sentence_embedding"


def ensure_minilm(folder: Path) -> None:
    """Export MiniLM-L6 and its data with tools/export_minilm.py unless already there."""
    if all((folder / name).exists() for name in ("model.onnx", "calib.npz", "eval.npz")):
        return
    subprocess.run([sys.executable, str(ROOT / "tools" / "export_minilm.py"), "--out", str(folder)], check=True)


def embed(model: onnx.ModelProto | str, data: dict[str, np.ndarray], threads: int, batch: int = 64) -> np.ndarray:
    """Sentence embeddings ``[S, D]`` through ONNX Runtime on CPU."""
    session = session_for(model, threads=threads)
    names = {value.name for value in session.get_inputs()}
    count = len(next(iter(data.values())))
    parts = []
    for start in range(0, count, batch):
        feed = {name: value[start : start + batch] for name, value in data.items() if name in names}
        parts.append(session.run([OUTPUT], feed)[0])
    return np.concatenate(parts)


def mean_cosine(reference: np.ndarray, candidate: np.ndarray) -> float:
    dot = np.sum(reference * candidate, axis=1)
    norms = np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    return float(np.mean(dot / np.maximum(norms, 1e-12)))


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argmax(similarity, axis=1)


def linear_params(report: onnxsvd.RewriteReport) -> tuple[int, int]:
    """Parameters of the constant-weight MatMul/Gemm layers before and after."""
    before = sum(site.params_before for site in report.sites if site.shape)
    after = sum(site.params_after for site in report.sites if site.shape)
    return before, after


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--ratios", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--methods", default="svd,asvd,whiten,whiten+sequential,whiten+global")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--damping", type=float, default=1e-2)
    parser.add_argument("--finetune-data", type=Path, default=None,
                        help="samples for +finetune rows (calibration, sensitivities and fine-tuning; 10%% held "
                             "out); default: calib_2000.npz beside the model")
    parser.add_argument("--finetune-steps", type=int, default=FinetuneConfig().steps)
    parser.add_argument("--finetune-lr", type=float, default=FinetuneConfig().lr)
    parser.add_argument("--finetune-train", default=FinetuneConfig().train, choices=["core", "factors"])
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of an existing quality.json for the (method, ratio) pairs not run now")
    parser.add_argument("--timing-only", action="store_true",
                        help="only time calibration against the model, and the sequential rewrite at 0.5, "
                             "three times each on a quiet machine; writes timing.json/.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    ensure_minilm(args.minilm)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.minilm / "model.onnx"
    model = onnxsvd.io.load_model(model_path)
    calib = dict(np.load(args.minilm / "calib.npz"))
    evaluation = dict(np.load(args.minilm / "eval.npz"))

    if args.timing_only:
        return timing(args, model, model_path, calib)
    tick = time.perf_counter()
    embed(model_path.as_posix(), calib, args.threads)
    model_seconds = time.perf_counter() - tick
    config = CalibrateConfig(batch_size=64)
    batches, count = batch_source(args.minilm / "calib.npz", model, config)
    tick = time.perf_counter()
    statistics = calibrate(model, batches, config, total_batches=count)
    calibrate_seconds = time.perf_counter() - tick
    print(f"calibration of {len(calib['input_ids'])} sentences: {calibrate_seconds:.1f} s; "
          f"running the model on them: {model_seconds:.1f} s ({calibrate_seconds / model_seconds:.2f}×)", flush=True)

    reference = embed(model, evaluation, args.threads)
    reference_neighbours = nearest_neighbours(reference)
    tuning = Tuning(args, model)
    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            base, *flags = method.split("+")
            unknown = set(flags) - {"sequential", "global", "finetune", "activations"}
            if unknown:
                parser.error(f"unknown method variant(s) {sorted(unknown)} in {method!r}")
            if "activations" in flags and "finetune" not in flags:
                parser.error(f"'+activations' (fine-tuning with matched activations) needs '+finetune' in {method!r}")
            rewrite_config = onnxsvd.RewriteConfig(
                policy=onnxsvd.RankPolicy("ratio", ratio),
                method=base,
                damping=args.damping,
                allocate="global" if "global" in flags else "uniform",
            )
            # Fine-tuned rows start from a rewrite calibrated on the fine-tuning set (issue 6: ~2,000 sentences).
            method_statistics, method_batches = (
                tuning.calibration() if "finetune" in flags else (statistics, batches)
            )
            tick = time.perf_counter()
            if "sequential" in flags:
                result = rewrite_sequential(
                    model, rewrite_config, method_batches, mask_input=find_mask_input(model)
                )
            else:
                result = onnxsvd.rewrite(
                    model,
                    rewrite_config,
                    method_statistics if base != "svd" else None,
                    batches=method_batches if "global" in flags else None,
                )
            seconds = time.perf_counter() - tick
            rewritten, extra = result.model, {}
            if "finetune" in flags:
                start = embed(rewritten, evaluation, args.threads)
                rewritten, extra = tuning.finetune(rewritten, match_activations="activations" in flags)
                extra["before_finetune"] = {
                    "mean_cosine": mean_cosine(reference, start),
                    "nn_agreement": float(np.mean(nearest_neighbours(start) == reference_neighbours)),
                }
            candidate = embed(rewritten, evaluation, args.threads)
            before, after = linear_params(result.report)
            row = {
                "method": method,
                "ratio": ratio,
                "kept_linear_params": after / before,
                "kept_model_params": result.report.params_after / result.report.params_before,
                "mean_cosine": mean_cosine(reference, candidate),
                "nn_agreement": float(np.mean(nearest_neighbours(candidate) == reference_neighbours)),
                "rewrite_seconds": seconds,
                **extra,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(args.out / "quality.partial.jsonl", "a") as partial:  # survives an interrupted run
                partial.write(json.dumps(row) + "\n")
    if args.merge and (args.out / "quality.json").exists():
        fresh = {(row["method"], row["ratio"]) for row in rows}
        kept = [row for row in json.loads((args.out / "quality.json").read_text())["rows"]
                if (row["method"], row["ratio"]) not in fresh]
        rows = kept + rows

    summary = {
        "model": "all-MiniLM-L6-v2 (36 constant MatMuls), mean-pooled sentence_embedding",
        "calibration_sentences": int(len(calib["input_ids"])),
        "evaluation_sentences": int(len(evaluation["input_ids"])),
        "calibrate_seconds": calibrate_seconds,
        "model_seconds_on_calibration": model_seconds,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, threads={args.threads}",
        "damping": args.damping,
        "finetune": tuning.describe(),
        "rows": rows,
    }
    (args.out / "quality.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out / "quality.md")
    plot(rows, args.out / "quality.png")
    print((args.out / "quality.md").read_text())
    return 0


class Tuning:
    """The ``+finetune`` rows' data (calibrated once, on first use) and fine-tuning."""

    def __init__(self, args: argparse.Namespace, model: onnx.ModelProto) -> None:
        self.args, self.model = args, model
        self.path = args.finetune_data or args.minilm / "calib_2000.npz"
        self.cached: tuple | None = None

    def calibration(self) -> tuple:
        if self.cached is None:
            config = CalibrateConfig(batch_size=64)
            batches, count = batch_source(self.path, self.model, config)
            self.cached = (calibrate(self.model, batches, config, total_batches=count), batches)
        return self.cached

    def finetune(self, rewritten: onnx.ModelProto, match_activations: bool = False) -> tuple[onnx.ModelProto, dict]:
        config = FinetuneConfig(train=self.args.finetune_train, steps=self.args.finetune_steps,
                                lr=self.args.finetune_lr, threads=self.args.threads,
                                match_activations=match_activations)
        tick = time.perf_counter()
        result = finetune(rewritten, self.model, dict(np.load(self.path)), config)
        report = result.report
        return result.model, {
            "finetune_seconds": time.perf_counter() - tick,
            "finetune_steps_run": report.steps_run,
            "finetune_best_step": report.best_step,
            "heldout_before": report.heldout_before,
            "heldout_after": report.heldout_after,
        }

    def describe(self) -> dict:
        return {"data": self.path.name, "train": self.args.finetune_train, "steps": self.args.finetune_steps,
                "lr": self.args.finetune_lr}


def timing(args: argparse.Namespace, model: onnx.ModelProto, model_path: Path, calib: dict) -> int:
    """Calibration against plain inference (alternating, three rounds), and the sequential rewrite."""
    config = CalibrateConfig(batch_size=64)
    batches, count = batch_source(args.minilm / "calib.npz", model, config)
    rounds = []
    for _ in range(3):
        tick = time.perf_counter()
        embed(model_path.as_posix(), calib, args.threads)
        model_seconds = time.perf_counter() - tick
        tick = time.perf_counter()
        calibrate(model, batches, config, total_batches=count)
        rounds.append({"model_seconds": model_seconds, "calibrate_seconds": time.perf_counter() - tick})
    tick = time.perf_counter()
    rewrite_config = onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("ratio", 0.5), method="whiten")
    rewrite_sequential(model, rewrite_config, batches, mask_input=find_mask_input(model))
    sequential_seconds = time.perf_counter() - tick
    summary = {
        "rounds": rounds,
        "median_ratio": float(np.median([r["calibrate_seconds"] / r["model_seconds"] for r in rounds])),
        "sequential_rewrite_seconds_ratio_0.5": sequential_seconds,
        "load_average": os.getloadavg(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    (args.out / "timing.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"MiniLM-L6, {len(calib['input_ids'])} calibration sentences ({summary['machine']}, load average at the end "
        f"{summary['load_average'][0]:.2f}).",
        "",
        "| round | model s | calibrate s | ratio |",
        "|---|---|---|---|",
    ]
    for i, r in enumerate(rounds, 1):
        lines.append(f"| {i} | {r['model_seconds']:.1f} | {r['calibrate_seconds']:.1f} "
                     f"| {r['calibrate_seconds'] / r['model_seconds']:.2f}× |")
    lines += ["", f"Median ratio {summary['median_ratio']:.2f}×. Sequential whitened rewrite at ratio 0.5: "
              f"{sequential_seconds:.0f} s."]
    (args.out / "timing.md").write_text("\n".join(lines) + "\n")
    print((args.out / "timing.md").read_text())
    return 0


def write_markdown(summary: dict, path: Path) -> None:
    methods = list(dict.fromkeys(row["method"] for row in summary["rows"]))
    ratios = sorted({row["ratio"] for row in summary["rows"]})
    lookup = {(row["method"], row["ratio"]): row for row in summary["rows"]}
    lines = [
        f"MiniLM-L6, {summary['calibration_sentences']} calibration / {summary['evaluation_sentences']} evaluation "
        "sentences; mean cosine of sentence embeddings to the original (nearest-neighbour agreement).",
        "",
        "| kept linear params | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for ratio in ratios:
        cells = []
        for method in methods:
            row = lookup.get((method, ratio))
            cells.append(f"{row['mean_cosine']:.3f} ({row['nn_agreement']:.2f})" if row else "-")
        kept = next(lookup[(m, ratio)]["kept_linear_params"] for m in methods if (m, ratio) in lookup)
        lines.append(f"| {kept:.0%} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Calibration: {summary['calibrate_seconds']:.1f} s against {summary['model_seconds_on_calibration']:.1f} s "
        f"to run the model on the same sentences ({summary['machine']}).",
        "",
        "| method | ratio | rewrite seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {row['method']} | {row['ratio']} | {row['rewrite_seconds']:.1f} |" for row in summary["rows"]]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(row["method"] for row in rows):
        points = sorted((row["kept_linear_params"], row["mean_cosine"]) for row in rows if row["method"] == method)
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=method)
    axis.set_xlabel("kept fraction of the linear layers' parameters")
    axis.set_ylabel("mean cosine to the original embedding")
    axis.set_title("MiniLM-L6: fidelity against kept parameters")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    sys.exit(main())

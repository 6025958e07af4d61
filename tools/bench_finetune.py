"""Fine-tuning benchmark: MiniLM-L6 whitened at a kept ratio, then ``onnxsvd finetune`` with each trained form.

For every ratio, rewrites MiniLM-L6 with whitening calibrated on the 2,000-sentence set (cached under
``--work``), fine-tunes the rewritten model against the original on the same 2,000 sentences (10% held
out for early stopping) with ``--train core`` and ``--train factors``, and compares the mean-pooled
sentence embeddings of 512 other sentences with the original's: mean cosine and nearest-neighbour
agreement (the share of sentences whose nearest other sentence is the same as with the original).
Writes ``finetune.json`` and ``finetune.md`` (``--tag`` names them otherwise).

    python tools/bench_finetune.py [--ratios 0.5,0.9] [--forms core,factors] [--steps 400] [--threads 2]
        [--lr-core 1e-2] [--lr-factors 3e-3] [--out docs/results] [--work build/finetune]
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx

import onnxsvd
from onnxsvd.finetune import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from bench_quality import embed, ensure_minilm, linear_params, mean_cosine, nearest_neighbours  # noqa: E402

CALIBRATION = "calib_2000.npz"


def score(model: onnx.ModelProto | str, evaluation: dict, reference: np.ndarray, neighbours: np.ndarray,
          threads: int) -> dict:
    candidate = embed(model, evaluation, threads)
    return {
        "mean_cosine": mean_cosine(reference, candidate),
        "nn_agreement": float(np.mean(nearest_neighbours(candidate) == neighbours)),
    }


def rewritten_model(minilm: Path, work: Path, ratio: float, allocate: str = "uniform") -> tuple[Path, dict]:
    """The whitened rewrite at ``ratio`` with ``allocate`` ranks (made once, then reused), and its kept
    fractions."""
    stem = f"whiten_{ratio:g}" if allocate == "uniform" else f"whiten_{allocate}_{ratio:g}"
    path = work / f"{stem}.onnx"
    report_path = work / f"{stem}.json"
    if not path.exists() or not report_path.exists():
        tick = time.perf_counter()
        report = onnxsvd.rewrite_file(onnxsvd.RewriteJob(
            minilm / "model.onnx", path,
            onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("ratio", ratio), method="whiten", allocate=allocate),
            data=minilm / CALIBRATION,
        ))
        before, after = linear_params(report)
        info = {"kept_linear_params": after / before, "rewrite_seconds": time.perf_counter() - tick}
        report_path.write_text(json.dumps(info, indent=2) + "\n")
    return path, json.loads(report_path.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "finetune")
    parser.add_argument("--ratios", default="0.5,0.9")
    parser.add_argument("--forms", default="core,factors")
    parser.add_argument("--steps", type=int, default=FinetuneConfig().steps)
    parser.add_argument("--batch-size", type=int, default=FinetuneConfig().batch_size)
    parser.add_argument("--lr-core", type=float, default=1e-2)
    parser.add_argument("--lr-factors", type=float, default=FinetuneConfig().lr)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--patience", type=int, default=FinetuneConfig().patience,
                        help="held-out evaluations (every 25 steps) without improvement before stopping")
    parser.add_argument("--augment", type=float, default=0.0,
                        help="FinetuneConfig.augment: share of tokens replaced in each training batch")
    parser.add_argument("--relation-weight", type=float, default=FinetuneConfig().relation_weight,
                        help="FinetuneConfig.relation_weight: weight of the pooled embeddings' similarity term")
    parser.add_argument("--match-activations", action=argparse.BooleanOptionalAction,
                        default=FinetuneConfig().match_activations,
                        help="FinetuneConfig.match_activations: also distil every site's output")
    parser.add_argument("--activation-weight", type=float, default=FinetuneConfig().activation_weight)
    parser.add_argument("--outputs", default="",
                        help="FinetuneConfig.outputs: outputs to distil, comma-separated (default: all)")
    parser.add_argument("--tag", default="finetune", help="stem of the JSON and markdown files written to --out")
    parser.add_argument("--allocate", default="uniform", choices=["uniform", "global"],
                        help="rank allocation of the whitened starting point")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    ensure_minilm(args.minilm)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    teacher = onnx.load(str(args.minilm / "model.onnx"))
    calibration = dict(np.load(args.minilm / CALIBRATION))
    evaluation = dict(np.load(args.minilm / "eval.npz"))
    reference = embed(teacher, evaluation, args.threads)
    neighbours = nearest_neighbours(reference)

    rows = []
    for ratio in [float(r) for r in args.ratios.split(",")]:
        path, info = rewritten_model(args.minilm, args.work, ratio, args.allocate)
        rewritten = onnx.load(str(path))
        row = {"ratio": ratio, **info, "whitened": score(rewritten, evaluation, reference, neighbours, args.threads)}
        print(json.dumps(row), flush=True)
        for form in args.forms.split(","):
            lr = args.lr_core if form == "core" else args.lr_factors
            config = FinetuneConfig(train=form, steps=args.steps, lr=lr, batch_size=args.batch_size,
                                    threads=args.threads, augment=args.augment, patience=args.patience,
                                    relation_weight=args.relation_weight,
                                    match_activations=args.match_activations,
                                    activation_weight=args.activation_weight,
                                    outputs=tuple(name for name in args.outputs.split(",") if name))
            tick = time.perf_counter()
            result = finetune(rewritten, teacher, calibration, config)
            seconds = time.perf_counter() - tick
            onnx.save(result.model, str(path.with_name(f"{path.stem}_{form}_{args.tag}.onnx")))
            report = result.report
            row[form] = {
                **score(result.model, evaluation, reference, neighbours, args.threads),
                "lr": lr,
                "seconds": seconds,
                "teacher_seconds": report.teacher_seconds,
                "train_seconds": report.train_seconds,
                "steps_run": report.steps_run,
                "best_step": report.best_step,
                "stopped_early": report.stopped_early,
                "heldout_before": report.heldout_before,
                "heldout_after": report.heldout_after,
                "trainable_parameters": report.trainable_parameters,
                "history": [[point.step, point.train_loss, point.heldout_loss, round(point.seconds, 1)]
                            for point in report.history],
            }
            print(json.dumps({"ratio": ratio, "form": form, **row[form]}), flush=True)
        rows.append(row)

    summary = {
        "model": "all-MiniLM-L6-v2 (36 constant MatMuls), mean-pooled sentence_embedding",
        "calibration_sentences": int(len(calibration["input_ids"])),
        "evaluation_sentences": int(len(evaluation["input_ids"])),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "allocate": args.allocate,
        "augment": args.augment,
        "relation_weight": args.relation_weight,
        "match_activations": args.match_activations,
        "activation_weight": args.activation_weight,
        "patience": args.patience,
        "outputs": args.outputs or "all",
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, threads={args.threads}",
        "rows": rows,
    }
    (args.out / f"{args.tag}.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out / f"{args.tag}.md")
    print((args.out / f"{args.tag}.md").read_text())
    return 0


def write_markdown(summary: dict, path: Path) -> None:
    forms = [form for form in ("core", "factors") if any(form in row for row in summary["rows"])]
    lines = [
        f"MiniLM-L6 whitened with {summary.get('allocate', 'uniform')} ranks, calibrated and fine-tuned on "
        f"{summary['calibration_sentences']} "
        f"sentences (10% held out), evaluated on {summary['evaluation_sentences']} other sentences: mean cosine of "
        "sentence embeddings to the original (nearest-neighbour agreement). At most "
        f"{summary['steps']} steps of {summary['batch_size']} sentences, early stopping"
        + (f", {summary['augment']:g} of the tokens replaced (--augment)" if summary.get("augment") else "")
        + (", site activations matched (--match-activations)" if summary.get("match_activations") else "")
        + (f", relational term weighted {summary['relation_weight']:g} (--relation-weight)"
           if summary.get("relation_weight") else "")
        + (f", outputs distilled: {summary['outputs']} (--outputs)" if summary.get("outputs", "all") != "all" else "")
        + f"; {summary['machine']}.",
        "",
        "| kept linear params | whitened | " + " | ".join(f"+ finetune {form}" for form in forms)
        + " | " + " | ".join(f"{form}: steps (best), minutes" for form in forms) + " |",
        "|---|---|" + "---|" * (2 * len(forms)),
    ]
    for row in summary["rows"]:
        cells = [f"{row['kept_linear_params']:.0%}",
                 f"{row['whitened']['mean_cosine']:.3f} ({row['whitened']['nn_agreement']:.2f})"]
        cells += [f"{row[f]['mean_cosine']:.3f} ({row[f]['nn_agreement']:.3f})" if f in row else "-" for f in forms]
        cells += [f"{row[f]['steps_run']} ({row[f]['best_step']}), {row[f]['seconds'] / 60:.1f}" if f in row else "-"
                  for f in forms]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Learning rates (relative to each tensor's RMS): "
              + ", ".join(f"{f} {summary['rows'][0][f]['lr']:g}" for f in forms if f in summary["rows"][0]) + "."]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())

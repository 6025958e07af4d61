"""MiniLM's architecture built in code: a tiny ``transformers.BertModel`` exported the ways users export it.

The same graph shapes as all-MiniLM-L6-v2 (``tools/export_minilm.py``: BERT plus mask-weighted mean
pooling) at 2 layers, hidden 32, 2 heads: the legacy TorchScript exporter with eager and with SDPA
attention, and the dynamo exporter at its default opset. For each, the torch evaluator must match ONNX
Runtime, and ``finetune`` must train the factors of a rewritten version.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import onnxsvd  # noqa: E402
from onnxsvd.finetune import FinetuneConfig, finetune  # noqa: E402
from onnxsvd.finetune.torch_graph import TorchGraph  # noqa: E402
from tests.models import relative_error, run  # noqa: E402
from tools.export_minilm import MODEL_INPUT_NAMES, MODEL_OUTPUT_NAMES, SentenceEmbedder  # noqa: E402

VOCABULARY = 100
LAYERS = 2
#: Rewritable MatMuls per layer: query, key, value, attention output, FFN in, FFN out.
SITES_PER_LAYER = 6
#: Export variants: (attention implementation, exporter).
EXPORTS = {"legacy-eager": ("eager", False), "legacy-sdpa": ("sdpa", False), "dynamo": ("sdpa", True)}


def tiny_bert(attention: str) -> SentenceEmbedder:
    config = transformers.BertConfig(
        vocab_size=VOCABULARY, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, attn_implementation=attention,
    )
    torch.manual_seed(0)
    bert = transformers.BertModel(config, add_pooling_layer=False)
    return SentenceEmbedder(bert).eval()


def tokens(rng: np.random.Generator, batch: int, sequence: int) -> dict[str, np.ndarray]:
    """Random ids with right padding (at least 2 real tokens per row), as a tokenizer pads."""
    lengths = rng.integers(2, sequence + 1, size=batch)
    mask = (np.arange(sequence)[None, :] < lengths[:, None]).astype(np.int64)  # [B, T]
    ids = rng.integers(1, VOCABULARY, size=(batch, sequence)) * mask
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def export(embedder: SentenceEmbedder, dynamo: bool, path: Path) -> onnx.ModelProto:
    example = tuple(torch.from_numpy(v) for v in tokens(np.random.default_rng(0), 2, 8).values())
    names = {"input_names": list(MODEL_INPUT_NAMES), "output_names": list(MODEL_OUTPUT_NAMES)}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python bools in transformers' mask code
        if dynamo:
            pytest.importorskip("onnxscript")  # the dynamo exporter's dependency (the dev extra has it)
            axes = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence", max=64)}
                    for name in MODEL_INPUT_NAMES}
            torch.onnx.export(embedder, example, str(path), dynamo=True, dynamic_shapes=axes, **names)
        else:
            axes = {name: {0: "batch", 1: "sequence"} for name in (*MODEL_INPUT_NAMES, "last_hidden_state")}
            axes["sentence_embedding"] = {0: "batch"}
            torch.onnx.export(embedder, example, str(path), dynamo=False, opset_version=17, dynamic_axes=axes,
                              do_constant_folding=True, **names)
    return onnx.load(str(path))


@pytest.fixture(scope="module", params=sorted(EXPORTS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> onnx.ModelProto:
    attention, dynamo = EXPORTS[request.param]
    return export(tiny_bert(attention), dynamo, tmp_path_factory.mktemp(request.param) / "model.onnx")


def test_evaluator_matches_ort(exported: onnx.ModelProto) -> None:
    feeds = tokens(np.random.default_rng(1), 3, 11)  # not the export's shape: the axes are dynamic
    expected = run(exported, feeds)
    graph = TorchGraph(exported)
    with torch.no_grad():
        values = graph({name: torch.from_numpy(value) for name, value in feeds.items()})
    hidden, pooled = (values[name].numpy() for name in MODEL_OUTPUT_NAMES)
    real = feeds["attention_mask"].astype(bool)  # [B, T]: padded positions carry arbitrary states
    assert relative_error(hidden[real], expected[0][real]) < 1e-5
    assert relative_error(pooled, expected[1]) < 1e-5


def test_finetune_trains_the_rewritten_model(exported: onnx.ModelProto) -> None:
    rewritten = onnxsvd.rewrite(exported, onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", 8, align=1)))
    data = tokens(np.random.default_rng(2), 48, 12)
    config = FinetuneConfig(steps=12, lr=1e-2, eval_every=4, batch_size=16, threads=1)
    result = finetune(rewritten.model, exported, data, config)
    report = result.report
    assert report.pairs == LAYERS * SITES_PER_LAYER
    assert report.heldout_after < report.heldout_before
    onnx.checker.check_model(result.model, full_check=True)
    finetuned = run(result.model, tokens(np.random.default_rng(3), 2, 7))
    assert all(np.isfinite(output).all() for output in finetuned)

"""Fine-tuning Conv chains: the factor pairs read from records, trained in torch, folded back."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from onnxsvd import RankPolicy, RewriteConfig, rewrite  # noqa: E402
from onnxsvd.finetune import FinetuneConfig, finetune  # noqa: E402
from onnxsvd.finetune.sites import find_factor_pairs  # noqa: E402
from onnxsvd.finetune.student import Student, fold_back  # noqa: E402
from tests.models import relative_error, run  # noqa: E402
from tests.test_conv import correlated_images, two_conv_model  # noqa: E402


def structure(model: onnx.ModelProto) -> list[tuple[str, tuple[str, ...]]]:
    return [(node.op_type, tuple(node.input)) for node in model.graph.node]


@pytest.mark.parametrize("form", ["channel", "spatial"])
@pytest.mark.parametrize("train", ["core", "factors"])
def test_conv_chains_are_pairs_and_fold_back_reproduces_the_student(
    form: str, train: str, rng: np.random.Generator
) -> None:
    model = two_conv_model(rng)
    rewritten = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 5, align=1, min_rank=1), conv=form)).model
    pairs, skips = find_factor_pairs(rewritten)
    assert skips == [] and [pair.sites for pair in pairs] == [("conv1",), ("conv2",)]
    assert all(pair.conv_form == form and pair.rank == 5 for pair in pairs)
    assert (pairs[0].k, pairs[0].n) == ((8 * 9, 16) if form == "channel" else (8 * 3, 3 * 16))
    feeds = {"x": rng.standard_normal((4, 8, 10, 10)).astype(np.float32)}
    generator = torch.Generator().manual_seed(0)
    student = Student(rewritten, pairs, train, lora_rank=2, generator=generator)
    with torch.no_grad():
        before = student({"x": torch.from_numpy(feeds["x"])})["y"].numpy()
    assert relative_error(before, run(rewritten, feeds)[0]) < 1e-5
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator) * (parameter.abs().mean() + 0.1))
        trained = student({"x": torch.from_numpy(feeds["x"])})["y"].numpy()
    assert relative_error(trained, before) > 0.05
    folded = fold_back(rewritten, student)
    onnx.checker.check_model(folded, full_check=True)
    assert structure(folded) == structure(rewritten)
    assert relative_error(run(folded, feeds)[0], trained) < 1e-5


def test_finetune_lowers_the_error_of_conv_chains(rng: np.random.Generator) -> None:
    model = two_conv_model(rng)
    rewritten = rewrite(model, RewriteConfig(policy=RankPolicy("rank", 4, align=1, min_rank=1))).model
    mixing = rng.standard_normal((8, 2))
    data = {"x": correlated_images(rng, mixing, 24, 10)}
    config = FinetuneConfig(steps=20, lr=2e-2, eval_every=5, batch_size=8, val_split=0.25, threads=1)
    result = finetune(rewritten, model, data, config)
    onnx.checker.check_model(result.model, full_check=True)
    assert structure(result.model) == structure(rewritten)
    report = result.report
    assert report.heldout_after < 0.9 * report.heldout_before, (report.heldout_before, report.heldout_after)
    held_out = {"x": correlated_images(rng, mixing, 8, 10)}  # new images: ONNX Runtime agrees
    reference = run(model, held_out)[0]
    assert relative_error(run(result.model, held_out)[0], reference) < relative_error(
        run(rewritten, held_out)[0], reference
    )

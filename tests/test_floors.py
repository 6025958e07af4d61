"""Rank floors (--min-rank, --min-share), the rounding notes and the low-energy flag, through the pipeline."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.config import RankPolicy, RewriteConfig
from onnxsvd.pipeline import rewrite, rewrite_sequential
from tests.models import assert_valid, make_model
from tests.test_calibrate import _batches, _correlated, _mlp


def _random_layers(rng: np.random.Generator) -> object:
    """x [4, 64] → a 64×64 Gaussian weight (flat spectrum) → a 64×96 one."""
    tensors = [
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float32), "w1"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name="flat"),
        helper.make_node("MatMul", ["h", "w1"], ["y"], name="wide"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 96])],
        tensors,
    )


def test_min_share_keeps_small_sites_dense_one_shot_and_sequential(rng: np.random.Generator) -> None:
    # Sites of 24×48, 48×48 and 48×16: 1,152, 2,304 and 768 parameters; the last is 33% of the largest.
    model = _mlp(rng, widths=(24, 48, 48, 16))
    batches = _batches({"x": _correlated(rng, 32, 6, 24)}, 16)
    config = RewriteConfig(policy=RankPolicy("ratio", 0.6), min_share=0.5)
    for result in (rewrite(model, config), rewrite_sequential(model, config, batches)):
        sites = {site.name: site for site in result.report.sites}
        assert sites["fc2"].action == "kept"
        assert sites["fc2"].reason == (
            "768 parameters, 33.33% of the largest site's 2,304 < --min-share 0.5: kept dense "
            "(--min-share 0 factorizes it)"
        )
        assert sites["fc0"].action == sites["fc1"].action == "factorized"  # 50% is not under 0.5
        assert_valid(result.model)
    unfloored = rewrite(model, RewriteConfig(policy=RankPolicy("ratio", 0.6, min_rank=1), min_share=0.0))
    assert all(site.action == "factorized" for site in unfloored.report.sites)


def test_low_kept_energy_and_rounded_ranks_are_noted(rng: np.random.Generator) -> None:
    result = rewrite(_random_layers(rng), RewriteConfig(policy=RankPolicy("ratio", 0.3)))
    sites = {site.name: site for site in result.report.sites}
    # 64×64 at 0.3: ⌊0.3·4096/128⌋ = 9 → 8; 64×96 at 0.3: ⌊0.3·6144/160⌋ = 11 → 8.
    assert sites["flat"].rank == 8 and sites["flat"].rank_note == "rank 9 aligned down to 8 (--align 8)"
    assert sites["wide"].rank_note == "rank 11 aligned down to 8 (--align 8)"
    assert sites["flat"].kept_energy < 0.5
    (low,) = [note for note in result.report.notes if note.startswith("low kept energy")]
    assert "flat (0." in low and "keep under 50% of Σσ²" in low
    (rounded,) = [note for note in result.report.notes if note.startswith("rank rounding")]
    assert "the ranks of 2 factorized sites" in rounded and "flat: rank 9 aligned down to 8" in rounded
    exact = rewrite(_random_layers(rng), RewriteConfig(policy=RankPolicy("ratio", 0.3, align=1)))
    assert not [note for note in exact.report.notes if note.startswith("rank rounding")]


def test_stages_split_the_rank_in_multiples_of_the_alignment(rng: np.random.Generator) -> None:
    result = rewrite(_random_layers(rng), RewriteConfig(policy=RankPolicy("rank", 24), stages=2))
    assert {site.name: site.stage_ranks for site in result.report.sites} == {"flat": [16, 8], "wide": [16, 8]}
    odd = rewrite(_random_layers(rng), RewriteConfig(policy=RankPolicy("rank", 20), stages=2))
    assert [site.stage_ranks for site in odd.report.sites] == [[10, 10], [10, 10]]  # 20 is no multiple of 8

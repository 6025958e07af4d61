"""``finetune`` reads the chains ``rewrite`` recorded, checks its teacher, and refuses what it cannot do."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto

torch = pytest.importorskip("torch")

import onnxsvd  # noqa: E402
from onnxsvd import io  # noqa: E402
from onnxsvd.cli import main  # noqa: E402
from onnxsvd.errors import ModelError, UsageError  # noqa: E402
from onnxsvd.finetune import FinetuneConfig, finetune  # noqa: E402
from onnxsvd.finetune.sites import find_factor_pairs  # noqa: E402
from onnxsvd.graph.records import PREFIX, SOURCE_FINGERPRINT_KEY, ChainRecord, read_record, write_record  # noqa: E402
from tests.conftest import MODELS  # noqa: E402
from tests.test_finetune import rewritten_mixed  # noqa: E402

MLP = MODELS / "digits_mlp.onnx"
VIT = MODELS / "digits_vit.onnx"
QUICK = FinetuneConfig(steps=2, eval_every=1, match_activations=False)


def rank(value: int) -> onnxsvd.RewriteConfig:
    return onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("rank", value, align=1))


@pytest.fixture(scope="module")
def digits() -> dict[str, np.ndarray]:
    return {"input": np.load(MODELS / "digits_calib.npz")["input"][:64]}


@pytest.fixture(scope="module")
def mlp_rewritten() -> tuple[onnx.ModelProto, onnx.ModelProto]:
    teacher = onnx.load(str(MLP))
    return teacher, onnxsvd.rewrite(teacher, rank(8)).model


def strip_records(model: onnx.ModelProto) -> onnx.ModelProto:
    stripped = copy.deepcopy(model)
    for node in stripped.graph.node:
        kept = [(p.key, p.value) for p in node.metadata_props if not p.key.startswith(PREFIX)]
        del node.metadata_props[:]
        for key, value in kept:
            node.metadata_props.add(key=key, value=value)
    return stripped


def pair_fields(pairs) -> list[tuple]:
    return [dataclasses.astuple(pair) for pair in pairs]


# --------------------------------------------------------------------------------------------------------
# The chains come from the records


def test_pairs_are_read_from_the_records_not_from_node_names(rng: np.random.Generator) -> None:
    teacher, rewritten, _ = rewritten_mixed(rng, dtype="fp16")
    pairs, skips = find_factor_pairs(rewritten)
    assert skips == [] and {pair.sites for pair in pairs} == {("linear",), ("left",), ("right",)}
    records = {read_record(n).site: read_record(n) for n in rewritten.graph.node if read_record(n)}
    for pair in pairs:
        record = records[pair.sites[0]]
        assert (pair.a_tensor, pair.b_tensor, pair.rank) == (record.factor_a, record.factor_b, 4)
        assert pair.a_transposed == pair.b_transposed == (record.weight_side == "left")
        assert pair.dtype == TensorProto.FLOAT16
    renamed = copy.deepcopy(rewritten)  # no '<site>/svd_a' names left: the records alone find the chains
    for position, node in enumerate(renamed.graph.node):
        node.name = f"node_{position}"
    assert pair_fields(find_factor_pairs(renamed)[0]) == pair_fields(pairs)


def test_pairs_of_the_stages_layout_and_of_a_shared_weight(rng: np.random.Generator) -> None:
    teacher, _, _ = rewritten_mixed(rng)
    config = dataclasses.replace(rank(4), stage_ranks=(3, 1), layout="stages")
    rewritten = onnxsvd.rewrite(teacher, config).model
    pairs, skips = find_factor_pairs(rewritten)
    assert skips == []
    assert [(pair.sites, pair.rank) for pair in pairs] == [
        ((f"{site}/svd_s{stage}",), stage_rank)
        for site in ("linear", "left", "right") for stage, stage_rank in ((1, 3), (2, 1))
    ]
    assert all(pair.outputs[0].endswith(("/svd_s1_y", "/svd_s2_y")) for pair in pairs)
    from tests.models import shared_weight_case

    shared = onnxsvd.rewrite(shared_weight_case(rng).model, rank(4)).model
    (pair,), skips = find_factor_pairs(shared)
    assert skips == [] and pair.sites == ("first", "second") and pair.outputs == ("Y1", "Y2")


def test_a_model_without_records_is_refused_in_one_line(
    mlp_rewritten, digits, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, rewritten = mlp_rewritten
    stripped = strip_records(rewritten)
    with pytest.raises(ModelError, match=r"rewritten by onnxsvd .* but its nodes carry no factor records .*re-run "
                                         r"'onnxsvd rewrite' on the original model with this version"):
        finetune(stripped, teacher, digits, QUICK)
    onnx.save(stripped, str(tmp_path / "old.onnx"))
    np.savez(tmp_path / "data.npz", **digits)
    code = main(["finetune", str(tmp_path / "old.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
                 "-o", str(tmp_path / "tuned.onnx"), "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 1 and len(captured.err.strip().splitlines()) == 1 and "no factor records" in captured.err
    assert not (tmp_path / "tuned.onnx").exists()


def test_a_hand_edited_chain_is_skipped_with_its_reason(mlp_rewritten, digits) -> None:
    teacher, rewritten = mlp_rewritten
    edited = copy.deepcopy(rewritten)
    pairs, _ = find_factor_pairs(edited)
    first_site = pairs[0].sites[0]
    second = next(n for n in edited.graph.node if read_record(n) and read_record(n).role == "second"
                  and read_record(n).site == first_site)
    second.input[1] = pairs[1].b_tensor  # now reads another chain's factor
    pairs_after, skips = find_factor_pairs(edited)
    assert [skip.site for skip in skips] == [first_site]
    assert f"does not read its recorded factor {pairs[0].b_tensor!r}" in skips[0].reason
    assert pair_fields(pairs_after) == pair_fields(pairs[1:])
    for node in edited.graph.node:
        record = read_record(node)
        if record is not None and record.role == "first":
            node.input[1] = node.input[0]  # every chain broken
    with pytest.raises(ModelError, match="none of the model's recorded factor chains can be trained"):
        finetune(edited, teacher, digits, QUICK)
    only_casts = strip_records(rewritten)  # records left on no first/second node
    some = next(node for node in only_casts.graph.node if node.op_type == "Relu")
    write_record(some, ChainRecord("site", 1, "sum", "right", "a", "b", 4))
    with pytest.raises(ModelError, match=r"can be trained \(no node records the role 'first' or 'second'\)"):
        finetune(only_casts, teacher, digits, QUICK)


# --------------------------------------------------------------------------------------------------------
# The teacher


def test_rewrite_stamps_the_source_fingerprint(mlp_rewritten) -> None:
    teacher, rewritten = mlp_rewritten
    stamped = {p.key: p.value for p in rewritten.metadata_props}
    assert stamped[SOURCE_FINGERPRINT_KEY] == io.fingerprint(teacher) != io.fingerprint(onnx.load(str(VIT)))


def test_a_teacher_of_another_model_is_refused(digits, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The MLP and the ViT have the same inputs and outputs ('input' [batch, 64] → 'logits' [batch, 10]):
    the fingerprint is what tells them apart."""
    vit = onnx.load(str(VIT))
    rewritten = onnxsvd.rewrite(vit, rank(8)).model
    mlp = onnx.load(str(MLP))
    with pytest.raises(ModelError, match=r"the teacher is not the model the rewritten one was made from .*"
                                         r"--allow-other-teacher"):
        finetune(rewritten, mlp, digits, QUICK)
    onnx.save(rewritten, str(tmp_path / "small.onnx"))
    np.savez(tmp_path / "data.npz", **digits)
    command = ["finetune", str(tmp_path / "small.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
               "-o", str(tmp_path / "tuned.onnx"), "--steps", "2", "--eval-every", "1", "--no-match-activations"]
    code = main(command)
    captured = capsys.readouterr()
    assert code == 1 and len(captured.err.strip().splitlines()) == 1, captured.err
    assert "fingerprint" in captured.err and not (tmp_path / "tuned.onnx").exists()
    code = main(command + ["--allow-other-teacher"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "note: the teacher (fingerprint" in captured.out and (tmp_path / "tuned.onnx").exists()


def retyped(model: onnx.ModelProto, edit) -> onnx.ModelProto:
    changed = copy.deepcopy(model)
    edit(changed.graph)
    return changed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda g: setattr(g.input[0], "name", "pixels"),
         r"the teacher has no input 'input'; the teacher has the input 'pixels'"),
        (lambda g: setattr(g.input[0].type.tensor_type, "elem_type", TensorProto.DOUBLE),
         r"input 'input' is double \[\?, 64\] in the teacher, float \[\?, 64\] in the rewritten model"),
        (lambda g: setattr(g.input[0].type.tensor_type.shape.dim[1], "dim_value", 32),
         r"input 'input' is float \[\?, 32\] in the teacher"),
        (lambda g: g.output[0].type.tensor_type.shape.dim.add().CopyFrom(g.output[0].type.tensor_type.shape.dim[1]),
         r"output 'logits' is float \[\?, 10, 10\] in the teacher, float \[\?, 10\] in the rewritten model"),
        (lambda g: g.output.add().CopyFrom(onnx.helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1])),
         r"the teacher has the output 'extra', the rewritten model has not"),
    ],
)
def test_a_teacher_with_other_inputs_or_outputs_is_refused(edit, message, mlp_rewritten, digits) -> None:
    teacher, rewritten = mlp_rewritten
    with pytest.raises(ModelError, match=message):
        finetune(rewritten, retyped(teacher, edit), digits, dataclasses.replace(QUICK, allow_other_teacher=True))


def test_symbolic_dims_match_and_a_student_without_fingerprint_is_noted(mlp_rewritten, digits) -> None:
    teacher, rewritten = mlp_rewritten
    renamed = retyped(teacher, lambda g: setattr(g.input[0].type.tensor_type.shape.dim[0], "dim_param", "N"))
    finetune(rewritten, renamed, digits, dataclasses.replace(QUICK, allow_other_teacher=True))  # no error
    unstamped = copy.deepcopy(rewritten)
    kept = [(p.key, p.value) for p in unstamped.metadata_props if p.key != SOURCE_FINGERPRINT_KEY]
    del unstamped.metadata_props[:]
    for key, value in kept:
        unstamped.metadata_props.add(key=key, value=value)
    report = finetune(unstamped, teacher, digits, QUICK).report
    assert any("records no source fingerprint" in note for note in report.notes)


# --------------------------------------------------------------------------------------------------------
# No silent no-ops


def test_zero_steps_is_refused(tmp_path: Path, mlp_rewritten, digits, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="--steps must be at least 1, got 0"):
        FinetuneConfig(steps=0)
    _, rewritten = mlp_rewritten
    onnx.save(rewritten, str(tmp_path / "small.onnx"))
    np.savez(tmp_path / "data.npz", **digits)
    base = ["finetune", str(tmp_path / "small.onnx"), "--teacher", str(MLP), "--data", str(tmp_path / "data.npz"),
            "-o", str(tmp_path / "tuned.onnx")]
    for extra, expected in (
        (["--steps", "0"], "--steps must be at least 1"),
        (["--train", "factors", "--lora-rank", "4"], "--lora-rank applies to --train core only"),
        (["--no-match-activations", "--activation-weight", "2"], "--activation-weight weighs the matched"),
    ):
        code = main(base + extra)
        captured = capsys.readouterr()
        assert code == 2 and len(captured.err.strip().splitlines()) == 1 and expected in captured.err, captured.err
        assert not (tmp_path / "tuned.onnx").exists()


def test_unmatched_activations_are_noted(mlp_rewritten, digits) -> None:
    teacher, _ = mlp_rewritten
    config = dataclasses.replace(rank(8), stage_ranks=(4, 4), layout="stages")
    rewritten = onnxsvd.rewrite(teacher, config).model
    report = finetune(rewritten, teacher, digits, dataclasses.replace(QUICK, match_activations=True)).report
    assert report.matched_activations == []
    assert any(note.startswith("--match-activations: the teacher computes 0 of the 6 chains' outputs")
               and note.endswith("trained on the model outputs alone") for note in report.notes), report.notes

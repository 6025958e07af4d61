"""``extract``: LoRA deltas between a base and its fine-tunes, served as ONNX Runtime adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxsvd.adapter import adapter_session, read_adapter, write_adapter
from onnxsvd.cli.main import main
from onnxsvd.config import RankPolicy, ValidateConfig
from onnxsvd.errors import ModelError, UsageError
from onnxsvd.graph.lora import lora_info
from onnxsvd.pipeline.extract import ExtractConfig, extract
from onnxsvd.validate.pipeline import validate

K, H, N = 12, 10, 8  # input, hidden, output channels of the tiny model


def _weights(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w_right": rng.standard_normal((K, H)).astype(np.float32),  # MatMul(X, W)
        "w_left": rng.standard_normal((H, H)).astype(np.float32),  # MatMul(W, Xᵀ): weight on the left
        "w_gemm": rng.standard_normal((N, H)).astype(np.float32),  # Gemm(X, W, transB=1, alpha=0.5)
        "w_gemm_left": rng.standard_normal((N, N)).astype(np.float32),  # Gemm(W, Xᵀ): weight on the left
        "bias": rng.standard_normal((N,)).astype(np.float32),
    }


def _model(weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    """x [B, K] → MatMul → Relu → Transpose → MatMul(W, ·) → Transpose → Gemm(α, transB) → Transpose → Gemm(W, ·)."""
    nodes = [
        helper.make_node("MatMul", ["x", "w_right"], ["h1"], name="right"),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu"),
        helper.make_node("Transpose", ["r1"], ["r1t"], name="t1", perm=[1, 0]),
        helper.make_node("MatMul", ["w_left", "r1t"], ["h2t"], name="left"),  # [H, B]
        helper.make_node("Transpose", ["h2t"], ["h2"], name="t2", perm=[1, 0]),
        helper.make_node("Gemm", ["h2", "w_gemm", "bias"], ["h3"], name="gemm", transB=1, alpha=0.5),
        helper.make_node("Transpose", ["h3"], ["h3t"], name="t3", perm=[1, 0]),
        helper.make_node("Gemm", ["w_gemm_left", "h3t"], ["y"], name="gemm_left"),  # [N, B]
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [N, "batch"])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _low_rank(shape: tuple[int, int], rank: int, seed: int, scale: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1]))).astype(np.float32)


def _tuned(base: dict[str, np.ndarray], rank: int, seed: int, unchanged: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The base weights plus an exactly rank-``rank`` delta on every weight not in ``unchanged``."""
    tuned = dict(base)
    for offset, name in enumerate(("w_right", "w_left", "w_gemm", "w_gemm_left")):
        if name not in unchanged:
            tuned[name] = (base[name] + _low_rank(base[name].shape, rank, seed + offset)).astype(np.float32)
    return tuned


def _run(path: Path, x: np.ndarray, adapter: Path | None = None) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if adapter is not None:
        session = adapter_session(session, adapter)
    return session.run(None, {"x": x})[0]


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    base = _weights(0)
    paths = {
        "base": (tmp_path / "base.onnx", base),
        "task_a": (tmp_path / "task_a.onnx", _tuned(base, 2, 10)),
        "task_b": (tmp_path / "task_b.onnx", _tuned(base, 3, 20, unchanged=("w_left",))),
    }
    for path, weights in paths.values():
        onnx.save(_model(weights), path)
    return {name: path for name, (path, _) in paths.items()}


def _x(rows: int = 5, seed: int = 99) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, K)).astype(np.float32)


def _exact(rank: int) -> ExtractConfig:
    return ExtractConfig(policy=RankPolicy(kind="rank", value=rank, align=1))


def test_exact_rank_delta_recovered_through_ort(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = extract(models["base"], [models["task_a"]], out, _exact(2))
    lora = onnx.load(out / "base_lora.onnx")
    onnx.checker.check_model(lora, full_check=True)
    assert sorted(p.name for p in out.iterdir()) == ["base_lora.onnx", "extract.json", "task_a.onnx_adapter"]
    adapter = report.adapters[0]
    assert [d.action for d in adapter.deltas] == ["adapted"] * 4
    assert all(d.rank == 2 and d.delta_error < 1e-5 for d in adapter.deltas)
    x = _x()
    tuned = _run(models["task_a"], x)
    with_adapter = _run(out / "base_lora.onnx", x, out / "task_a.onnx_adapter")
    np.testing.assert_allclose(with_adapter, tuned, rtol=1e-4, atol=1e-4)
    # the factors are graph inputs with rank-0 defaults: without the adapter the branch adds nothing
    np.testing.assert_allclose(_run(out / "base_lora.onnx", x), _run(models["base"], x), rtol=1e-6, atol=1e-6)
    info = lora_info(lora)
    inputs = {value.name for value in lora.graph.input}
    defaults = {t.name: tuple(t.dims) for t in lora.graph.initializer}
    for slot in info.slots:
        assert {slot.a_name, slot.b_name} <= inputs
        assert defaults[slot.a_name] == (slot.k, 0) and defaults[slot.b_name] == (0, slot.n)
    assert read_adapter(out / "task_a.onnx_adapter").model_version == info.model_version == report.model_version
    # below the delta's rank it is an approximation, not exact
    lower = extract(models["base"], [models["task_a"]], tmp_path / "low", _exact(1)).adapters[0]
    assert all(0.05 < d.delta_error < 1.0 for d in lower.deltas)


def test_two_adapters_switch_on_one_session(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = extract(models["base"], [models["task_a"], models["task_b"]], out, _exact(3))
    actions = {d.name: d.action for d in report.adapters[1].deltas}
    assert actions["left"] == "unchanged" and list(actions.values()).count("adapted") == 3
    assert len(report.slots) == 4  # the union: task_a adapts 'left', task_b does not
    values_b = read_adapter(out / "task_b.onnx_adapter").values
    left = next(slot for slot in report.slots if "left" in slot.sites)
    assert values_b[left.a_name].shape == (left.k, 0)  # rank-0 factors for a site it does not adapt
    session = ort.InferenceSession(str(out / "base_lora.onnx"), providers=["CPUExecutionProvider"])
    adapters = {}
    for name in ("task_a", "task_b"):
        adapter = ort.LoraAdapter()
        adapter.Load(str(out / f"{name}.onnx_adapter"))
        options = ort.RunOptions()
        options.add_active_adapter(adapter)
        adapters[name] = (adapter, options)
    x = _x()
    expected = {name: _run(models[name], x) for name in ("task_a", "task_b")}
    for name in ("task_a", "task_b", "task_a", "task_b"):  # switch back and forth on one session
        got = session.run(None, {"x": x}, adapters[name][1])[0]
        np.testing.assert_allclose(got, expected[name], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], _run(models["base"], x), rtol=1e-6, atol=1e-6)


def test_merge_writes_standalone_models(models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = ExtractConfig(policy=RankPolicy(kind="rank", value=3, align=1), merge=True, factor_dtype="fp16")
    extract(models["base"], [models["task_a"], models["task_b"]], out, config)
    x = _x()
    for name in ("task_a", "task_b"):
        merged = onnx.load(out / f"{name}_merged.onnx")
        onnx.checker.check_model(merged, full_check=True)
        assert not {v.name for v in merged.graph.input} - {"x"}  # factors are constants, not inputs
        expected = _run(models[name], x)
        np.testing.assert_allclose(_run(out / f"{name}_merged.onnx", x), expected, rtol=1e-2, atol=2e-2)
        np.testing.assert_allclose(_run(out / "base_lora.onnx", x, out / f"{name}.onnx_adapter"),
                                   _run(out / f"{name}_merged.onnx", x), rtol=1e-5, atol=1e-5)


def test_whitened_extraction_uses_tuned_activations(models: dict[str, Path], tmp_path: Path) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=_x(64, seed=5))
    plain = extract(models["base"], [models["task_b"]], tmp_path / "plain", _exact(1), data_path=None)
    whitened = extract(models["base"], [models["task_b"]], tmp_path / "white",
                       ExtractConfig(policy=RankPolicy(kind="rank", value=1, align=1), method="whiten"),
                       data_path=data)
    assert whitened.adapters[0].calibrated and not plain.adapters[0].calibrated
    x = _x(64, seed=5)
    tuned = _run(models["task_b"], x)
    error = {
        name: float(np.linalg.norm(_run(tmp_path / name / "base_lora.onnx", x, tmp_path / name / "task_b.onnx_adapter")
                                   - tuned))
        for name in ("plain", "white")
    }
    assert error["white"] < error["plain"]  # on the data it was fitted to, the whitened delta is closer


def test_global_allocation_within_budget(models: dict[str, Path], tmp_path: Path) -> None:
    config = ExtractConfig(policy=RankPolicy(kind="ratio", value=0.3, align=1, min_rank=1), allocate="global")
    report = extract(models["base"], [models["task_a"]], tmp_path / "out", config)
    deltas = report.adapters[0].adapted
    params = sum(d.rank * (d.k + d.n) for d in deltas)
    assert params <= 0.3 * sum(d.k * d.n for d in deltas)
    assert all("global allocation" in d.reason for d in deltas)


def test_changes_outside_sites_are_reported(models: dict[str, Path], tmp_path: Path) -> None:
    weights = _tuned(_weights(0), 2, 10)
    weights["bias"] = weights["bias"] + np.float32(0.5)  # Gemm's C: no site's weight, not in the adapter
    onnx.save(_model(weights), tmp_path / "bias.onnx")
    report = extract(models["base"], [tmp_path / "bias.onnx"], tmp_path / "out", _exact(2))
    assert report.adapters[0].changed_elsewhere == ["bias"]
    assert extract(models["base"], [models["task_a"]], tmp_path / "out2", _exact(2)).adapters[0].changed_elsewhere == []


def test_data_per_tuned_model(models: dict[str, Path], tmp_path: Path) -> None:
    for name, seed in (("a.npz", 1), ("b.npz", 2)):
        np.savez(tmp_path / name, x=_x(32, seed=seed))
    config = ExtractConfig(policy=RankPolicy(kind="rank", value=2, align=1), method="whiten")
    report = extract(models["base"], [models["task_a"], models["task_b"]], tmp_path / "out", config,
                     data_path=[tmp_path / "a.npz", tmp_path / "b.npz"])
    assert all(adapter.calibrated for adapter in report.adapters)
    with pytest.raises(UsageError, match="one per tuned model"):
        extract(models["base"], [models["task_a"], models["task_b"]], tmp_path / "out3", config,
                data_path=[tmp_path / "a.npz"] * 3)


def test_stages_and_energy_policies(models: dict[str, Path], tmp_path: Path) -> None:
    staged = extract(models["base"], [models["task_a"]], tmp_path / "staged",
                     ExtractConfig(policy=RankPolicy(kind="rank", value=2, align=1), stages=2))
    assert all(d.rank == 2 and d.delta_error < 1e-5 for d in staged.adapters[0].deltas)  # 1 + 1, still exact
    energy = extract(models["base"], [models["task_b"]], tmp_path / "energy",
                     ExtractConfig(policy=RankPolicy(kind="energy", value=0.999999, align=1, min_rank=1)))
    assert {d.rank for d in energy.adapters[0].adapted} == {3}  # the delta's exact rank keeps all its energy
    with pytest.raises(UsageError, match="--allocate global takes --ratio"):
        ExtractConfig(policy=RankPolicy(kind="rank", value=2), allocate="global")


def _shared_model(weight: np.ndarray) -> onnx.ModelProto:
    """x [B, H] → MatMul(x, W) → MatMul(·, Wᵀ): one stored weight read both ways round."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="first"),
        helper.make_node("Transpose", ["w"], ["w_t"], name="transpose", perm=[1, 0]),
        helper.make_node("MatMul", ["h", "w_t"], ["y"], name="second"),
    ]
    graph = helper.make_graph(
        nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", H])], [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_shared_weight_read_both_ways(tmp_path: Path) -> None:
    weight = np.random.default_rng(3).standard_normal((H, H)).astype(np.float32)
    onnx.save(_shared_model(weight), tmp_path / "base.onnx")
    onnx.save(_shared_model(weight + _low_rank((H, H), 2, 4)), tmp_path / "tuned.onnx")
    report = extract(tmp_path / "base.onnx", [tmp_path / "tuned.onnx"], tmp_path / "out", _exact(2))
    assert [slot.sites for slot in report.slots] == [("first", "second")]  # one pair of inputs for both uses
    x = np.random.default_rng(5).standard_normal((4, H)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "out" / "base_lora.onnx"), providers=["CPUExecutionProvider"])
    got = adapter_session(session, tmp_path / "out" / "tuned.onnx_adapter").run(None, {"x": x})[0]
    np.testing.assert_allclose(got, _run(tmp_path / "tuned.onnx", x), rtol=1e-4, atol=1e-4)


def test_mismatched_graph_is_one_line_error(models: dict[str, Path], tmp_path: Path) -> None:
    other = _model(_weights(1))
    other.graph.node[1].op_type = "Sigmoid"
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(ModelError, match=r"node 1 \(relu\) is 'Relu' in one, 'Sigmoid' in the other") as error:
        extract(models["base"], [tmp_path / "other.onnx"], tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing left behind


def test_mismatched_input_type_names_the_input(models: dict[str, Path], tmp_path: Path) -> None:
    other = _model(_weights(1))
    other.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE
    onnx.save(other, tmp_path / "other.onnx")
    with pytest.raises(ModelError, match=r"graph input 'x' is float32\[batch,\d+\] in one model, 'x' float64") as error:
        extract(models["base"], [tmp_path / "other.onnx"], tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_zero_delta_is_reported(models: dict[str, Path], tmp_path: Path) -> None:
    copy = tmp_path / "copy.onnx"
    onnx.save(_model(_weights(0)), copy)
    with pytest.raises(UsageError, match="no delta to extract"):
        extract(models["base"], [copy], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    noisy = _weights(0)
    noisy["w_right"] = noisy["w_right"] * np.float32(1 + 1e-7)
    noisy["w_gemm"] = noisy["w_gemm"] + _low_rank((N, H), 1, 3)
    onnx.save(_model(noisy), tmp_path / "noisy.onnx")
    report = extract(models["base"], [tmp_path / "noisy.onnx"], tmp_path / "out", _exact(1))
    actions = {d.name: (d.action, d.reason) for d in report.adapters[0].deltas}
    assert actions["right"][0] == "below tolerance" and "--tolerance" in actions["right"][1]
    assert actions["left"][0] == "unchanged" and actions["gemm"][0] == "adapted"
    assert [slot.sites for slot in report.slots] == [("gemm",)]


def test_adapter_for_another_base_is_refused(models: dict[str, Path], tmp_path: Path) -> None:
    extract(models["base"], [models["task_a"]], tmp_path / "one", _exact(2))
    other_base = tmp_path / "other_base.onnx"
    onnx.save(_model(_weights(7)), other_base)
    extract(other_base, [models["task_a"]], tmp_path / "two", _exact(2))
    data = tmp_path / "eval.npz"
    np.savez(data, x=_x(16))
    config = ValidateConfig(warmup=1, iters=2, profile=False)
    report = validate(models["task_a"], tmp_path / "one" / "base_lora.onnx", data, config,
                      adapter=tmp_path / "one" / "task_a.onnx_adapter")
    assert report.outputs[0].cosine > 0.99999
    assert report.adapter == str(tmp_path / "one" / "task_a.onnx_adapter")
    with pytest.raises(ModelError, match="extracted for another base"):
        validate(models["task_a"], tmp_path / "one" / "base_lora.onnx", data, config,
                 adapter=tmp_path / "two" / "task_a.onnx_adapter")
    partial = tmp_path / "partial.onnx_adapter"
    values = dict(read_adapter(tmp_path / "one" / "task_a.onnx_adapter").values)
    values.pop(next(name for name in values if name.endswith("lora_B")))
    write_adapter(partial, values, report_version(tmp_path / "one"))
    with pytest.raises(ModelError, match="sets only one of"):
        validate(models["task_a"], tmp_path / "one" / "base_lora.onnx", data, config, adapter=partial)
    with pytest.raises(ModelError, match="declares no LoRA adapter inputs"):
        validate(models["task_a"], models["base"], data, config, adapter=tmp_path / "one" / "task_a.onnx_adapter")


def test_cli_extract_and_validate(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = main(["extract", str(models["base"]), str(models["task_a"]), str(models["task_b"]), "-o", str(out),
                 "--rank", "3", "--merge"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "task_a.onnx_adapter" in printed and "base_lora.onnx" in printed
    report = json.loads((out / "extract.json").read_text())
    assert [a["adapter"] for a in report["adapters"]] == [str(out / "task_a.onnx_adapter"),
                                                          str(out / "task_b.onnx_adapter")]
    data = tmp_path / "eval.npz"
    np.savez(data, x=_x(16))
    code = main(["validate", str(models["task_b"]), str(out / "base_lora.onnx"), "--adapter",
                 str(out / "task_b.onnx_adapter"), "--data", str(data), "--iters", "2", "--warmup", "1",
                 "--no-profile", "--min-cosine", "0.9999"])
    assert code == 0
    assert "gate: passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--rank", "4", "--ratio", "0.5"], "give only one of --rank"),
        (["--method", "whiten"], "give --data"),
        (["--factor-dtype", "int8"], "not offered for adapters"),
        (["--tolerance", "2"], "--tolerance must be in"),
    ],
)
def test_cli_bad_input_is_one_line(
    models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], arguments: list[str], message: str
) -> None:
    code = main(["extract", str(models["base"]), str(models["task_a"]), "-o", str(tmp_path / "out"), *arguments])
    error = capsys.readouterr().err
    assert code != 0
    assert message in error and error.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_missing_model_and_output_inside_input(models: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extract", str(models["base"]), str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["extract", str(models["base"]), str(models["task_a"]), "-o", str(tmp_path)]) != 0
    assert "holds the" in capsys.readouterr().err
    runner = CliRunner()
    result = runner.invoke(main_group(), ["extract", "--help"])
    assert result.exit_code == 0 and "--merge" in result.output


def report_version(folder: Path) -> int:
    return int(json.loads((folder / "extract.json").read_text())["model_version"])


def main_group():
    from onnxsvd.cli.main import cli

    return cli


def test_a_narrow_delta_is_carried_exactly_not_left_out(tmp_path: Path) -> None:
    """A head-like site with fewer outputs than the rank (factors no smaller than the dense delta) is
    adapted at its full rank, exactly: an adapter has no dense weight to keep, so leaving it out loses it."""
    base = _weights(0)
    tuned = dict(base)
    rng = np.random.default_rng(5)
    tuned["w_gemm"] = (base["w_gemm"] + 0.3 * rng.standard_normal(base["w_gemm"].shape)).astype(np.float32)
    onnx.save(_model(base), tmp_path / "base.onnx")
    onnx.save(_model(tuned), tmp_path / "head.onnx")
    report = extract(tmp_path / "base.onnx", [tmp_path / "head.onnx"], tmp_path / "out", _exact(16))
    gemm = {d.name: d for d in report.adapters[0].deltas}["gemm"]
    assert gemm.action == "adapted" and gemm.rank == min(N, H) and gemm.delta_error < 1e-5
    assert "carried anyway" in gemm.reason
    x = _x()
    np.testing.assert_allclose(_run(tmp_path / "out" / "base_lora.onnx", x, tmp_path / "out" / "head.onnx_adapter"),
                               _run(tmp_path / "head.onnx", x), rtol=1e-4, atol=1e-4)

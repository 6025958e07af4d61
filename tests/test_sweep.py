"""``sweep``: every method × ratio rewritten, validated and written as JSON, markdown, plots and models."""

from __future__ import annotations

import json
from pathlib import Path

import click
import numpy as np
import onnx
import onnxruntime
import pytest

from onnxsvd.cli import main
from onnxsvd.errors import OnnxSvdError, ProviderError, UsageError
from onnxsvd.sweep import SweepConfig, parse_methods, sweep
from tests.conftest import MODELS
from tests.test_calibrate import _correlated, _mlp

HAS_CUDA = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
MLP = MODELS / "digits_mlp.onnx"
CALIB = MODELS / "digits_calib.npz"
EVAL = MODELS / "digits_eval.npz"
PNG = b"\x89PNG\r\n\x1a\n"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_parsing() -> None:
    from onnxsvd.cli.sweep import RATIOS

    assert RATIOS.convert("0.3, 0.5", None, None) == (0.3, 0.5)
    assert parse_methods("svd,whiten+sequential") == ("svd", "whiten+sequential")
    with pytest.raises(click.BadParameter, match="takes a comma-separated list such as 0.3,0.5,0.7,0.9"):
        RATIOS.convert("half", None, None)
    with pytest.raises(UsageError, match="unknown method 'svd-llm'"):
        parse_methods("svd,svd-llm")
    with pytest.raises(UsageError, match="lists a method twice"):
        parse_methods("svd,svd")
    with pytest.raises(UsageError, match=r"--ratios must be in \(0, 1\]"):
        SweepConfig(ratios=(0.5, 1.5))


def test_sweep_writes_results_models_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    config = SweepConfig(
        ratios=(0.3, 0.7), methods=("svd", "whiten", "asvd+sequential"), warmup=0, iters=2, max_eval_samples=96
    )
    steps: list[tuple[int, int, str]] = []
    result = sweep(MLP, CALIB, out, config, eval_data=EVAL, progress=lambda *step: steps.append(step))
    assert steps[0] == (0, 6, "svd 0.3") and steps[-1] == (6, 6, "writing results")
    assert [(entry.method, entry.ratio) for entry in result.entries] == [
        ("svd", 0.3), ("svd", 0.7), ("whiten", 0.3), ("whiten", 0.7), ("asvd+sequential", 0.3),
        ("asvd+sequential", 0.7),
    ]
    for entry in result.entries:
        path = Path(entry.model)
        assert path.parent == out / "models" and path.is_file()
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        assert path.with_suffix(".report.json").is_file()
        assert 0 < entry.kept_params < 1 and entry.file_size == path.stat().st_size
        (output,) = entry.outputs
        assert output["name"] == "logits" and -1 <= output["cosine"] <= 1 and output["top1_agreement"] is not None
        (speed,) = entry.speed
        assert speed["provider"] == "cpu" and speed["speedup"] > 0 and speed["bound"] >= 1
    assert (out / "models" / "whiten_0.3.onnx").is_file()
    # More parameters kept → closer to the original, for the same method.
    by_key = {(entry.method, entry.ratio): entry for entry in result.entries}
    assert by_key[("whiten", 0.7)].outputs[0]["cosine"] > by_key[("whiten", 0.3)].outputs[0]["cosine"]

    data = json.loads((out / "sweep.json").read_text())
    assert len(data["entries"]) == 6 and data["config"]["methods"] == ["svd", "whiten", "asvd+sequential"]
    assert data["eval_data"] == str(EVAL) and data["machine"]["cpus"]
    table = (out / "sweep.md").read_text()
    header = (
        "| method | ratio | kept params | bytes | file size | cos logits | top-1 agree logits | "
        "cpu speedup (bound) |"
    )
    assert header in table
    assert table.count("\n| whiten | ") == 2
    for name in ("fidelity.png", "speedup.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_sweep_command(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, "sweep", MLP, "--data", CALIB, "--ratios", "0.5", "--methods", "svd", "-o", out, "--iters", "2",
        "--warmup", "0", "--max-eval-samples", "64", "--exclude", r"layers\.0", "--min-rank", "4",
        "--min-share", "0.02",
    )
    assert code == 0, err
    assert "sweep of" in stdout and "cpu speedup" in stdout and f"markdown: {out / 'sweep.md'}" in stdout
    result = json.loads((out / "sweep.json").read_text())
    assert result["eval_data"] == str(CALIB)  # defaults to --data
    options = result["config"]["rewrite"]
    assert (options["exclude"], options["min_rank"], options["min_share"]) == (r"layers\.0", 4, 0.02)
    (entry,) = result["entries"]
    assert entry["sites_factorized"] == 2  # layers.0 excluded; the 256×10 head at rank 4 ≥ --min-rank 4


def test_sweep_output_that_is_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    target = tmp_path / "results"
    target.write_text("not a folder")
    code, out, err = cli(capsys, "sweep", MLP, "--data", CALIB, "--ratios", "0.5", "-o", target)
    assert code == 1 and err.startswith("onnxsvd: error: output") and "is a file" in err


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_sweep_on_cuda_without_cuda(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "sweep", MLP, "--data", CALIB, "-o", out, "--providers", "cpu,cuda")
    assert code == 1
    assert err.splitlines() == [
        "onnxsvd: error: CUDA requested but this onnxruntime has no CUDAExecutionProvider; "
        "pip install 'onnxsvd[gpu]' on a machine with an NVIDIA GPU"
    ]
    assert not out.exists()  # checked before any work
    with pytest.raises(ProviderError):
        sweep(MLP, CALIB, out, SweepConfig(providers=("cuda",)))


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_validate_on_cuda_without_cuda_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = cli(capsys, "validate", MLP, MLP, "--data", EVAL, "--providers", "cuda")
    assert code == 1
    assert err.splitlines() == [
        "onnxsvd: error: CUDA requested but this onnxruntime has no CUDAExecutionProvider; "
        "pip install 'onnxsvd[gpu]' on a machine with an NVIDIA GPU"
    ]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu with CUDAExecutionProvider")
def test_sweep_on_cuda(tmp_path: Path) -> None:
    result = sweep(MLP, CALIB, tmp_path, SweepConfig(ratios=(0.5,), methods=("svd",), providers=("cuda", "cpu"),
                                                     warmup=1, iters=3))
    assert [item["provider"] for item in result.entries[0].speed] == ["cuda", "cpu"]


def test_sweep_profiles_the_original_once_per_provider(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry's bound comes from one profile of the original (same provider, same shapes)."""
    from onnxsvd.validate import profile

    profiled: list[str] = []
    open_session = profile.open_session

    def counting(path: object, provider: str = "cpu", *args: object, **kwargs: object) -> object:
        if kwargs.get("profile_prefix") is not None:
            profiled.append(str(path))
        return open_session(path, provider, *args, **kwargs)

    monkeypatch.setattr(profile, "open_session", counting)
    config = SweepConfig(ratios=(0.3, 0.7), methods=("svd",), warmup=0, iters=2, max_eval_samples=64)
    result = sweep(MLP, CALIB, tmp_path / "out", config, eval_data=EVAL)
    assert profiled == [str(MLP)]
    first, second = (entry.speed[0] for entry in result.entries)
    assert first["share"] == second["share"] and 0 < first["share"] <= 1
    low, high = first["share_range"]
    assert low <= first["share"] <= high
    for item in (first, second):
        assert item["speedup_range"][0] <= item["speedup_range"][1]
        assert item["original_ms_range"][0] <= item["original_ms"] <= item["original_ms_range"][1]


def test_sweep_terminal_table_has_the_columns_of_sweep_md(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = cli(
        capsys, "sweep", MLP, "--data", CALIB, "--eval-data", EVAL, "--ratios", "0.5", "--methods", "svd", "-o", out,
        "--iters", "3", "--warmup", "0",
    )
    assert code == 0, err
    (entry,) = json.loads((out / "sweep.json").read_text())["entries"]
    (output,) = entry["outputs"]
    assert output["accuracy_original"] == pytest.approx(0.976, abs=1e-3)  # digits_eval.npz has labels
    for column in ("file size", "top-1 agree logits", "accuracy logits", "cpu p10–p90", "cpu share s"):
        assert column in stdout, column
    row = next(line for line in stdout.splitlines() if line.startswith("│ svd "))
    cells = [cell.strip() for cell in row.split("│")[1:-1]]
    from onnxsvd.io import human_bytes

    assert human_bytes(entry["file_size"]) in cells
    assert f"{output['top1_agreement']:.4f}" in cells
    assert f"{output['accuracy_original']:.4f} → {output['accuracy_rewritten']:.4f}" in cells
    table = (out / "sweep.md").read_text()
    assert "| accuracy logits |" in table and "| cpu p10–p90 |" in table


def test_a_failed_sweep_leaves_no_folder_it_created(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bad data fails before any folder is made; a failure mid-sweep removes the (empty) folders it made,
    and never a folder that was there before."""
    code, _, err = cli(capsys, "sweep", MLP, "--data", tmp_path / "missing.npz", "-o", tmp_path / "new" / "out")
    assert code == 1 and "data not found" in err
    assert list(tmp_path.iterdir()) == []

    import onnxsvd.sweep

    def failing_rewrite(*args: object, **kwargs: object) -> None:
        raise OnnxSvdError("the rewrite failed")

    monkeypatch.setattr(onnxsvd.sweep, "rewrite", failing_rewrite)
    existing = tmp_path / "existing"
    existing.mkdir()
    for output in (tmp_path / "new" / "out", existing):
        with pytest.raises(OnnxSvdError, match="the rewrite failed"):
            sweep(MLP, CALIB, output, SweepConfig(ratios=(0.5,), methods=("svd",), warmup=0, iters=1))
        assert list(tmp_path.iterdir()) == [existing] and list(existing.iterdir()) == []


def test_sweep_with_ort_baselines_writes_their_rows_and_plots(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    model, calib = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(_mlp(rng, widths=(128, 256, 128)), str(model))  # MatMul: ORT's int4 quantizer takes MatMul only
    np.savez(calib, x=_correlated(rng, 64, 8, 128))
    out = tmp_path / "sweep"
    config = SweepConfig(ratios=(0.5,), methods=("svd",), warmup=0, iters=2, baselines=("int8", "int4"))
    assert config.baselines == ("int8", "int4-b32", "int4-b128")
    result = sweep(model, calib, out, config)
    by_method = {entry.method: entry for entry in result.entries}
    assert list(by_method) == ["svd", "ort-int8", "ort-int4-b32", "ort-int4-b128"]
    ops = {"ort-int8": "MatMulInteger", "ort-int4-b32": "MatMulNBits", "ort-int4-b128": "MatMulNBits"}
    for method, op in ops.items():
        entry = by_method[method]
        written = onnx.load(entry.model)
        onnx.checker.check_model(written)
        assert op in {node.op_type for node in written.graph.node} and entry.ratio is None
        assert entry.sites_factorized == 2 and entry.sites_kept == 0
        assert entry.outputs[0]["cosine"] > 0.95 and entry.speed[0]["bound"] is None
    # Bytes of the linear layers as stored: int8 ≈ 1/4 of fp32 (plus scales), int4 b32 ≈ (4 + 32/32)/32.
    assert 0.25 <= by_method["ort-int8"].linear_bytes < 0.27
    assert 0.15 < by_method["ort-int4-b32"].linear_bytes < 0.17
    assert by_method["ort-int4-b128"].linear_bytes < by_method["ort-int4-b32"].linear_bytes
    assert 0 < by_method["svd"].linear_bytes < 1
    data = json.loads((out / "sweep.json").read_text())
    assert data["config"]["baselines"] == ["int8", "int4-b32", "int4-b128"]
    assert [entry["method"] for entry in data["entries"]][1:] == ["ort-int8", "ort-int4-b32", "ort-int4-b128"]
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ort-int4-b") == 2 and "\n| ort-int8 | - | - | 0.2" in table
    for name in ("fidelity.png", "speedup.png", "fidelity_bytes.png", "fidelity_latency.png"):
        assert (out / name).read_bytes()[:8] == PNG


def test_a_gemm_left_by_ort_is_said_in_the_baseline_notes(tmp_path: Path) -> None:
    config = SweepConfig(ratios=(0.5,), methods=("svd",), warmup=0, iters=1, max_eval_samples=32,
                         baselines=("int4-b32",))
    entry = sweep(MLP, CALIB, tmp_path / "out", config).entries[-1]
    assert entry.method == "ort-int4-b32" and entry.sites_factorized == 0 and entry.sites_kept == 3
    assert entry.notes[0].startswith("3 of 3 Gemm nodes left in float by ONNX Runtime's quantizer")
    assert entry.linear_bytes == pytest.approx(1.0)


def test_unknown_baseline_is_a_one_line_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown baseline 'fp8'; use one of int4, int8, int4-b32, int4-b128"):
        SweepConfig(baselines=("int8", "fp8"))
    out = tmp_path / "out"
    code, stdout, err = cli(capsys, "sweep", MLP, "--data", CALIB, "-o", out, "--baselines", "int8,int3")
    assert code == 2 and "unknown baseline 'int3'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()

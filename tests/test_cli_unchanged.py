"""A rewrite that factorizes nothing says so: an error naming why and what to change (nothing written),
or with ``--allow-unchanged`` (and on a dry run) a warning line beside the unchanged copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from onnxsvd import RankPolicy, RewriteConfig, RewriteJob, rewrite_file
from onnxsvd.cli import main
from onnxsvd.errors import UsageError
from tests.conftest import MODELS
from tests.models import make_model, run


def run_cli(*args: object) -> tuple[int, str, str]:
    with CliRunner().isolation() as (out, err, _):
        code = main([str(arg) for arg in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    shutil.copyfile(MODELS / "digits_mlp.onnx", path)
    return path


def one_line(err: str, prefix: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


@pytest.mark.parametrize(
    ("options", "why", "change"),
    [
        (["--include", "nomatch"], "3× name does not match --include 'nomatch'", "an --include that matches"),
        (["--exclude", "Gemm"], "3× name matches --exclude 'Gemm'", "a narrower --exclude"),
        (["--min-params", "10000000"], "< --min-params 10000000", "a lower --min-params"),
        (["--rank", "1000"], "≥ dense", "a smaller --rank/--ratio/--energy or --allow-growth"),
        (["--ratio", "0.05"], "< --min-rank 8: kept dense", "a lower --min-rank (or a larger --ratio)"),
    ],
    ids=["include", "exclude", "min-params", "break-even", "min-rank"],
)
def test_nothing_factorized_is_an_error_that_says_why(model: Path, options: list[str], why: str, change: str) -> None:
    code, out, err = run_cli("rewrite", model, "-o", model.parent / "out.onnx", *options)
    line = one_line(err, "onnxsvd: error: nothing was factorized: ")
    assert code == 2
    assert why in line and change in line and "--allow-unchanged" in line, line
    assert sorted(path.name for path in model.parent.iterdir()) == ["model.onnx"]  # nothing written


def test_allow_unchanged_writes_the_copy_with_a_warning(model: Path) -> None:
    output = model.parent / "out.onnx"
    code, out, err = run_cli("rewrite", model, "-o", output, "--include", "nomatch", "--allow-unchanged")
    assert code == 0, err
    line = one_line(err, "onnxsvd: warning: nothing was factorized: ")
    assert "--include 'nomatch'" in line and "unchanged copy" in line
    images = np.load(MODELS / "digits_eval.npz")["input"][:8]
    (expected,) = run(onnx.load(str(model)), {"input": images})
    (actual,) = run(onnx.load(str(output)), {"input": images})
    np.testing.assert_array_equal(actual, expected)
    assert "sites: 0 factorized, 3 kept dense" in out


def test_a_dry_run_that_factorizes_nothing_warns(model: Path) -> None:
    code, out, err = run_cli("rewrite", model, "--dry-run", "--include", "nomatch")
    assert code == 0, err
    line = one_line(err, "onnxsvd: warning: nothing would be factorized: ")
    assert "--include 'nomatch'" in line and "an --include that matches" in line
    assert "--allow-unchanged" not in line  # a dry run writes nothing either way


def test_a_model_without_sites(tmp_path: Path) -> None:
    """Only a MatMul of two dynamic operands: there is nothing to factorize, whatever the options."""
    nodes = [helper.make_node("MatMul", ["X", "Z"], ["Y"], name="dynamic")]
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [4, 4]) for name in ("X", "Z")]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 4])]
    path = tmp_path / "dynamic.onnx"
    onnx.save(make_model(nodes, inputs, outputs), str(path))
    code, _, err = run_cli("rewrite", path, "-o", tmp_path / "out.onnx")
    line = one_line(err, "onnxsvd: error: nothing was factorized: ")
    assert code == 2 and "no MatMul/Gemm with a constant weight" in line, line
    assert "both operands are dynamic" in line


def test_rewrite_file_refuses_an_unchanged_copy_unless_allowed(model: Path) -> None:
    config = RewriteConfig(policy=RankPolicy("ratio", 0.5), include="nomatch")
    output = model.parent / "out.onnx"
    with pytest.raises(UsageError, match="nothing was factorized: .*--allow-unchanged"):
        rewrite_file(RewriteJob(model, output, config))
    assert not output.exists()
    report = rewrite_file(RewriteJob(model, output, config, allow_unchanged=True))
    assert report.factorized == [] and output.is_file()


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_labels_of_the_wrong_length_are_a_one_line_error(model: Path, command: str) -> None:
    """Accuracy against labels would silently vanish from the table: refused, naming the expected length."""
    data = dict(np.load(MODELS / "digits_eval.npz"))
    bad = model.parent / "eval.npz"
    np.savez(bad, input=data["input"][:40], labels=data["labels"][:39])
    args = {
        "validate": ["validate", model, model, "--data", bad, "--iters", "1", "--warmup", "0"],
        "sweep": ["sweep", model, "--data", MODELS / "digits_calib.npz", "--eval-data", bad, "--ratios", "0.5",
                  "--methods", "svd", "-o", model.parent / "sweep"],
    }[command]
    code, _, err = run_cli(*args)
    line = one_line(err, "onnxsvd: error: 'labels' in ")
    assert code == 1 and "has shape [39] but the file holds 40 samples" in line and "shape [40]" in line, line
    assert not (model.parent / "sweep").exists()

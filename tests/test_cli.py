"""The command line: what users see, exit codes, files written (and never half-written)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxsvd.cli import main
from onnxsvd.errors import ModelError
from onnxsvd.io import atomic_path
from tests.conftest import MODELS, REPO
from tests.models import assert_valid, make_model, run, shared_weight_case

MLP = MODELS / "digits_mlp.onnx"
VIT = MODELS / "digits_vit.onnx"


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, out: str) -> None:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("onnxsvd: error: "), err
    assert "Traceback" not in err + out


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A folder holding a copy of the MLP as ``model.onnx``."""
    shutil.copyfile(MLP, tmp_path / "model.onnx")
    return tmp_path


def small_model(folder: Path) -> Path:
    """Two MatMuls sharing one weight, plus a MatMul with two dynamic operands (a skip)."""
    rng = np.random.default_rng(7)
    case = shared_weight_case(rng, k=24, n=16)
    graph = case.model.graph
    graph.node.append(helper.make_node("MatMul", ["Y1", "Z"], ["V"], name="dynamic"))
    graph.input.append(helper.make_tensor_value_info("Z", TensorProto.FLOAT, [16, 3]))
    graph.output.append(helper.make_tensor_value_info("V", TensorProto.FLOAT, [4, 3]))
    model = make_model(list(graph.node), list(graph.input), list(graph.output), list(graph.initializer))
    path = folder / "small.onnx"
    onnx.save(model, str(path))
    return path


# ----------------------------------------------------------------------------------------- inspect


def energy_ranks(weight: np.ndarray) -> dict[str, int]:
    """Smallest rank keeping 80/90/99% of Σσ², from numpy's SVD."""
    energy = np.cumsum(np.linalg.svd(weight, compute_uv=False) ** 2)  # [min(K, N)]
    energy /= energy[-1]
    return {level: int(np.argmax(energy >= float(level) - 1e-12)) + 1 for level in ("0.8", "0.9", "0.99")}


def test_inspect_table(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = small_model(tmp_path)
    code, out, err = cli(capsys, "inspect", path)
    assert code == 0 and err == ""
    assert "2 sites, 1 skipped" in out
    ranks = energy_ranks(onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]))
    rows = {}
    for line in out.splitlines():
        cells = [cell.strip() for cell in line.split("│")[1:-1]]
        if cells:
            rows[cells[0]] = cells
    expected = ["MatMul", "24×16", "384", "10", str(ranks["0.8"]), str(ranks["0.9"]), str(ranks["0.99"])]
    assert rows["first"] == ["first", *expected, "shared with second"]
    assert rows["second"] == ["second", *expected, "shared with first"]
    assert rows["dynamic"] == ["dynamic", "MatMul", "-", "both operands are dynamic (no constant weight)"]


def test_inspect_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = small_model(tmp_path)
    code, out, err = cli(capsys, "inspect", path, "--json")
    assert code == 0 and err == ""
    data = json.loads(out)
    ranks = energy_ranks(onnx.numpy_helper.to_array(onnx.load(str(path)).graph.initializer[0]))
    assert [site["name"] for site in data["sites"]] == ["first", "second"]
    for site in data["sites"]:
        assert site["shape"] == [24, 16] and site["params"] == 384 and site["op_type"] == "MatMul"
        assert site["break_even_rank"] == 10  # ⌈24·16/40⌉
        assert site["energy_ranks"] == ranks
    assert data["sites"][0]["shared_with"] == ["second"]
    assert data["skips"] == [
        {
            "name": "dynamic",
            "op_type": "MatMul",
            "reason": "both operands are dynamic (no constant weight)",
            "shape": None,
            "kind": "matmul",
            "scope": "",
            "params": 0,
        }
    ]
    assert data["params_in_sites"] == 384  # the shared weight counts once


def test_inspect_json_on_the_vit_lists_sites_and_skips(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = cli(capsys, "inspect", VIT, "--json")
    assert code == 0
    data = json.loads(out)
    assert len(data["sites"]) == 14 and len(data["skips"]) == 5
    position, *attention = data["skips"]
    # The position embedding is a weight, added rather than multiplied: listed, with its parameters.
    assert (position["op_type"], position["kind"], position["shape"], position["params"]) == (
        "Add", "weights", [1, 16, 64], 16 * 64
    )
    assert all("both operands are dynamic" in skip["reason"] for skip in attention)
    assert data["params_in_sites"] + data["params_in_skipped"] <= data["params_total"]
    for site in data["sites"]:
        k, n = site["shape"]
        assert site["break_even_rank"] == -(-k * n // (k + n))
        ranks = site["energy_ranks"]
        assert 1 <= ranks["0.8"] <= ranks["0.9"] <= ranks["0.99"] <= min(k, n)


def test_inspect_selection_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, _ = cli(capsys, "inspect", small_model(tmp_path), "--json", "--min-params", 1000)
    assert code == 0
    data = json.loads(out)
    assert data["sites"] == []
    assert {skip["name"]: skip["reason"] for skip in data["skips"]}["first"] == "384 parameters < --min-params 1000"


def test_inspect_plot_writes_a_png(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plot = tmp_path / "spectra.png"
    code, out, _ = cli(capsys, "inspect", MLP, "--plot", plot)
    assert code == 0 and "spectra plot" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 1000
    assert sorted(os.listdir(tmp_path)) == ["spectra.png"]


# ----------------------------------------------------------------------------------------- rewrite


@pytest.mark.parametrize("model", [MLP, VIT], ids=["mlp", "vit"])
def test_rewrite_shipped_model_at_half_ratio(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path) -> None:
    output, report_path = tmp_path / "small.onnx", tmp_path / "report.json"
    code, out, err = cli(capsys, "rewrite", model, "-o", output, "--ratio", 0.5, "--report", report_path)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["report.json", "small.onnx"]
    rewritten = onnx.load(str(output))
    assert_valid(rewritten)
    assert output.stat().st_size < model.stat().st_size
    images = np.load(MODELS / "digits_eval.npz")["input"][:16]
    (logits,) = run(rewritten, {"input": images})
    assert logits.shape == (16, 10) and np.all(np.isfinite(logits))
    report = json.loads(report_path.read_text())
    assert report["input"] == str(model) and report["output"] == str(output) and report["dry_run"] is False
    assert report["file_size_before"] == model.stat().st_size
    assert report["file_size_after"] == output.stat().st_size
    assert report["params_after"] < report["params_before"]
    assert report["sites_factorized"] == len([s for s in report["sites"] if s["action"] == "factorized"]) > 0
    for site in report["sites"]:
        assert {"name", "op_type", "shape", "action", "reason", "rank", "params_before", "params_after"} <= set(site)
        if site["action"] == "factorized":
            k, n = site["shape"]
            assert site["params_after"] == site["rank"] * (k + n) < site["params_before"] == k * n
    assert "factorized" in out and "report: " in out


def test_rewrite_at_full_rank_reproduces_the_model(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output = tmp_path / "full.onnx"
    code, _, err = cli(
        capsys, "rewrite", VIT, "-o", output, "--rank", 1000, "--allow-growth", "--layout", "stages", "--stages", 2
    )
    assert code == 0, err
    images = np.load(MODELS / "digits_eval.npz")["input"][:32]
    (expected,), (actual,) = run(onnx.load(str(VIT)), {"input": images}), run(onnx.load(str(output)), {"input": images})
    assert np.max(np.abs(actual - expected)) < 1e-4 * np.max(np.abs(expected))


def test_dry_run_writes_no_model(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    report_path = workdir / "report.json"
    code, out, _ = cli(
        capsys, "rewrite", workdir / "model.onnx", "-o", workdir / "out.onnx", "--dry-run", "--report", report_path,
        "--min-rank", "1",
    )
    assert code == 0
    assert sorted(os.listdir(workdir)) == ["model.onnx", "report.json"]
    report = json.loads(report_path.read_text())
    assert report["dry_run"] is True and report["output"] is None and report["sites_factorized"] == 3
    assert "dry run" in out
    code, _, _ = cli(capsys, "rewrite", workdir / "model.onnx", "--dry-run")
    assert code == 0 and sorted(os.listdir(workdir)) == ["model.onnx", "report.json"]


def test_output_equal_to_input_with_force(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    model = workdir / "model.onnx"
    before = model.stat().st_size
    code, _, err = cli(capsys, "rewrite", model, "-o", model, "--ratio", 0.5, "--force")
    assert code == 0, err
    assert model.stat().st_size < before
    assert_valid(onnx.load(str(model)))
    assert os.listdir(workdir) == ["model.onnx"]


def test_written_files_get_ordinary_permissions(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    # Atomic writes go through a private temporary file; the result must not stay private (0600).
    umask = os.umask(0)
    os.umask(umask)
    output, report_path = workdir / "out.onnx", workdir / "report.json"
    code, _, err = cli(capsys, "rewrite", workdir / "model.onnx", "-o", output, "--report", report_path)
    assert code == 0, err
    for path in (output, report_path):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    # Overwriting keeps the file's own mode.
    model = workdir / "model.onnx"
    model.chmod(0o640)
    code, _, err = cli(capsys, "rewrite", model, "-o", model, "--force")
    assert code == 0, err
    assert stat.S_IMODE(model.stat().st_mode) == 0o640


# ------------------------------------------------------------------------------------------ errors


def _truncated(folder: Path, source: Path) -> Path:
    data = source.read_bytes()
    path = folder / f"half_{source.name}"
    path.write_bytes(data[: len(data) // 2])
    return path


def _random_bytes(folder: Path) -> Path:
    path = folder / "random.onnx"
    path.write_bytes(np.random.default_rng(3).bytes(4096))
    return path


def _text(folder: Path) -> Path:
    path = folder / "notes.onnx"
    path.write_text("this is not an ONNX model\n" * 10)
    return path


def _empty(folder: Path) -> Path:
    path = folder / "empty.onnx"
    path.touch()
    return path


BAD_MODELS = {
    "missing": lambda folder: folder / "missing.onnx",
    "empty": _empty,
    "random-bytes": _random_bytes,
    "text": _text,
    "truncated-mlp": lambda folder: _truncated(folder, MLP),
    "truncated-vit": lambda folder: _truncated(folder, VIT),
    "folder": lambda folder: folder,
}


@pytest.mark.parametrize("command", ["rewrite", "inspect"])
@pytest.mark.parametrize("bad", sorted(BAD_MODELS))
def test_bad_model_is_one_line_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, bad: str, command: str
) -> None:
    model = BAD_MODELS[bad](tmp_path)
    before = sorted(os.listdir(tmp_path))
    output = tmp_path / "out.onnx"
    args = ["rewrite", model, "-o", output] if command == "rewrite" else ["inspect", model]
    code, out, err = cli(capsys, *args)
    assert code == 1
    assert_one_line_error(err, out)
    assert sorted(os.listdir(tmp_path)) == before


USAGE_ERRORS = {
    "ratio-0": (["--ratio", "0"], "--ratio"),
    "ratio-negative": (["--ratio", "-0.1"], "--ratio"),
    "ratio-1.5": (["--ratio", "1.5"], "--ratio"),
    "rank-negative": (["--rank", "-3"], "--rank"),
    "rank-0": (["--rank", "0"], "--rank"),
    "rank-and-ratio": (["--rank", "8", "--ratio", "0.5"], "only one of"),
    "unknown-method": (["--method", "pca"], "--method"),
    "unknown-layout": (["--layout", "diagonal"], "--layout"),
    "stages-0": (["--stages", "0"], "--stages"),
    "bad-stage-ranks": (["--stage-ranks", "4,x"], "--stage-ranks"),
    "bad-regex": (["--include", "("], "--include"),
    "unknown-option": (["--speed", "11"], "--speed"),
    "whiten-without-stats": (["--method", "whiten"], "--stats"),
}


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], workdir: Path, case: str) -> None:
    extra, mentions = USAGE_ERRORS[case]
    code, out, err = cli(capsys, "rewrite", workdir / "model.onnx", "-o", workdir / "out.onnx", *extra)
    assert code == 2
    assert_one_line_error(err, out)
    assert mentions in err
    assert os.listdir(workdir) == ["model.onnx"]


def test_missing_output_is_a_usage_error(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    code, out, err = cli(capsys, "rewrite", workdir / "model.onnx")
    assert code == 2
    assert_one_line_error(err, out)
    assert "-o" in err


def test_output_equal_to_input_is_refused(
    capsys: pytest.CaptureFixture[str], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = workdir / "model.onnx"
    original = model.read_bytes()
    (workdir / "sub").mkdir()
    monkeypatch.chdir(workdir / "sub")
    for output in (model, workdir / "sub" / ".." / "model.onnx", Path("../model.onnx")):
        code, out, err = cli(capsys, "rewrite", model, "-o", output)
        assert code == 1
        assert_one_line_error(err, out)
        assert "--force" in err
        assert model.read_bytes() == original
        assert sorted(os.listdir(workdir)) == ["model.onnx", "sub"] and os.listdir(workdir / "sub") == []
    # Nor may the report overwrite the model.
    code, out, err = cli(capsys, "rewrite", model, "-o", workdir / "out.onnx", "--report", model)
    assert code == 1
    assert_one_line_error(err, out)
    assert model.read_bytes() == original and sorted(os.listdir(workdir)) == ["model.onnx", "sub"]


def test_report_equal_to_output_is_refused(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    output = workdir / "out.onnx"
    code, out, err = cli(capsys, "rewrite", workdir / "model.onnx", "-o", output, "--report", output)
    if code == 0:  # whatever the CLI decides, the file named by -o must still be the model
        assert_valid(onnx.load(str(output)))
    else:
        assert_one_line_error(err, out)
        assert os.listdir(workdir) == ["model.onnx"]


@pytest.mark.parametrize("which", ["output", "report", "plot"])
def test_output_in_a_missing_folder(capsys: pytest.CaptureFixture[str], workdir: Path, which: str) -> None:
    missing = workdir / "nowhere" / "file"
    model = workdir / "model.onnx"
    args = {
        "output": ["rewrite", model, "-o", missing],
        "report": ["rewrite", model, "-o", workdir / "out.onnx", "--report", missing],
        "plot": ["inspect", model, "--plot", missing],
    }[which]
    code, out, err = cli(capsys, *args)
    assert code == 1
    assert_one_line_error(err, out)
    assert "does not exist" in err
    assert os.listdir(workdir) == ["model.onnx"]


def test_output_that_is_a_folder(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    (workdir / "sub").mkdir()
    code, out, err = cli(capsys, "rewrite", workdir / "model.onnx", "-o", workdir / "sub")
    assert code == 1
    assert_one_line_error(err, out)
    assert sorted(os.listdir(workdir)) == ["model.onnx", "sub"] and os.listdir(workdir / "sub") == []


def test_output_in_a_read_only_folder(capsys: pytest.CaptureFixture[str], workdir: Path) -> None:
    locked = workdir / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        code, out, err = cli(capsys, "rewrite", workdir / "model.onnx", "-o", locked / "out.onnx")
        assert code == 1
        assert_one_line_error(err, out)
        assert "not writable" in err
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def _external_data_model(folder: Path, location: str | None = None) -> Path:
    """A model whose weight lives in ``weights.bin`` beside it; ``location`` rewrites where it points."""
    case = shared_weight_case(np.random.default_rng(5), k=64, n=48)
    inner = folder / "inner"
    inner.mkdir(exist_ok=True)
    path = inner / "model.onnx"
    onnx.save(case.model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    if location is not None:
        (folder / "secret.bin").write_bytes((inner / "weights.bin").read_bytes())
        model = onnx.load(str(path), load_external_data=False)
        for entry in model.graph.initializer[0].external_data:
            if entry.key == "location":
                entry.value = location
        path = inner / "pointing.onnx"
        onnx.save(model, str(path))
    return path


def test_rewrite_model_with_external_data(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    model = _external_data_model(tmp_path)
    output = tmp_path / "small.onnx"
    code, _, err = cli(capsys, "rewrite", model, "-o", output, "--ratio", 0.5)
    assert code == 0, err
    rewritten = onnx.load(str(output))  # self-contained
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in rewritten.graph.initializer)
    assert_valid(rewritten)
    assert len(rewritten.graph.initializer) == 2


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "missing.bin"])
def test_external_data_outside_the_model_folder_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, location: str
) -> None:
    model = _external_data_model(tmp_path, location)
    for args in (["rewrite", model, "-o", tmp_path / "out.onnx"], ["inspect", model, "--json"]):
        code, out, err = cli(capsys, *args)
        assert code == 1
        assert_one_line_error(err, out)
        assert "external data" in err and "pointing.onnx" in err
        assert not (tmp_path / "out.onnx").exists()


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"old")
    for name in ("model.onnx", "new.onnx"):
        with pytest.raises(RuntimeError), atomic_path(tmp_path / name) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("serialisation failed")
    assert os.listdir(tmp_path) == ["model.onnx"] and (tmp_path / "model.onnx").read_bytes() == b"old"


def test_debug_raises_instead(workdir: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        main(["rewrite", str(workdir / "missing.onnx"), "-o", str(workdir / "out.onnx"), "--debug"])


# ---------------------------------------------------------------------------------- as a subprocess


def _python_m(*args: object, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PYTHONPATH=str(REPO), OPENBLAS_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "onnxsvd", *map(str, args)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_m_onnxsvd(workdir: Path) -> None:
    done = _python_m("rewrite", "model.onnx", "-o", "small.onnx", "--ratio", "0.5", cwd=workdir)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert_valid(onnx.load(str(workdir / "small.onnx")))
    assert sorted(os.listdir(workdir)) == ["model.onnx", "small.onnx"]
    failed = _python_m("rewrite", "model.onnx", "-o", "other.onnx", "--ratio", "1.5", cwd=workdir)
    assert failed.returncode == 2
    assert_one_line_error(failed.stderr, failed.stdout)
    debug = _python_m("--debug", "rewrite", "missing.onnx", "-o", "other.onnx", cwd=workdir)
    assert debug.returncode == 1
    assert "Traceback" in debug.stderr and "ModelError" in debug.stderr
    assert sorted(os.listdir(workdir)) == ["model.onnx", "small.onnx"]


# ----------------------------------------------------------------------------------------- narrow consoles

VIT_LIKE = [
    f"/blocks/blocks.{block}/{part}/MatMul"
    for block in range(2)
    for part in ("attn/qkv", "attn/proj", "mlp/fc1", "mlp/fc2")
]


def _first_column(text: str) -> list[str]:
    """The text of the first column of every body line of a rich table."""
    cells = []
    for line in text.splitlines():
        if line.startswith("│"):
            cells.append(line.split("│")[1].strip())
    return cells


def _vit_like_report() -> object:
    from onnxsvd.pipeline.report import RewriteReport, SiteReport

    sites = [
        SiteReport(name, "MatMul", [64, 192], "factorized", "ratio 0.5", rank=16, stage_ranks=[8, 8],
                   params_before=64 * 192, params_after=16 * 256, kept_energy=0.73)
        for name in VIT_LIKE
    ]
    sites.append(SiteReport("/blocks/blocks.0/attn/MatMul", "MatMul", None, "kept",
                            "both operands are dynamic (no constant weight)"))
    return RewriteReport("vit.onnx", "small.onnx", "svd", "ratio 0.5", "fused", 2, 100_000, 60_000, sites)


def test_rewrite_table_keeps_site_names_distinct_on_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import io as text_io

    from rich.console import Console

    from onnxsvd.cli import rewrite as rewrite_cli

    report = _vit_like_report()
    console = Console(width=80, file=text_io.StringIO())
    monkeypatch.setattr(rewrite_cli, "stdout", console)
    rewrite_cli.render_rewrite(report)
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    # Folded, not cut: the first column, read top to bottom, spells every name in full, in order.
    assert "".join(_first_column(text)) == "".join(site.name for site in report.sites)
    assert "…" not in "".join(_first_column(text))


def test_inspect_table_keeps_site_names_distinct_on_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    import io as text_io

    from rich.console import Console

    from onnxsvd.cli import inspect as inspect_cli

    console = Console(width=80, file=text_io.StringIO())
    monkeypatch.setattr(inspect_cli, "stdout", console)
    assert main(["inspect", str(VIT)]) == 0
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    names = [site["name"] for site in json.loads(_inspect_json(VIT))["sites"]]
    column = "".join(_first_column(text))
    assert column.startswith("".join(names)) and "…" not in column


def _inspect_json(model: Path) -> str:
    from click.testing import CliRunner

    from onnxsvd.cli.inspect import inspect_command

    return CliRunner().invoke(inspect_command, [str(model), "--json"]).output


def test_rewrite_summary_tells_kept_sites_from_nodes_that_are_not_sites(monkeypatch: pytest.MonkeyPatch) -> None:
    import io as text_io

    from rich.console import Console

    from onnxsvd.cli import rewrite as rewrite_cli
    from onnxsvd.pipeline.report import SiteReport

    report = _vit_like_report()
    report.sites.append(SiteReport("/head/MatMul", "MatMul", [64, 10], "kept", "name matches --exclude 'head'",
                                   params_before=640, params_after=640))
    console = Console(width=160, file=text_io.StringIO())
    monkeypatch.setattr(rewrite_cli, "stdout", console)
    rewrite_cli.render_rewrite(report)
    text = console.file.getvalue()
    assert ("sites: 8 factorized, 1 kept dense; 1 other node is not a site: "
            "both operands are dynamic (no constant weight)") in text
    rows = {cells[0]: cells for cells in (
        [cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")
    )}
    assert rows[VIT_LIKE[0]][4] == "8+8"  # stage ranks, not their sum
    assert rows["/head/MatMul"][4] == "-"


def test_selection_reasons_show_the_regex_as_typed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report_path = tmp_path / "report.json"
    code, out, err = cli(capsys, "rewrite", MLP, "--dry-run", "--exclude", r"layers\.4", "--report", report_path)
    assert code == 0, err
    reasons = {site["name"]: site["reason"] for site in json.loads(report_path.read_text())["sites"]}
    assert reasons["/layers/layers.4/Gemm"] == r"name matches --exclude 'layers\.4'"
    assert r"'layers\.4'" in out
    code, out, _ = cli(capsys, "inspect", MLP, "--json", "--include", r"layers\.[02]")
    skips = {skip["name"]: skip["reason"] for skip in json.loads(out)["skips"]}
    assert skips["/layers/layers.4/Gemm"] == r"name does not match --include 'layers\.[02]'"


def test_every_torch_install_hint_carries_the_constraints_pin() -> None:
    """An unpinned torch pulls several GB of CUDA packages: the hint names the pin constraints.txt holds."""
    import re

    from onnxsvd.errors import TORCH_INSTALL_HINT

    root = Path(__file__).resolve().parents[1]
    pin = re.search(r"^torch==\S+", (root / "constraints.txt").read_text(), re.M)
    assert pin is not None and pin.group(0) in TORCH_INSTALL_HINT and "-c constraints.txt" in TORCH_INSTALL_HINT
    for source in (root / "onnxsvd").rglob("*.py"):
        for line in source.read_text().splitlines():
            assert "pip install 'onnxsvd[torch]'" not in line or "constraints" in line, f"{source}: {line}"


def test_global_allocation_from_a_statistics_file_is_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    stats = tmp_path / "s.npz"
    code, out, err = cli(capsys, "calibrate", MLP, "--data", MODELS / "digits_calib.npz", "-o", stats)
    assert code == 0, err
    code, out, err = cli(capsys, "rewrite", MLP, "--dry-run", "--method", "whiten", "--stats", stats,
                         "--allocate", "global")
    assert code == 2
    assert_one_line_error(err, out)
    assert "measures each site's sensitivity" in err and "pass --data DATA (not --stats)" in err


def test_rank_full_rewrites_every_site_exactly(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    output, report = tmp_path / "full.onnx", tmp_path / "full.json"
    code, out, err = cli(capsys, "rewrite", MLP, "-o", output, "--rank", "full", "--report", report)
    assert code == 0, err
    sites = {site["name"]: site for site in json.loads(report.read_text())["sites"]}
    assert {name: site["rank"] for name, site in sites.items()} == {
        "/layers/layers.0/Gemm": 64, "/layers/layers.2/Gemm": 256, "/layers/layers.4/Gemm": 10
    }
    assert all(site["action"] == "factorized" and site["reason"].startswith("full rank min(K, N)")
               for site in sites.values())
    assert "policy full rank min(K, N) (exact)" in out
    x = np.load(MODELS / "digits_eval.npz")["input"][:32]
    (reference,), (rewritten,) = run(onnx.load(str(MLP)), {"input": x}), run(onnx.load(str(output)), {"input": x})
    np.testing.assert_allclose(rewritten, reference, rtol=1e-4, atol=1e-4)
    code, out, err = cli(capsys, "rewrite", MLP, "--dry-run", "--rank", "fulll")
    assert code == 2 and "positive integer or 'full'" in err


def test_floors_keep_small_layers_dense_unless_lowered(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    code, out, err = cli(capsys, "rewrite", MLP, "--dry-run", "--ratio", "0.5", "--report", report)
    assert code == 0, err
    head = {site["name"]: site for site in json.loads(report.read_text())["sites"]}["/layers/layers.4/Gemm"]
    assert head["action"] == "kept"
    assert head["reason"].startswith("ratio 0.5 gives rank 4 < --min-rank 8: kept dense")
    code, out, err = cli(capsys, "rewrite", MLP, "--dry-run", "--ratio", "0.5", "--min-rank", "1", "--report", report)
    assert code == 0, err
    head = {site["name"]: site for site in json.loads(report.read_text())["sites"]}["/layers/layers.4/Gemm"]
    assert head["action"] == "factorized" and head["rank"] == 4
    assert head["rank_note"] == "rank 4 is below --align 8: not aligned"
    code, out, err = cli(capsys, "rewrite", MLP, "--dry-run", "--ratio", "0.5", "--min-share", "0.05",
                         "--min-rank", "1", "--report", report)
    assert code == 0, err
    head = {site["name"]: site for site in json.loads(report.read_text())["sites"]}["/layers/layers.4/Gemm"]
    assert head["action"] == "kept"
    assert head["reason"] == ("2,560 parameters, 3.91% of the largest site's 65,536 < --min-share 0.05: kept dense "
                              "(--min-share 0 factorizes it)")

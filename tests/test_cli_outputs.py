"""No command ever writes over one of its inputs: every output option of every command, pointed at each
input, is a one-line error with a nonzero exit, and every input keeps its bytes (nothing else is written).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from onnxsvd.cli import main
from tests.conftest import MODELS


def run_cli(*args: object) -> tuple[int, str, str]:
    """``onnxsvd ARGS`` through the entry point (which turns errors into one line), output captured."""
    with CliRunner().isolation() as (out, err, _):
        code = main([str(arg) for arg in args])
    return code, out.getvalue().decode(), err.getvalue().decode()


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits MLP with its data, a statistics file, a rewrite of it and that rewrite's report."""
    folder = tmp_path_factory.mktemp("made")
    shutil.copyfile(MODELS / "digits_mlp.onnx", folder / "model.onnx")
    shutil.copyfile(MODELS / "digits_calib.npz", folder / "calib.npz")
    shutil.copyfile(MODELS / "digits_eval.npz", folder / "eval.npz")
    for args in (
        ("calibrate", folder / "model.onnx", "--data", folder / "calib.npz", "-o", folder / "stats.npz",
         "--max-samples", "64"),
        ("rewrite", folder / "model.onnx", "-o", folder / "small.onnx", "--report", folder / "small.report.json"),
    ):
        code, _, err = run_cli(*args)
        assert code == 0, err
    return folder


@pytest.fixture
def work(made: Path, tmp_path: Path) -> Path:
    """A fresh copy of :func:`made`'s files."""
    folder = tmp_path / "work"
    shutil.copytree(made, folder)
    return folder


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` with its bytes (``None`` for folders)."""
    return {
        str(path.relative_to(folder)): None if path.is_dir() else path.read_bytes()
        for path in sorted(folder.rglob("*"))
    }


def refused(folder: Path, output_flag: str, input_flag: str, *args: object) -> str:
    """Run ``onnxsvd ARGS``; check it is refused in one line naming both options, and that nothing under
    ``folder`` changed (no input rewritten, no file or folder left behind). Returns the error line."""
    before = snapshot(folder)
    code, out, err = run_cli(*args)
    assert_refused(code, out, err, output_flag, input_flag)
    assert snapshot(folder) == before, "an input changed, or a file or folder was left behind"
    return err


def assert_refused(code: int, out: str, err: str, output_flag: str, input_flag: str) -> None:
    assert code != 0, out
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxsvd: error: "), err
    assert "Traceback" not in out + err
    assert lines[0].startswith(f"onnxsvd: error: {output_flag} "), err  # names the option that writes
    assert f"the {input_flag} input" in err, err


#: (command line with {name} placeholders for the files of :func:`work`, output option, input option).
REFUSALS = [
    # calibrate -o
    ("calibrate {model} --data {calib} -o {model}", "-o", "model"),
    ("calibrate {model} --data {calib} -o {calib}", "-o", "--data"),
    # rewrite -o and --report
    ("rewrite {model} -o {model}", "-o", "model"),
    ("rewrite {model} --method whiten --data {calib} -o {calib}", "-o", "--data"),
    ("rewrite {model} --method whiten --data {calib} -o {calib} --force", "-o", "--data"),
    ("rewrite {model} --method whiten --stats {stats} -o {stats}", "-o", "--stats"),
    ("rewrite {model} --method whiten --stats {stats} -o {stats} --force", "-o", "--stats"),
    ("rewrite {model} -o {out} --report {model}", "--report", "model"),
    ("rewrite {model} -o {out} --report {model} --force", "--report", "model"),
    ("rewrite {model} --method whiten --data {calib} -o {out} --report {calib}", "--report", "--data"),
    ("rewrite {model} --method whiten --stats {stats} -o {out} --report {stats}", "--report", "--stats"),
    ("rewrite {model} --method whiten --stats {stats} --dry-run --report {stats}", "--report", "--stats"),
    # validate --json
    ("validate {model} {small} --data {eval} --json {model}", "--json", "original"),
    ("validate {model} {small} --data {eval} --json {small}", "--json", "rewritten"),
    ("validate {model} {small} --data {eval} --json {eval}", "--json", "--data"),
    ("validate {model} {small} --data {eval} --rewrite-report {report} --json {report}", "--json",
     "--rewrite-report"),
    # inspect --plot
    ("inspect {model} --plot {model}", "--plot", "model"),
    # finetune -o and --report
    ("finetune {small} --teacher {model} --data {calib} -o {small}", "-o", "rewritten"),
    ("finetune {small} --teacher {model} --data {calib} -o {model}", "-o", "--teacher"),
    ("finetune {small} --teacher {model} --data {calib} -o {calib}", "-o", "--data"),
    ("finetune {small} --teacher {model} --data {calib} -o {calib} --force", "-o", "--data"),
    ("finetune {small} --teacher {model} --data {calib} -o {out} --report {small}", "--report", "rewritten"),
    ("finetune {small} --teacher {model} --data {calib} -o {out} --report {model}", "--report", "--teacher"),
    ("finetune {small} --teacher {model} --data {calib} -o {out} --report {calib}", "--report", "--data"),
    ("finetune {small} --teacher {model} --data {calib} -o {out} --report {out} --force", "--report", "-o"),
]


@pytest.mark.parametrize(("line", "output_flag", "input_flag"), REFUSALS, ids=[case[0] for case in REFUSALS])
def test_no_output_option_overwrites_an_input(work: Path, line: str, output_flag: str, input_flag: str) -> None:
    names = {
        "model": "model.onnx", "calib": "calib.npz", "eval": "eval.npz", "stats": "stats.npz",
        "small": "small.onnx", "report": "small.report.json", "out": "out.onnx",
    }
    args = [part.format(**{key: work / name for key, name in names.items()}) for part in line.split()]
    if output_flag == "--report" and input_flag == "-o":  # two outputs on one path: a different message
        code, _, err = run_cli(*args)
        assert code != 0 and err.startswith("onnxsvd: error: --report and -o both name"), err
        assert not (work / "out.onnx").exists()
        return
    refused(work, output_flag, input_flag, *args)


SWEEP = ("--ratios", "0.5", "--methods", "svd", "--iters", "1", "--warmup", "0")


def test_sweep_folder_holding_the_model_is_refused(work: Path) -> None:
    """``sweep -o DIR`` writes ``DIR/sweep.json``, ``DIR/models/…``: DIR must hold no input."""
    refused(work, "-o", "model", "sweep", work / "model.onnx", "--data", work / "calib.npz", "-o", work, *SWEEP)


def test_sweep_folder_whose_model_file_is_the_input_is_refused(work: Path) -> None:
    """The input is a model an earlier sweep wrote (``DIR/models/svd_0.5.onnx``): it would be overwritten."""
    previous = work / "previous" / "models"
    previous.mkdir(parents=True)
    shutil.copyfile(work / "small.onnx", previous / "svd_0.5.onnx")
    err = refused(
        work, "-o", "model", "sweep", previous / "svd_0.5.onnx", "--data", work / "calib.npz", "-o", previous.parent,
        *SWEEP,
    )
    assert "svd_0.5.onnx" in err


@pytest.mark.parametrize("option", ["--data", "--eval-data"])
def test_sweep_folder_inside_a_data_folder_is_refused(work: Path, option: str) -> None:
    """A data folder is read file by file: the sweep may not write into it (nor be it)."""
    batches = work / "batches"
    batches.mkdir()
    shutil.copyfile(work / "calib.npz", batches / "part0.npz")
    data = ["--data", batches] if option == "--data" else ["--data", work / "calib.npz", "--eval-data", batches]
    for folder in (batches, batches / "sweep"):
        refused(work, "-o", option, "sweep", work / "model.onnx", *data, "-o", folder, *SWEEP)

"""``inspect --plot``: the format the suffix names, a legend with every site, lines told apart."""

from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest

from onnxsvd.cli import main
from tests.conftest import MODELS

MLP = MODELS / "digits_mlp.onnx"
VIT = MODELS / "digits_vit.onnx"
MAGIC = {".png": b"\x89PNG\r\n\x1a\n", ".pdf": b"%PDF-"}


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_plot_is_written_in_the_format_its_suffix_names(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, suffix: str
) -> None:
    plot = tmp_path / f"spectra{suffix}"
    assert main(["inspect", str(MLP), "--plot", str(plot)]) == 0, capsys.readouterr().err
    data = plot.read_bytes()
    if suffix == ".svg":
        assert data.startswith(b"<?xml") and b"<svg" in data[:2000]
    else:
        assert data.startswith(MAGIC[suffix])
    assert sorted(path.name for path in tmp_path.iterdir()) == [plot.name]


def test_an_unknown_plot_suffix_is_a_one_line_error_before_any_work(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    plot = tmp_path / "spectra.bmp"
    code = main(["inspect", str(tmp_path / "missing.onnx"), "--plot", str(plot)])  # the model is never read
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("onnxsvd: error: --plot ") and "'.bmp'" in err and ".png, .pdf or .svg" in err
    assert not plot.exists()


def test_the_svg_legend_names_all_fourteen_sites(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    plot = tmp_path / "spectra.svg"
    assert main(["inspect", str(VIT), "--plot", str(plot)]) == 0
    text = plot.read_text()
    names = [node.name for node in onnx.load(str(VIT)).graph.node if node.op_type in ("MatMul", "Gemm")]
    sites = [name for name in names if not re.search(r"attention/MatMul(_1)?$", name)]
    assert len(sites) == 14
    for name in sites:
        assert f"<!-- {name} -->" in text, name


def test_spectra_lines_are_told_apart_and_the_legend_has_one_entry_per_site() -> None:
    from onnxsvd.pipeline.inspect import inspect_model, spectra_figure

    inspection = inspect_model(onnx.load(str(VIT)), base_dir=MODELS)
    figure = spectra_figure(inspection)
    axis = figure.axes[0]
    legend = figure.legends[0] if figure.legends else axis.get_legend()
    assert [text.get_text() for text in legend.get_texts()] == [site.name for site in inspection.sites]
    styles = {(line.get_color() if isinstance(line.get_color(), str) else tuple(line.get_color()), line.get_linestyle())
              for line in axis.get_lines()}
    assert len(styles) == len(inspection.sites) == 14

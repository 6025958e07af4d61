"""What the README and the error messages say about installing matches what the scripts and pins do."""

from __future__ import annotations

import ast
import re

from tests.conftest import REPO

SCRIPTS = ("quickstart.sh", "test.sh")


def extras(script: str) -> set[str]:
    """The extras a setup script installs (``-e ".[cpu,plot]"`` → ``{"cpu", "plot"}``)."""
    match = re.search(r'-e "\.\[([a-z,]+)\]"', (REPO / "tools" / script).read_text())
    assert match is not None, f"tools/{script} installs no onnxsvd extras"
    return set(match.group(1).split(","))


def test_the_readme_says_which_setup_script_installs_torch() -> None:
    section = (REPO / "README.md").read_text().split("## Two commands", 1)[1].split("\n## ", 1)[0]
    sentences = " ".join(section.split()).split(". ")
    for script in SCRIPTS:
        (said,) = [sentence for sentence in sentences if sentence.startswith(f"`tools/{script}`")]
        if "torch" in extras(script):
            assert "installs the pinned CPU build of torch (`constraints.txt`)" in said, said
        else:
            assert "installs no torch" in said, said
        assert "-c constraints.txt" in (REPO / "tools" / script).read_text()


def test_every_message_that_says_how_to_install_torch_pins_it() -> None:
    """An unpinned torch pulls several GB of CUDA packages: every install hint carries constraints.txt's pin."""
    from onnxsvd.errors import TORCH_INSTALL_HINT

    pin = re.search(r"^torch==\S+", (REPO / "constraints.txt").read_text(), re.M)
    assert pin is not None and pin.group(0) in TORCH_INSTALL_HINT
    unpinned = []
    for source in (REPO / "onnxsvd").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value.lower()
                if "torch" in text and re.search(r"\binstall\b", text) and pin.group(0) not in node.value:
                    unpinned.append(f"{source.relative_to(REPO)}:{node.lineno}: {node.value}")
    assert unpinned == []

"""A deterministic corpus of real English sentences, built offline from the standard library's docstrings.

The calibration and evaluation sets of the text benchmarks need natural sentences, and no data set may
be downloaded. The standard library ships thousands of hand-written English docstrings, so this module
parses its ``.py`` files with :mod:`ast` (nothing is imported, so nothing runs), splits the docstrings
into sentences, keeps the prose-like ones and returns them deduplicated and sorted.

:func:`split_sentences` shuffles that list with a fixed seed and always takes the evaluation sentences
first, so the evaluation set does not change when the calibration set grows and never overlaps it.
The corpus depends on the Python version's standard library (3.11 here); on one interpreter it is the
same on every run.

As a script it prints how many sentences there are and a few examples::

    python tools/text_corpus.py --n-calib 2000 --show 5
"""

from __future__ import annotations

__all__ = [
    "EXCLUDED_DIRECTORIES",
    "iter_docstrings",
    "docstring_sentences",
    "is_prose_sentence",
    "load_sentences",
    "split_sentences",
    "main",
]

import argparse
import ast
import functools
import logging
import random
import re
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Folders under the stdlib that hold tests, GUI demos, vendored or third-party code, or build files.
EXCLUDED_DIRECTORIES = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "ensurepip",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "pydoc_data",
    }
)
MIN_WORDS = 6
MAX_WORDS = 40
# Share of characters that must be letters or spaces: keeps prose, drops code and signatures.
MIN_LETTER_SHARE = 0.9

# A sentence ends at . ! or ? followed by whitespace and a capital letter (or a quote/parenthesis).
_SENTENCE_BOUNDARY = re.compile(r"(?<=[.!?])\s+(?=[\"'(]?[A-Z])")
# Abbreviations after which a period does not end a sentence.
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.", "approx.")
_CODE_MARKERS = (">>>", "...", "::", "==", "->", "__", "http", "www.", "`", "{", "}", "[", "]", "=", "\\")


def stdlib_directory() -> Path:
    """The folder of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_sources(root: Path) -> list[Path]:
    """Every ``.py`` file under ``root`` outside :data:`EXCLUDED_DIRECTORIES`, sorted by path."""
    sources = []
    for path in root.rglob("*.py"):
        relative = path.relative_to(root)
        if any(part in EXCLUDED_DIRECTORIES or part.startswith("config-") for part in relative.parts[:-1]):
            continue
        if relative.name.startswith("test_"):
            continue
        sources.append(path)
    return sorted(sources, key=lambda path: path.relative_to(root).as_posix())


def iter_docstrings(root: Path | None = None) -> Iterator[str]:
    """Yield the docstrings of every module, class and function in the standard library sources.

    Args:
        root: the folder to walk; the running interpreter's stdlib when ``None``.

    Yields:
        Cleaned docstrings (``inspect.cleandoc`` semantics), in a deterministic order.
    """
    root = stdlib_directory() if root is None else root
    for path in _stdlib_sources(root):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old modules
                tree = ast.parse(source, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError) as error:
            logger.debug("skipping %s: %s", path, error)
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                docstring = ast.get_docstring(node, clean=True)
                if docstring:
                    yield docstring


def _prose_paragraphs(docstring: str) -> Iterator[str]:
    """Split a docstring at blank lines and yield its paragraphs of unindented prose as one line each."""
    for paragraph in re.split(r"\n\s*\n", docstring):
        lines = paragraph.splitlines()
        # Indented lines are code samples, argument tables or literal blocks.
        if any(line.startswith((" ", "\t")) for line in lines):
            continue
        yield " ".join(line.strip() for line in lines)


def _protect_abbreviations(text: str) -> str:
    for abbreviation in _ABBREVIATIONS:
        text = text.replace(abbreviation, abbreviation.replace(".", "\0"))
    return text


def docstring_sentences(docstring: str) -> Iterator[str]:
    """Yield the sentences of a docstring's prose paragraphs, whitespace-normalised."""
    for paragraph in _prose_paragraphs(docstring):
        for sentence in _SENTENCE_BOUNDARY.split(_protect_abbreviations(paragraph)):
            yield " ".join(sentence.replace("\0", ".").split())


def is_prose_sentence(sentence: str) -> bool:
    """Whether ``sentence`` reads as an English sentence: 6–40 words, capitalised, full stop, few symbols."""
    words = sentence.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return False
    if not sentence[0].isupper() or not sentence.endswith((".", "!", "?")):
        return False
    if any(marker in sentence for marker in _CODE_MARKERS):
        return False
    # Identifiers such as os.path.join or foo_bar look like words but are code.
    if any("_" in word or "." in word.rstrip(".,;:!?)") for word in words):
        return False
    letters = sum(character.isalpha() or character == " " for character in sentence)
    return letters / len(sentence) >= MIN_LETTER_SHARE


@functools.lru_cache(maxsize=4)
def _load_sentences_cached(root: str) -> tuple[str, ...]:
    unique = {
        sentence for docstring in iter_docstrings(Path(root)) for sentence in docstring_sentences(docstring)
    }
    return tuple(sorted(sentence for sentence in unique if is_prose_sentence(sentence)))


def load_sentences(root: Path | None = None) -> list[str]:
    """All distinct prose sentences of the standard library's docstrings, sorted.

    Args:
        root: the folder to walk; the running interpreter's stdlib when ``None``.

    Returns:
        The sentences in sorted (code point) order; the same list on every call and run. The result is
        cached per process.
    """
    root = stdlib_directory() if root is None else root
    return list(_load_sentences_cached(str(root)))


def split_sentences(n_calib: int, n_eval: int = 512, seed: int = 0) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences.

    The sorted corpus is shuffled with ``random.Random(seed)``; evaluation takes the first ``n_eval``
    sentences and calibration the next ``n_calib``. For a given seed and ``n_eval`` the evaluation set
    therefore never changes with ``n_calib`` and never overlaps the calibration set.

    Args:
        n_calib: number of calibration sentences.
        n_eval: number of evaluation sentences.
        seed: seed of the shuffle.

    Returns:
        ``(calibration, evaluation)`` lists of sentences.

    Raises:
        ValueError: the corpus has fewer than ``n_calib + n_eval`` sentences, or a count is negative.
    """
    if n_calib < 0 or n_eval < 0:
        raise ValueError(f"sentence counts must be non-negative, got n_calib={n_calib}, n_eval={n_eval}")
    sentences = load_sentences()
    if n_calib + n_eval > len(sentences):
        raise ValueError(
            f"the corpus has {len(sentences)} sentences, fewer than n_calib + n_eval = {n_calib + n_eval}; "
            "ask for fewer sentences"
        )
    random.Random(seed).shuffle(sentences)
    evaluation = sentences[:n_eval]
    calibration = sentences[n_eval : n_eval + n_calib]
    return calibration, evaluation


def main(argv: list[str] | None = None) -> int:
    """Print the size of the corpus, the split sizes and a few example sentences."""
    parser = argparse.ArgumentParser(description="Deterministic English sentences from stdlib docstrings.")
    parser.add_argument("--n-calib", type=int, default=2000, help="calibration sentences (default: 2000)")
    parser.add_argument("--n-eval", type=int, default=512, help="evaluation sentences (default: 512)")
    parser.add_argument("--seed", type=int, default=0, help="shuffle seed (default: 0)")
    parser.add_argument("--show", type=int, default=5, help="example sentences to print from each set")
    parser.add_argument("--verbose", "-v", action="store_true", help="log skipped files")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if arguments.verbose else logging.WARNING, format="%(message)s")

    total = len(load_sentences())
    try:
        calibration, evaluation = split_sentences(arguments.n_calib, arguments.n_eval, arguments.seed)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for name, sentences in (("eval", evaluation), ("calib", calibration)):
        for sentence in sentences[: arguments.show]:
            print(f"  [{name}] {sentence}")
    spare = total - len(evaluation) - len(calibration)
    print(
        f"{total} sentences from {stdlib_directory()}: "
        f"{len(evaluation)} eval + {len(calibration)} calib, {spare} spare"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

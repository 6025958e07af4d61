"""Start-up benchmark: how long ``onnxsvd --help``, ``onnxsvd rewrite --help`` and ``import onnxsvd`` take.

Each command runs as its own process (``python -m onnxsvd …``, so the checkout this script sits in is
the one imported), ``--repeats`` times, the commands taking turns so that a change in the machine's load
reaches all of them alike. It reports the median and the p10–p90 of the wall times, and which heavy
modules (numpy, onnx, onnxruntime, torch, rich, scipy, matplotlib) each command imports, read from one
extra run under ``python -X importtime``.

Writes docs/results/<tag>.json and docs/results/<tag>.md.

    python tools/bench_cli.py [--repeats 20] [--warmup 2] [--out docs/results] [--tag cli]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What is timed: a name for the table → the arguments after ``python``.
COMMANDS: dict[str, list[str]] = {
    "onnxsvd --help": ["-m", "onnxsvd", "--help"],
    "onnxsvd rewrite --help": ["-m", "onnxsvd", "rewrite", "--help"],
    'python -c "import onnxsvd"': ["-c", "import onnxsvd"],
}
#: Modules whose import is worth knowing about at start-up (each costs tens of ms or more).
HEAVY = ("numpy", "onnx", "onnxruntime", "torch", "rich", "scipy", "matplotlib")


def environment() -> dict[str, str]:
    """The environment of every run: this checkout first on the path, so its ``onnxsvd`` is the one timed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_once(arguments: list[str], env: dict[str, str]) -> float:
    """Wall time of one run, in seconds; a failing command stops the benchmark."""
    tick = time.perf_counter()
    subprocess.run([sys.executable, *arguments], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - tick


def heavy_imports(arguments: list[str], env: dict[str, str]) -> list[str]:
    """The :data:`HEAVY` modules a command imports, from ``python -X importtime`` (its report on stderr)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", *arguments], cwd=ROOT, env=env, check=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return [name for name in HEAVY if name in imported]


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile with linear interpolation (numpy's default), without numpy."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def bench(repeats: int, warmup: int) -> list[dict]:
    env = environment()
    for _ in range(warmup):  # fills the OS file cache and the .pyc files
        for arguments in COMMANDS.values():
            run_once(arguments, env)
    times: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, arguments in COMMANDS.items():
            times[name].append(run_once(arguments, env))
    return [
        {
            "command": name,
            "argv": ["python", *arguments],
            "repeats": repeats,
            "median_s": statistics.median(times[name]),
            "p10_s": quantile(times[name], 0.1),
            "p90_s": quantile(times[name], 0.9),
            "runs_s": times[name],
            "heavy_imports": heavy_imports(arguments, env),
        }
        for name, arguments in COMMANDS.items()
    ]


def markdown(result: dict) -> str:
    lines = [
        "# CLI start-up (`tools/bench_cli.py`)",
        "",
        f"{result['repeats']} runs of each command as its own process, taking turns; wall time. "
        f"Python {result['python']}, {result['machine']}, load {result['load_before']:.2f} before and "
        f"{result['load_after']:.2f} after.",
        "",
        "| command | median | p10–p90 | heavy modules imported |",
        "|---|---|---|---|",
    ]
    for row in result["commands"]:
        lines.append(
            f"| `{row['command']}` | {row['median_s'] * 1000:.0f} ms | {row['p10_s'] * 1000:.0f}–"
            f"{row['p90_s'] * 1000:.0f} ms | {', '.join(row['heavy_imports']) or 'none'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="Timed runs of each command.")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed runs of each command first.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results", help="Folder for the results.")
    parser.add_argument("--tag", default="cli", help="File name of the results (<tag>.json, <tag>.md).")
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        parser.error("need --repeats ≥ 1 and --warmup ≥ 0")
    load_before = os.getloadavg()[0]
    commands = bench(args.repeats, args.warmup)
    result = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "repeats": args.repeats,
        "warmup": args.warmup,
        "commands": commands,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (args.out / f"{args.tag}.md").write_text(table, encoding="utf-8")
    print(table, end="")


if __name__ == "__main__":
    main()

"""Scale benchmark: rewrite time and peak memory on synthetic decoder models of about 0.1, 1 and 2.5 GB.

For each size, makes the model with tools/make_synthetic.py (external data) unless present, then runs
under ``/usr/bin/time -v``, each as its own process:

- ``onnxsvd rewrite model.onnx -o small.onnx --ratio 0.25`` (the output is checked to run in ONNX Runtime),
- ``onnxsvd calibrate model.onnx --data calib.npz -o stats.npz`` on 16 random sequences of 32 tokens,
- ``onnxsvd inspect model.onnx`` (``--with-inspect``: it computes every weight's spectrum, which is slow),
- ``onnxslim model.onnx slim.onnx`` — the tool a user has today, as the baseline for time and memory,

and writes docs/results/scale.json and docs/results/scale.md.

    python tools/bench_scale.py [--sizes small,medium,large] [--work build/synthetic] [--skip-slim]
        [--skip-calibrate] [--with-inspect]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # name: (width, layers) → about 0.1, 1 and 2.4 GB of float32 weights
    "small": (512, 8),
    "medium": (1536, 9),
    "large": (2048, 12),
}


def timed(command: list[str], log: Path) -> dict:
    """Run ``command`` under /usr/bin/time -v; wall seconds, peak RSS (MiB), exit code."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "w") as handle:
        result = subprocess.run(["/usr/bin/time", "-v", *command], stdout=handle, stderr=subprocess.STDOUT,
                                env=environment, check=False)
    text = log.read_text()
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    seconds = None
    if wall:
        parts = [float(p) for p in wall.group(1).split(":")]
        seconds = sum(value * 60 ** (len(parts) - 1 - i) for i, value in enumerate(parts))
    return {
        "exit_code": result.returncode,
        "seconds": seconds,
        "peak_rss_mib": int(peak.group(1)) / 1024 if peak else None,
    }


def runs(path: Path, width: int) -> bool:
    """The model runs in ONNX Runtime on a [1, 8, width] input and gives finite outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 8, width)).astype(np.float32)
    return bool(np.all(np.isfinite(session.run(None, {"x": x})[0])))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="small,medium,large")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "synthetic")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--ratio", type=float, default=0.25)
    parser.add_argument("--skip-slim", action="store_true", help="do not run the onnxslim baseline")
    parser.add_argument("--skip-calibrate", action="store_true", help="do not measure onnxsvd calibrate")
    parser.add_argument("--with-inspect", action="store_true", help="also measure onnxsvd inspect")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    onnxsvd = [sys.executable, "-m", "onnxsvd"]
    slim = shutil.which("onnxslim")
    load_at_start = os.getloadavg()
    rows = []
    for name in args.sizes.split(","):
        width, layers = SIZES[name]
        folder = args.work / name
        model = folder / "model.onnx"
        if not model.exists():
            subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), "--width", str(width),
                            "--layers", str(layers), "--out", str(folder)], check=True)
        size = folder_bytes(model)
        output = folder / "small.onnx"
        rewrite = timed([*onnxsvd, "rewrite", str(model), "-o", str(output), "--ratio", str(args.ratio),
                         "--force", "--report", str(folder / "report.json")], folder / "rewrite.log")
        row = {
            "model": name,
            "width": width,
            "layers": layers,
            "model_gib": size / 2**30,
            "onnxsvd_seconds": rewrite["seconds"],
            "onnxsvd_peak_rss_gib": rewrite["peak_rss_mib"] / 1024 if rewrite["peak_rss_mib"] else None,
            "onnxsvd_exit_code": rewrite["exit_code"],
            "output_gib": folder_bytes(output) / 2**30 if output.exists() else None,
            "output_runs": runs(output, width) if rewrite["exit_code"] == 0 else False,
            "memory_bound_gib": 0.5 * size / 2**30 + 1.0,
        }
        if not args.skip_calibrate:
            data = folder / "calib.npz"
            samples = np.random.default_rng(0).standard_normal((16, 32, width)).astype(np.float32)
            np.savez(data, x=samples)
            stats = folder / "stats.npz"
            measured = timed([*onnxsvd, "calibrate", str(model), "--data", str(data), "-o", str(stats)],
                             folder / "calibrate.log")
            row.update({
                "calibrate_seconds": measured["seconds"],
                "calibrate_peak_rss_gib": measured["peak_rss_mib"] / 1024 if measured["peak_rss_mib"] else None,
                "calibrate_exit_code": measured["exit_code"],
                "stats_gib": stats.stat().st_size / 2**30 if stats.exists() else None,
            })
            stats.unlink(missing_ok=True)
        if args.with_inspect:
            measured = timed([*onnxsvd, "inspect", str(model)], folder / "inspect.log")
            row.update({
                "inspect_seconds": measured["seconds"],
                "inspect_peak_rss_gib": measured["peak_rss_mib"] / 1024 if measured["peak_rss_mib"] else None,
                "inspect_exit_code": measured["exit_code"],
            })
        if slim and not args.skip_slim:
            slimmed = folder / "slim.onnx"
            baseline = timed([slim, str(model), str(slimmed)], folder / "slim.log")
            row.update({
                "onnxslim_seconds": baseline["seconds"],
                "onnxslim_peak_rss_gib": baseline["peak_rss_mib"] / 1024 if baseline["peak_rss_mib"] else None,
                "onnxslim_exit_code": baseline["exit_code"],
            })
            for leftover in folder.glob("slim.onnx*"):
                leftover.unlink()
        rows.append(row)
        print(json.dumps(row), flush=True)
    summary = {
        "ratio": args.ratio,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "gpu_svd": "not measured: no GPU on this machine (use --device cuda where torch sees one)",
        "rows": rows,
    }
    (args.out / "scale.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Synthetic decoders (tools/make_synthetic.py), `onnxsvd rewrite --ratio {args.ratio}` against `onnxslim`, "
        f"each a separate process under /usr/bin/time -v ({summary['machine']}).",
        "",
        "| model | size GiB | bound 0.5·S+1 GiB | rewrite s | rewrite peak GiB | output GiB | output runs "
        "| calibrate s | calibrate peak GiB | inspect s | inspect peak GiB | onnxslim s | onnxslim peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        def cell(value, fmt="{:.2f}"):
            return fmt.format(value) if isinstance(value, (int, float)) and value is not None else "-"
        lines.append(
            f"| {row['model']} (d={row['width']}, {row['layers']} layers) | {cell(row['model_gib'])} "
            f"| {cell(row['memory_bound_gib'])} "
            f"| {cell(row['onnxsvd_seconds'], '{:.0f}')} | {cell(row['onnxsvd_peak_rss_gib'])} "
            f"| {cell(row['output_gib'])} | {row['output_runs']} "
            f"| {cell(row.get('calibrate_seconds'), '{:.0f}')} | {cell(row.get('calibrate_peak_rss_gib'))} "
            f"| {cell(row.get('inspect_seconds'), '{:.0f}')} | {cell(row.get('inspect_peak_rss_gib'))} "
            f"| {cell(row.get('onnxslim_seconds'), '{:.0f}')} | {cell(row.get('onnxslim_peak_rss_gib'))} |"
        )
    lines += ["", f"GPU SVD: {summary['gpu_svd']}."]
    (args.out / "scale.md").write_text("\n".join(lines) + "\n")
    print((args.out / "scale.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed benchmark: MiniLM-L6 on ONNX Runtime CPU after plain-SVD rewrites, measured against the bound.

Exports MiniLM-L6 (tools/export_minilm.py) if needed, takes the first 32 sentences of eval.npz (batch 32,
sequence 64) and, for every ratio, rewrites the model with plain SVD (speed does not depend on the
method: the ranks do), then measures on CPU with 2 intra-op threads:

- the speedup: both models timed alternately (A B A B …) in one process, ratio of medians;
- the bound ``1 / ((1 − s) + s·ρ)``: ``s`` the share of the original's node time in the rewritten
  MatMuls (ONNX Runtime profile), ``ρ`` the FLOPs those sites keep on this batch;
- the fraction of the bound reached (``speedup / bound``);
- the same with ``--keep-dense-if-slower`` (each site timed dense against factorized on this shape),
  with the number of sites it kept dense.

Writes docs/results/speed.json and docs/results/speed.md. Run it on a quiet machine: it waits (up to
``--wait`` seconds) for the 1-minute load average to fall under ``--max-load`` and records the load.

    python tools/bench_speed.py [--out docs/results] [--ratios 0.3,0.5,0.7,0.9] [--threads 2] [--iters 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import onnxsvd
from onnxsvd import io
from onnxsvd.pipeline.speed import SiteSpeedCheck, SpeedCheckConfig
from onnxsvd.validate import open_session, profile_time_share, site_flops, speedup_bound, time_models

ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQUENCE = 32, 64
#: Each timed round waits (at most ``wait`` s) for the 1-minute load average to fall under ``max_load``
#: (the start threshold plus one: the average still holds this script's own previous round).
QUIET = {"max_load": 1.5, "wait": 600.0}


def ensure_minilm(folder: Path) -> None:
    """Export MiniLM-L6 and its data with tools/export_minilm.py unless already there."""
    if all((folder / name).exists() for name in ("model.onnx", "eval.npz")):
        return
    subprocess.run([sys.executable, str(ROOT / "tools" / "export_minilm.py"), "--out", str(folder)], check=True)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def wait_for_quiet(max_load: float, wait: float) -> float:
    """Wait until the 1-minute load average is under ``max_load`` (at most ``wait`` s); return the load."""
    deadline = time.monotonic() + wait
    load = os.getloadavg()[0]
    while load >= max_load and time.monotonic() < deadline:
        print(f"load {load:.2f} ≥ {max_load}: waiting for a quieter machine", flush=True)
        time.sleep(20)
        load = os.getloadavg()[0]
    return load


def measure(original: Path, rewritten: Path, feeds: dict, names: list[str], threads: int, iters: int,
            rounds: int, spinning: bool = False) -> dict:
    """Speedup (median over ``rounds`` alternating measurements), bound and the pieces of both.

    ``spinning`` opens the timed sessions with onnxruntime's default spinning thread pools (how
    ``validate`` timed before it turned spinning off), to show what that did to the ratio.
    """
    flops = site_flops(io.load_model(original), io.load_model(rewritten), names)
    share = profile_time_share(original, feeds, flops.sites, "cpu", threads, runs=5) if names else None
    if share is not None and share.rows:
        flops = flops.with_rows(share.rows)
    bound = speedup_bound(share.share, flops.kept_fraction) if share is not None else 1.0
    speedups, originals, rewrittens, loads = [], [], [], []
    for _ in range(rounds):
        loads.append(wait_for_quiet(QUIET["max_load"], QUIET["wait"]))
        sessions = (
            open_session(original, "cpu", threads, spinning=spinning),
            open_session(rewritten, "cpu", threads, spinning=spinning),
        )
        timing = time_models(original, rewritten, feeds, "cpu", warmup=10, iters=iters, threads=threads,
                             sessions=sessions)
        speedups.append(timing.speedup)
        originals.append(timing.original.p50_ms)
        rewrittens.append(timing.rewritten.p50_ms)
    speedup = float(np.median(speedups))
    return {
        "speedup": speedup,
        "speedups": speedups,
        "loads": loads,
        "original_ms": float(np.median(originals)),
        "rewritten_ms": float(np.median(rewrittens)),
        "share": share.share if share is not None else 0.0,
        "missing_from_profile": list(share.missing) if share is not None else [],
        "kept_flops": flops.kept_fraction,
        "bound": bound,
        "fraction_of_bound": speedup / bound,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", type=Path, default=ROOT / "build" / "minilm")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "bench_speed")
    parser.add_argument("--ratios", default="0.3,0.5,0.7,0.9")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iters", type=int, default=30, help="timed runs of each model per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating measurements per model (median)")
    parser.add_argument("--no-spinning-check", action="store_true",
                        help="skip the diagnostic measurement with spinning thread pools")
    parser.add_argument("--align", type=int, default=8)
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--wait", type=float, default=600.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:  # one BLAS thread for the SVDs, so they do not fight the timed sessions' threads
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass
    ensure_minilm(args.minilm)
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    model_path = args.minilm / "model.onnx"
    model = io.load_model(model_path)
    with np.load(args.minilm / "eval.npz") as archive:
        feeds = {name: archive[name][:BATCH, :SEQUENCE] for name in ("input_ids", "attention_mask", "token_type_ids")}
    shapes = {name: (BATCH, SEQUENCE) for name in feeds}
    QUIET.update(max_load=args.max_load + 1.0, wait=args.wait)
    load_before = wait_for_quiet(args.max_load, args.wait)
    check = SiteSpeedCheck(SpeedCheckConfig(input_shapes=shapes, threads=args.threads, iters=30))
    rows = []
    for ratio in [float(text) for text in args.ratios.split(",")]:
        config = onnxsvd.RewriteConfig(policy=onnxsvd.RankPolicy("ratio", ratio, align=args.align))
        row: dict = {"ratio": ratio}
        for variant, speed_check in (("plain", None), ("keep_dense_if_slower", check)):
            if speed_check is not None:  # the per-site timings want a quiet machine too
                wait_for_quiet(QUIET["max_load"], QUIET["wait"])
            tick = time.perf_counter()
            result = onnxsvd.rewrite(model, config, base_dir=model_path.parent, speed_check=speed_check)
            rewrite_seconds = time.perf_counter() - tick
            path = args.work / f"svd_{ratio:g}{'_kd' if speed_check else ''}.onnx"
            io.save_model(result.model, path)
            names = [site.name for site in result.report.factorized]
            kept_for_speed = sum(1 for site in result.report.kept if site.speedup is not None)
            if speed_check is not None and kept_for_speed == 0:
                numbers = dict(row["plain"])  # the same model as the plain rewrite: not measured twice
            else:
                numbers = measure(model_path, path, feeds, names, args.threads, args.iters, args.rounds)
            if speed_check is None and not args.no_spinning_check:
                spinning = measure(model_path, path, feeds, names, args.threads, args.iters, args.rounds, True)
                numbers["with_spinning"] = {key: spinning[key] for key in ("speedup", "speedups", "fraction_of_bound")}
            numbers["sites_factorized"] = len(names)
            numbers["sites_kept_for_speed"] = kept_for_speed
            if speed_check is not None:
                timed = [site for site in result.report.sites if site.speedup is not None]
                numbers["site_speedups"] = {site.name: site.speedup for site in timed}
                numbers["min_factorized_site_speedup"] = min(
                    (site.speedup for site in timed if site.action == "factorized"), default=None
                )
            numbers["rewrite_seconds"] = rewrite_seconds
            numbers["params_kept"] = result.report.params_after / result.report.params_before
            numbers["ranks"] = sorted({site.rank for site in result.report.factorized})
            row[variant] = numbers
            print(json.dumps({"ratio": ratio, "variant": variant, **numbers}), flush=True)
        rows.append(row)
    load_after = os.getloadavg()[0]
    import onnxruntime

    summary = {
        "model": "all-MiniLM-L6-v2 (36 constant MatMuls), ONNX Runtime CPU",
        "batch": BATCH,
        "sequence": SEQUENCE,
        "threads": args.threads,
        "iters": args.iters,
        "rounds": args.rounds,
        "align": args.align,
        "onnxruntime": onnxruntime.__version__,
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "load_before": load_before,
        "max_load": args.max_load,
        "wait": args.wait,
        "load_after": load_after,
        "rows": rows,
    }
    (args.out / "speed.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_markdown(summary, args.out / "speed.md")
    print((args.out / "speed.md").read_text())
    return 0


def _loads(summary: dict) -> str:
    loads = [load for row in summary["rows"] for variant in ("plain", "keep_dense_if_slower")
             for load in row[variant].get("loads", [])]
    return f"{min(loads):.2f}–{max(loads):.2f}" if loads else "-"


def _slowest(numbers: dict) -> str:
    slowest = numbers.get("min_factorized_site_speedup")
    return f"{slowest:.2f}× faster than dense" if slowest is not None else "-"


def _spinning(numbers: dict) -> str:
    spinning = numbers.get("with_spinning")
    return f"{spinning['speedup']:.2f}× ({spinning['fraction_of_bound']:.0%})" if spinning else "-"


def write_markdown(summary: dict, path: Path) -> None:
    lines = [
        f"MiniLM-L6 on ONNX Runtime {summary['onnxruntime']} CPU, batch {summary['batch']} × sequence "
        f"{summary['sequence']}, {summary['threads']} threads; plain SVD at each ratio (ranks aligned to "
        f"{summary['align']}). Speedup: median latency of the original over the rewritten, both timed alternately "
        f"({summary['iters']} runs each, median of {summary['rounds']} rounds). Bound: 1/((1−s)+s·ρ), s the "
        "rewritten MatMuls' share of the original's node time (ONNX Runtime profile), ρ the FLOPs they keep.",
        "",
        "| ratio | ranks | s | ρ (FLOPs kept) | bound | speedup | of bound "
        "| keep-dense-if-slower: kept dense | slowest chain kept | speedup | of bound "
        "| spinning pools: speedup (of bound) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["rows"]:
        plain, checked = row["plain"], row["keep_dense_if_slower"]
        lines.append(
            f"| {row['ratio']:g} | {','.join(map(str, plain['ranks']))} | {plain['share']:.2f} | "
            f"{plain['kept_flops']:.2f} | {plain['bound']:.2f}× | {plain['speedup']:.2f}× | "
            f"{plain['fraction_of_bound']:.0%} | {checked['sites_kept_for_speed']} of "
            f"{checked['sites_factorized'] + checked['sites_kept_for_speed']} | "
            f"{_slowest(checked)} | {checked['speedup']:.2f}× | "
            f"{checked['fraction_of_bound']:.0%} | {_spinning(plain)} |"
        )
    lines += [
        "",
        f"Machine: {summary['machine']}; 1-minute load average {summary['load_before']:.2f} before and "
        f"{summary['load_after']:.2f} after, {_loads(summary)} at the start of the timed rounds. The machine is "
        f"shared: the run waited up to {summary['wait']:.0f} s for a load under {summary['max_load']:g} before "
        f"starting and under {summary['max_load'] + 1:g} before each timed round, then went ahead.",
        "",
        "`of bound` is speedup / bound; the keep-dense columns use the bound of that rewrite (fewer sites "
        "rewritten lower it). *Slowest chain kept*: the smallest per-site speedup, dense over chain, among the "
        "sites the check let through. When the check keeps no site dense, its model is the plain rewrite and is "
        "not timed twice. *Spinning pools*: the same plain rewrite timed with onnxruntime's default "
        "spinning intra-op thread pools, as `validate` did before: the idle pool of one session keeps spinning "
        "while the other runs, which on 2 cores slows whichever model runs second.",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())

"""Speed, accuracy and memory of the T1 solvers, against the seed recipe, in one table.

Every solver fits the same synthetic inversion-recovery phantom (10 TIs, SNR 100, the NIST
T1 vials) at each size. Errors are relative T1 errors over the voxels of the vials with T1 from
0.1 to 2.5 s, against the truth and against a float64 least-squares reference (LM run to a
1e-14 tolerance). Each (solver, size) runs in a fresh process, so its peak memory is its own.

    python benchmarks/fit_speed.py            # print the table
    python benchmarks/fit_speed.py --readme   # also rewrite the README's results section
    python benchmarks/fit_speed.py --quick    # 128x128 only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch
from readme_section import replace_section

from qmri_helpers import fitting, models, phantom

SIZES = {"128x128": (1, 128, 128), "256x256": (1, 256, 256), "256x256x32": (32, 256, 256)}
LARGE = {"256x256x128": (128, 256, 256)}
SOLVERS = {
    "seed: dictionary + 2000 Adam": "seed",
    "VarPro grid (closed-form M0)": "varpro",
    "VarPro + LM (seed model)": "lm",
    "VarPro + LM (3-parameter)": "lm3",
}
BEST = "VarPro + LM (seed model)"


def make_data(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images (10, z, y, x), TIs (s) and the true T1 map (z, y, x) of a z-slice phantom."""
    truth = phantom.make_phantom(shape[1:])
    images = torch.empty((len(phantom.DEFAULT_TI), *shape), dtype=torch.float32)
    for z in range(shape[0]):  # slice by slice, so the data's float32 copy is the only big one
        images[:, z] = torch.from_numpy(
            phantom.simulate_inversion_recovery(truth, phantom.DEFAULT_TI, 15.0, snr=100, seed=z)
        )[:, 0]
    t1 = np.repeat(truth.t1, shape[0], axis=0)
    vials = np.repeat(truth.vial_mask((0.1, 2.5)), shape[0], axis=0)
    return images, torch.tensor(phantom.DEFAULT_TI), np.where(vials, t1, 0.0)


#: Adam iterations of the seed recipe; on volumes it runs ADAM_SHORT and is extrapolated.
ADAM_ITERATIONS, ADAM_SHORT = 2000, 200


def run_solver(
    kind: str, images: torch.Tensor, ti: torch.Tensor, n_iter: int = ADAM_ITERATIONS
) -> torch.Tensor:
    if kind == "seed":
        model = models.inversion_recovery(ti)
        start = fitting.dictionary_match(images, model, "t1", torch.logspace(-2, 1, 300))
        return fitting.fit_adam(model, images, start, n_iter=n_iter, progress=False).params["t1"]
    if kind == "varpro":
        return fitting.fit_varpro(models.ir_seed_model(ti), images).params["t1"]
    if kind == "lm":
        return fitting.fit_lm(models.ir_seed_model(ti), images).params["t1"]
    if kind == "lm3":
        return fitting.fit_lm(models.ir_three_parameter_model(ti), images).params["t1"]
    if kind == "reference":
        return fitting.fit_lm(models.ir_seed_model(ti), images, max_iter=200, tol=1e-14).params[
            "t1"
        ]
    raise ValueError(kind)


def one(kind: str, size: str) -> dict:
    """Run one solver on one size in this process; report time, memory and errors."""
    torch.set_num_threads(torch.get_num_threads())
    images, ti, truth = make_data({**SIZES, **LARGE}[size])
    run_solver(kind, images[:, :1, :16, :16], ti)  # warm-up, outside the timing
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # 2000 Adam steps on a 2-million-voxel volume take over half an hour on 2 cores: time
    # 200 and scale the time (Adam's cost per step is constant); its errors are then not final.
    short = kind == "seed" and images.shape[1] > 1
    start = time.perf_counter()
    t1 = run_solver(kind, images, ti, ADAM_SHORT if short else ADAM_ITERATIONS)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    inside = truth > 0
    out = {"seconds": seconds, "voxels": int(np.prod(images.shape[1:])), "peak_mb": peak}
    out["extra_mb"] = peak - baseline
    if short:
        out["seconds"] = seconds * ADAM_ITERATIONS / ADAM_SHORT
        out["note"] = f"timed over {ADAM_SHORT} of {ADAM_ITERATIONS} steps, scaled"
    elif size in SIZES:
        reference = run_solver("reference", images, ti).numpy()[inside].astype(np.float64)
        fitted = t1.numpy()[inside].astype(np.float64)
        vs_truth = np.abs(fitted / truth[inside] - 1)
        vs_ref = np.abs(fitted / reference - 1)
        for name, err in (("truth", vs_truth), ("ref", vs_ref)):
            out[name] = [float(np.median(err)), float(np.percentile(err, 95)), float(err.max())]
    return out


def table(rows: list[tuple[str, str, dict]]) -> str:
    head = (
        "| size | solver | s | voxels/s | vs truth: median / p95 / max | "
        "vs float64 LS: median / p95 / max | peak MB (extra) |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for size, solver, r in rows:

        def pct(key, r=r):
            return " / ".join(f"{v * 100:.3g}%" for v in r[key]) if key in r else "n/a"

        seconds = f"{r['seconds']:.3g}" + (f" ({r['note']})" if "note" in r else "")
        lines.append(
            f"| {size} | {solver} | {seconds} | {r['voxels'] / r['seconds']:.3g} | "
            f"{pct('truth')} | {pct('ref')} | {r['peak_mb']:.0f} ({r['extra_mb']:.0f}) |"
        )
    return head + "\n".join(lines)


def speedups(rows: list[tuple[str, str, dict]]) -> str:
    by = {(size, solver): r for size, solver, r in rows}
    out = []
    for size in SIZES:
        seed = by.get((size, next(iter(SOLVERS))))
        best = by.get((size, BEST))
        if seed and best:
            out.append(f"{size}: {seed['seconds'] / best['seconds']:.0f}x")
    return f"Speed-up of {BEST} over the seed recipe: " + ", ".join(out) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("SOLVER", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--readme", action="store_true", help="rewrite the README section")
    parser.add_argument("--quick", action="store_true", help="128x128 only")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    sizes = ["128x128"] if args.quick else list(SIZES)
    jobs = [(size, label) for size in sizes for label in SOLVERS]
    if not args.quick:
        jobs.append(("256x256x128", BEST))
    rows = []
    for size, label in jobs:
        run = subprocess.run(
            [sys.executable, __file__, "--one", SOLVERS[label], size],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        rows.append((size, label, json.loads(run.stdout.strip().splitlines()[-1])))
        print(f"done: {size} {label}", file=sys.stderr, flush=True)
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    text = f"{table(rows)}\n\n{speedups(rows)}\n\nMeasured on: {machine}.\n"
    print(text)
    if args.readme:
        replace_section("benchmark", text)


if __name__ == "__main__":
    main()

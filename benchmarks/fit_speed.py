"""Speed, accuracy and memory of the T1 solvers, against the seed recipe, in one table.

Every solver fits the same synthetic inversion-recovery phantom (10 TIs, SNR 100, the NIST
T1 vials) at each size. Errors are relative T1 errors over the voxels of the vials with T1 from
0.1 to 2.5 s, against an independent float64 reference of the solver's model: a dense grid
plus golden-section search for every sign pattern (``exact_reference.py``), which shares no
code with the solvers. On volumes the reference covers 4 of the slices. Each (solver, size)
runs in a fresh process, so its peak memory is its own; after a warm-up call on 16x16 voxels
and one at full size (timed apart: the first call in a process also pays for mapping fresh
memory; Adam's takes 20 steps), the fast solvers are timed five times and the whole Adam
recipes three times (the median is reported: single 2000-step runs of ``fit_adam`` scattered
from 7.6 to 11.5 s at 256x256 on this shared machine), the shortened ones (volumes, busy rows)
once. A "busy" row runs with one busy background process (a CPU loop that stops itself) on
the machine, with the thread policy of ``qmri_helpers.fitting.thread_policy`` on and off. With
CUDA present, GPU rows follow.

    python benchmarks/fit_speed.py            # print the table (about 15 min on 2 idle cores)
    python benchmarks/fit_speed.py --readme   # also rewrite the README's results section
    python benchmarks/fit_speed.py --quick    # 128x128 only (about 1 min)
    python benchmarks/fit_speed.py --gpu --out gpu.md   # the GPU rows alone, for the README's
                                                        # GPU section (a few minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from exact_reference import least_cost, reference_fit
from readme_section import replace_section

from qmri_helpers import fitting, models, phantom

SIZES = {"128x128": (1, 128, 128), "256x256": (1, 256, 256), "256x256x32": (32, 256, 256)}
LARGE = {"256x256x128": (128, 256, 256)}
SOLVERS = {
    "seed: dictionary + 2000 Adam (fit_adam)": "seed",
    "MRpro's recipe: dictionary + 2000 plain Adam": "plain",
    "VarPro grid only (closed-form M0)": "varpro",
    "exact VarPro, seed model (fit_lm)": "lm",
    "exact VarPro, 3-parameter (fit_lm)": "lm3",
}
SEED, BEST = "seed: dictionary + 2000 Adam (fit_adam)", "exact VarPro, seed model (fit_lm)"
BEST_3 = "exact VarPro, 3-parameter (fit_lm)"
#: Adam iterations of the seed recipe; on volumes (and busy rows) it runs ADAM_SHORT, scaled.
ADAM_ITERATIONS, ADAM_SHORT = 2000, 200
#: Timed repeats of a fast solver after its warm-up at full size, on any device (the median
#: is reported: a shared machine's timings scatter by a third from call to call), and of a
#: whole (2000-step) Adam recipe; a shortened one (volumes, busy rows) runs once.
REPEATS, ADAM_REPEATS = 5, 3
#: Slices of a volume that the reference covers.
REFERENCE_SLICES = 4
#: Longest life of the busy background process (s); it is stopped as soon as its row is done.
BUSY_SECONDS = 600


def make_data(shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """Images (10, z, y, x), TIs (s) and the true T1 map (z, y, x), 0 outside the vials."""
    truth = phantom.make_phantom(shape[1:])
    images = torch.empty((len(phantom.DEFAULT_TI), *shape), dtype=torch.float32)
    for z in range(shape[0]):  # slice by slice, so the data's float32 copy is the only big one
        images[:, z] = torch.from_numpy(
            phantom.simulate_inversion_recovery(truth, phantom.DEFAULT_TI, 15.0, snr=100, seed=z)
        )[:, 0]
    t1 = np.repeat(truth.t1, shape[0], axis=0)
    vials = np.repeat(truth.vial_mask((0.1, 2.5)), shape[0], axis=0)
    return images, torch.tensor(phantom.DEFAULT_TI), np.where(vials, t1, 0.0)


def reference_voxels(truth: np.ndarray) -> np.ndarray:
    """Flat indices of the vial voxels the reference covers (all, or 4 slices of a volume)."""
    vials = truth > 0
    if vials.shape[0] > 1:
        keep = np.zeros(vials.shape[0], dtype=bool)
        keep[:: max(1, vials.shape[0] // REFERENCE_SLICES)] = True
        vials = vials & keep[:, None, None]
    return np.flatnonzero(vials)


def reference_model(kind: str, ti: torch.Tensor):
    return models.ir_three_parameter_model(ti) if kind == "lm3" else models.ir_seed_model(ti)


#: MRpro's T1 recipe (PTB-MR/mrpro, examples/scripts/qmri_sg_challenge_2024_t1.py): a dictionary
#: of 100 T1 values from 0.1 to 3 s, then 2000 steps of torch's Adam, learning rate 0.1.
MRPRO_T1_GRID = (0.1, 3.0, 100)
MRPRO_LR = 0.1
#: Voxels matched at once by MRpro's DictionaryMatchOp (its default batch size).
MRPRO_BATCH = 2**20


def plain_adam(images: torch.Tensor, ti: torch.Tensor, n_iter: int) -> torch.Tensor:
    """MRpro's T1 recipe, rewritten in plain torch with MRpro's settings and arithmetic.

    Model ``|M0 (1 - 2 exp(-(TI / T1)))|`` (``MagnitudeOp @ InversionRecovery``). Start values
    by dictionary matching (``DictionaryMatchOp``): the atom with the largest squared dot
    product of the unit-norm curves, M0 by least squares on that atom. Then torch's Adam
    (default betas, eps and implementation) with learning rate 0.1 on M0 and T1 themselves,
    minimising one MSE over all numbers, ``mean(|1.0 * (x - data)|^2)`` (``MSE``, an
    ``L2NormSquared`` with weight 1). No bounds and no normalisation: voxels whose T1 goes
    negative fail. Denormal flushing and the thread count are the caller's, as for the other
    rows, so the timing compares the recipes and not the environment.
    """
    ti = ti.to(images)

    def model(m0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:  # (n_times, *t1.shape)
        times = ti.reshape(-1, *([1] * t1.ndim))
        return (m0 * (1 - 2 * torch.exp(-(times / t1)))).abs()

    grid = torch.linspace(*MRPRO_T1_GRID, dtype=images.dtype, device=images.device)
    atoms = model(torch.ones_like(grid), grid)  # (n_times, k)
    inverse_norm = atoms.norm(dim=0).reciprocal()
    atoms = atoms * inverse_norm
    curves = images.reshape(len(ti), -1).T  # (voxels, n_times)
    m0 = torch.empty(len(curves), dtype=images.dtype, device=images.device)
    t1 = torch.empty_like(m0)
    for first in range(0, len(curves), MRPRO_BATCH):
        chunk = curves[first : first + MRPRO_BATCH]
        best = (chunk @ atoms).square().argmax(dim=1)
        t1[first : first + MRPRO_BATCH] = grid[best]
        m0[first : first + MRPRO_BATCH] = (chunk * atoms[:, best].T).sum(1) * inverse_norm[best]
    shape = images.shape[1:]
    params = [p.reshape(shape).clone().requires_grad_(True) for p in (m0, t1)]
    optimizer = torch.optim.Adam(params, lr=MRPRO_LR)
    target = images.abs()
    for _ in range(n_iter):
        optimizer.zero_grad()
        (1.0 * (model(*params) - target)).abs().square().mean().backward()
        optimizer.step()
    return params[1].detach()


def run_solver(kind: str, images: torch.Tensor, ti: torch.Tensor, n_iter: int) -> torch.Tensor:
    """The T1 map (s) of one solver, same shape as the images' voxels, on the images' device."""
    if kind == "seed":
        model = models.inversion_recovery(ti)
        start = fitting.dictionary_match(images, model, "t1", torch.logspace(-2, 1, 300))
        result = fitting.fit_adam(
            model, images, start, n_iter=n_iter, progress=False, device=images.device
        )
        return result.params["t1"]
    if kind == "plain":
        with fitting._flush_denormals():
            return plain_adam(images, ti.to(images.device), n_iter)
    if kind == "varpro":
        return fitting.fit_varpro(models.ir_seed_model(ti), images).params["t1"]
    if kind in ("lm", "lm3"):
        return fitting.fit_lm(reference_model(kind, ti), images).params["t1"]
    raise ValueError(kind)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def one(kind: str, size: str, reference: str, device: str, short: bool) -> dict:
    """Run one solver on one size in this process; report time, memory and errors."""
    images, ti, truth = make_data({**SIZES, **LARGE}[size])
    dev = torch.device(device)
    n_iter = ADAM_SHORT if short else ADAM_ITERATIONS
    warm_images = images[:, :1, :16, :16].to(dev)
    run_solver(kind, warm_images, ti, 2 if kind in ("seed", "plain") else n_iter)
    images = images.to(dev)
    out: dict = {"voxels": int(np.prod(images.shape[1:])), "device": device}
    adam = kind in ("seed", "plain")
    # the first call at full size is the warm-up, timed apart
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    _sync(dev)
    start = time.perf_counter()
    # (Adam's steps repeat one another: a few of them warm up as well as all of them)
    run_solver(kind, images, ti, 20 if adam else n_iter)
    _sync(dev)
    if not adam:
        out["warmup_s"] = time.perf_counter() - start
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    runs = []
    for _ in range((1 if short else ADAM_REPEATS) if adam else REPEATS):
        _sync(dev)
        start = time.perf_counter()
        t1 = run_solver(kind, images, ti, n_iter)
        _sync(dev)
        runs.append(time.perf_counter() - start)
    seconds = float(np.median(runs))
    if len(runs) > 1:
        out["runs_s"] = runs
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(seconds=seconds, peak_mb=peak, extra_mb=peak - baseline)
    if dev.type == "cuda":
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    if short and kind in ("seed", "plain"):
        out["seconds"] = seconds * ADAM_ITERATIONS / ADAM_SHORT
        out["note"] = f"{ADAM_SHORT} of {ADAM_ITERATIONS} steps, time scaled"
        return out
    if dev.type == "cuda" and kind in ("lm", "lm3"):
        out.update(compare_with_cpu(kind, images, ti, truth))
    if reference == "-":
        return out
    voxels = reference_voxels(truth)
    fitted = t1.detach().cpu().numpy().reshape(-1)[voxels].astype(np.float64)
    ref = np.load(reference)
    err = np.abs(fitted / ref - 1)
    err = np.where(np.isfinite(err), err, np.inf)
    out["ref"] = [float(np.median(err)), float(np.percentile(err, 95)), float(err.max())]
    out["failed"] = int((~(fitted > 0)).sum())
    out["reference_voxels"] = int(voxels.size)
    return out


def compare_with_cpu(kind: str, images: torch.Tensor, ti: torch.Tensor, truth: np.ndarray) -> dict:
    """The same fit on the CPU: max relative T1 difference over the vials and over all voxels.

    Where a voxel's T1 differs by more than 1e-6, the float64 cost of each device's T1 (the
    least cost over the linear coefficients and sign patterns, from ``exact_reference``) is
    compared too: equal within 1e-7 relative means two minima of (numerically) equal cost, a
    tie that either device may resolve its own way; a lower cost on one device means the other
    missed the optimum.
    """
    model = reference_model(kind, ti)
    gpu = fitting.fit_lm(model, images)
    cpu = fitting.fit_lm(model, images.cpu())
    a, b = gpu.params["t1"].numpy().reshape(-1), cpu.params["t1"].numpy().reshape(-1)
    both = (a > 0) & (b > 0)
    diff = np.where(both, np.abs(a / np.where(both, b, 1) - 1), 0.0)
    vials = truth.reshape(-1) > 0
    off = np.flatnonzero(diff > 1e-6)
    data = images.cpu().reshape(images.shape[0], -1)[:, off].to(torch.float64)

    def cost(t1: np.ndarray) -> np.ndarray:
        if off.size == 0:
            return np.zeros(0)
        return least_cost(model, data, torch.as_tensor(t1[off], dtype=torch.float64)).numpy()

    ca, cb = cost(a), cost(b)
    rel = (ca - cb) / np.maximum(cb, 1e-300)
    return {
        "vs_cpu_vials": float(diff[vials].max()),
        "vs_cpu_all": float(diff.max()),
        "differ": int(off.size),
        "differ_in_vials": int(vials[off].sum()),
        "differ_tie": int((np.abs(rel) <= 1e-7).sum()),
        "differ_gpu_lower": int((rel < -1e-7).sum()),
        "differ_cpu_lower": int((rel > 1e-7).sum()),
        "valid_differ": int((gpu.valid.numpy() != cpu.valid.numpy()).sum()),
    }


def references(size: str, folder: Path) -> dict[str, str]:
    """Compute the reference of both models for one size once; return the files by model."""
    images, ti, truth = make_data({**SIZES, **LARGE}[size])
    voxels = reference_voxels(truth)
    data = images.reshape(images.shape[0], -1)[:, voxels]
    files = {}
    for name in ("lm", "lm3"):
        path = folder / f"{size}-{name}.npy"
        if not path.exists():  # a folder given with --refs may hold it from an earlier run
            np.save(path, reference_fit(reference_model(name, ti), data).numpy())
        files[name] = str(path)
    return files


def busy_process() -> subprocess.Popen:
    """One CPU-bound background process that stops itself after BUSY_SECONDS."""
    loop = (
        f"import time\nend = time.monotonic() + {BUSY_SECONDS}\n"
        "while time.monotonic() < end:\n    pass\n"
    )
    return subprocess.Popen([sys.executable, "-c", loop])


def run_child(args: list[str], env: dict | None = None, busy: bool = False) -> dict:
    background = busy_process() if busy else None
    try:
        time.sleep(0.5 if busy else 0)  # let the loop start
        run = subprocess.run(
            [sys.executable, __file__, "--one", *args],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
    finally:
        if background is not None:
            background.terminate()
            background.wait()
    return json.loads(run.stdout.strip().splitlines()[-1])


def _times(ratio: float) -> str:
    return f"{ratio:.0f}x" if ratio >= 10 else f"{ratio:.2g}x"


def table(rows: list[tuple[str, str, dict]]) -> str:
    head = (
        "| size | solver | device | s | speed-up | vs exact reference: median / p95 / max "
        "| failed | peak MB (extra) |\n|---|---|---|---|---|---|---|---|\n"
    )
    seed = {(size, r["device"]): r["seconds"] for size, label, r in rows if label == SEED}
    lines = []
    for size, solver, r in rows:
        errors = " / ".join(f"{v * 100:.2g}%" for v in r["ref"]) if "ref" in r else "n/a"
        seconds = f"{r['seconds']:.3g}"
        if "warmup_s" in r:
            seconds += f" (warm-up {r['warmup_s']:.3g})"
        if "note" in r:
            seconds += f" ({r['note']})"
        if "vs_cpu_vials" in r:
            errors += (
                f"; vs CPU: max {r['vs_cpu_vials']:.1e} (vials), {r['vs_cpu_all']:.1e} (all); "
                f"{r['differ']} voxels > 1e-6 ({r.get('differ_in_vials', '?')} in vials; "
                f"{r['differ_tie']} at equal cost, {r['differ_gpu_lower']} lower on the GPU, "
                f"{r.get('differ_cpu_lower', '?')} lower on the CPU)"
            )
        base = seed.get((size, r["device"]))
        speedup = _times(base / r["seconds"]) if base and solver != SEED else ""
        memory = f"{r['peak_mb']:.0f} ({r['extra_mb']:.0f})"
        if "gpu_peak_mb" in r:
            memory += f", GPU {r['gpu_peak_mb']:.0f}"
        lines.append(
            f"| {size} | {solver} | {r['device']} | {seconds} | {speedup} | {errors} "
            f"| {r.get('failed', 'n/a')} | {memory} |"
        )
    return head + "\n".join(lines)


def load() -> str:
    try:
        return "load average " + " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


def gpu_rows(refs: dict[str, dict[str, str]], sizes: list[str]) -> list[tuple[str, str, dict]]:
    """The seed recipe and the exact solvers on the GPU, each size in its own process."""
    rows = []
    for size in sizes:
        volume = {**SIZES, **LARGE}[size][0] > 1
        for label, kind in ((SEED, "seed"), (BEST, "lm"), (BEST_3, "lm3"))[: 2 if volume else 3]:
            ref = refs.get(size, {}).get("lm3" if kind == "lm3" else "lm", "-")
            short = "short" if kind == "seed" and (volume or ref == "-") else "full"
            rows.append((size, label, run_child([kind, size, ref, "cuda", short])))
            row = json.dumps(rows[-1][2])
            print(
                f"{time.strftime('%X')} done: GPU {size} {label}: {row}",
                file=sys.stderr,
                flush=True,
            )
    return rows


def summary(rows: list[tuple[str, str, dict]], before: str, gpu: str) -> str:
    """The table, the speed-ups of the exact solver and the machine, as the README shows them."""
    by = {(size, label, r["device"]): r for size, label, r in rows}
    seconds = {key: r["seconds"] for key, r in by.items()}
    speed = [
        f"{size} {dev}: {_times(seconds[(size, SEED, dev)] / seconds[(size, BEST, dev)])}"
        for size, label, dev in by
        if label == BEST and (size, SEED, dev) in by
    ]
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, GPU: {gpu}, "
        f"{time.strftime('%Y-%m-%d')}; {before} at the start, {load()} at the end"
    )
    return (
        f"{table(rows)}\n\nSpeed-up of {BEST} over the seed recipe, same run: "
        f"{', '.join(speed)}.\n\nMeasured on: {machine}.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--readme", action="store_true", help="rewrite the README section")
    parser.add_argument("--quick", action="store_true", help="128x128 only")
    parser.add_argument("--gpu", action="store_true", help="the GPU rows alone (needs CUDA)")
    parser.add_argument("--out", type=Path, help="also write the section's text to this file")
    parser.add_argument("--refs", type=Path, help="keep (and reuse) the references in this folder")
    args = parser.parse_args()
    if args.one:
        kind, size, reference, device, short = args.one
        if os.environ.get("QMRI_THREAD_POLICY") == "0":
            fitting.THREAD_POLICY = False
        print(json.dumps(one(kind, size, reference, device, short == "short")))
        return
    before = load()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    if args.gpu and gpu == "none":
        raise SystemExit("--gpu needs a CUDA GPU; none is visible to torch")
    sizes = ["128x128"] if args.quick else list(SIZES)
    gpu_sizes = ["256x256"] if args.quick else ["256x256", "256x256x32", "256x256x128"]
    busy_size = sizes[-1] if args.quick else "256x256"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ref_sizes = [s for s in gpu_sizes if s in SIZES] if args.gpu else sizes
        refs = {size: references(size, args.refs or Path(tmp)) for size in ref_sizes}
        print("references done", file=sys.stderr, flush=True)
        if not args.gpu:
            for size in sizes:
                volume = SIZES[size][0] > 1
                for label, kind in SOLVERS.items():
                    ref = refs[size]["lm3" if kind == "lm3" else "lm"]
                    short = "short" if volume and kind in ("seed", "plain") else "full"
                    rows.append((size, label, run_child([kind, size, ref, "cpu", short])))
                    print(f"done: {size} {label}", file=sys.stderr, flush=True)
            if not args.quick:
                large = run_child(["lm", "256x256x128", "-", "cpu", "short"])
                rows.append(("256x256x128", BEST, large))
            for policy in ("1", "0"):
                env = {**os.environ, "QMRI_THREAD_POLICY": policy}
                state = "on" if policy == "1" else "off"
                for label, kind in ((SEED, "seed"), (BEST, "lm")):
                    row = run_child(
                        [kind, busy_size, refs[busy_size]["lm"], "cpu", "short"], env=env, busy=True
                    )
                    rows.append((busy_size, f"{label}, busy machine, thread policy {state}", row))
                    print(f"done: busy {kind} policy {state}", file=sys.stderr, flush=True)
            if gpu != "none":
                rows += gpu_rows(refs, gpu_sizes)
        else:
            rows = gpu_rows(refs, gpu_sizes)
    text = summary(rows, before, gpu)
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.readme:
        replace_section("gpu-benchmark" if args.gpu else "benchmark", text)


if __name__ == "__main__":
    main()

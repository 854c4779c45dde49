"""The thread policy on and off, idle and with one busy background process, in one process.

``fit_lm`` (seed model) on the synthetic IR phantom at 256x256 (10 TIs, SNR 100), with
``qmri_helpers.fitting.THREAD_POLICY`` on, off, and on with the previous ``idle_cores`` (which
counted this process's own threads as load). The variants alternate within each repetition, in
a rotating order, so a change of the machine's load hits them alike; the table gives medians
(ms) and the share of the policy's calls that saw 2 idle cores.

    python benchmarks/thread_policy.py [--reps 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from fit_speed import busy_process, make_data

from qmri_helpers import fitting, models


def previous_idle_cores() -> int:
    """``idle_cores`` before: all runnable tasks but one counted as other processes' load."""
    cores = os.cpu_count() or 1
    running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0]) - 1
    return max(1, cores - running)


def measure(model, images, reps: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    current = fitting.idle_cores
    variants = {
        "policy off": (False, current),
        "policy on": (True, current),
        "policy on, previous idle_cores": (True, previous_idle_cores),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    granted: dict[str, list[int]] = {name: [] for name in variants}
    names = list(variants)
    for rep in range(reps):
        # each variant follows each other one equally often (the one before leaves its threads)
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            on, idle = variants[name]

            def counted(idle=idle, name=name):
                granted[name].append(idle())
                return granted[name][-1]

            fitting.THREAD_POLICY, fitting.idle_cores = on, counted
            start = time.perf_counter()
            fitting.fit_lm(model, images)
            times[name].append(time.perf_counter() - start)
    fitting.THREAD_POLICY, fitting.idle_cores = True, current
    return times, granted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args()
    images, ti, _ = make_data((1, 256, 256))
    model = models.ir_seed_model(ti)
    fitting.fit_lm(model, images)  # warm-up
    print(f"torch threads: {torch.get_num_threads()}, cores: {os.cpu_count()}")
    print("| machine | variant | median (ms) | min-max (ms) | idle cores seen (share of 2) |")
    print("|---|---|---|---|---|")
    for machine in ("idle", "one busy process"):
        background = busy_process() if machine != "idle" else None
        try:
            if background is not None:
                time.sleep(0.5)  # let the loop start
            times, granted = measure(model, images, args.reps)
        finally:
            if background is not None:
                background.terminate()
                background.wait()
        for name, values in times.items():
            ms = [1000 * v for v in values]
            seen = granted[name]
            share = f"{sum(g >= 2 for g in seen) / len(seen):.0%}" if seen else "-"
            print(
                f"| {machine} | {name} | {statistics.median(ms):.0f} "
                f"| {min(ms):.0f}-{max(ms):.0f} | {share} |"
            )


if __name__ == "__main__":
    main()

"""``fit_adam`` (the seed recipe) against MRpro's Adam recipe, interleaved, in one process.

``fit_speed.py`` runs each Adam recipe once per size, in its own process, so their ratio
scatters with the machine's load from run to run. Here both recipes (dictionary start, then
Adam; see ``fit_speed.run_solver``) fit the synthetic IR phantom (10 TIs, SNR 100) in
alternating order within each repetition, after one warm-up call each, so a change of the
machine's load hits them alike. Each call is a whole recipe, its dictionary start included,
with ``--steps`` Adam steps (a step costs the same at any point of a fit, so the ratio at
2000 steps lies between this one and the steps' own); the table gives the median seconds per
call and their ratio. Denormals are flushed for both, as in ``fit_speed.py``.

    python benchmarks/adam_recipes.py [--reps 5] [--steps 200] [--sizes 128 256]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from fit_speed import make_data, run_solver

RECIPES = {"seed": "fit_adam (seed recipe)", "plain": "MRpro's recipe"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="calls of each recipe per size")
    parser.add_argument("--steps", type=int, default=200, help="Adam steps per call")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="image sides")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}; {args.reps} calls of "
          f"{args.steps} steps each, alternating")  # fmt: skip
    print("| size | fit_adam (s) | MRpro's recipe (s) | fit_adam / MRpro |\n|---|---|---|---|")
    for side in args.sizes:
        images, ti, _ = make_data((1, side, side))
        seconds: dict[str, list[float]] = {kind: [] for kind in RECIPES}
        for kind in RECIPES:  # warm-up: the first call in a process pays for its setup
            run_solver(kind, images, ti, 2)
        for rep in range(args.reps):
            order = list(RECIPES)[rep % 2 :] + list(RECIPES)[: rep % 2]
            for kind in order:
                start = time.perf_counter()
                run_solver(kind, images, ti, args.steps)
                seconds[kind].append(time.perf_counter() - start)
        seed, plain = (statistics.median(seconds[kind]) for kind in RECIPES)
        print(f"| {side}x{side} | {seed:.3g} | {plain:.3g} | {seed / plain:.2f} |")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

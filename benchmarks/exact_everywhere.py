"""Exactness over every voxel of the 256x256 phantom, background included: a script that prints.

``fit_speed.py`` measures errors in the vials. Here every voxel the solver reports valid is
checked: its T1's float64 cost (the least over the linear coefficients and sign patterns, from
``exact_reference``) against the cost at the independent reference's T1. A valid voxel whose
cost is higher by more than 1e-9 (relative) is not at the global optimum. Background voxels
hold noise: their optimum means nothing physically, but a solver that is exact only where the
signal is strong says so. The seed model runs twice: by default and without
``solvers.FAR_BASINS`` (each voxel's best other basin refined too). The reference of all
65,536 voxels takes a few minutes; ``--refs`` keeps it.

    python benchmarks/exact_everywhere.py --refs .probe/refs
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from exact_reference import least_cost, reference_fit
from fit_speed import make_data, reference_model

from qmri_helpers import fitting, solvers

#: Relative cost above the reference's that counts as missing the optimum.
MISS = 1e-9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--refs", type=Path, help="keep (and reuse) the references here")
    args = parser.parse_args()
    images, ti, truth = make_data((1, 256, 256))
    data = images.reshape(images.shape[0], -1).to(torch.float64)
    vials = truth.reshape(-1) > 0
    runs = (
        ("lm", "seed", True), ("lm", "seed, FAR_BASINS off", False), ("lm3", "3-parameter", True)
    )  # fmt: skip
    for kind, name, far in runs:
        solvers.FAR_BASINS = far
        model = reference_model(kind, ti)
        path = args.refs / f"all-256x256-{kind}.npy" if args.refs else None
        if path is not None and path.exists():
            ref = torch.from_numpy(np.load(path))
        else:
            start = time.perf_counter()
            ref = reference_fit(model, data)
            print(f"{name}: reference of every voxel in {time.perf_counter() - start:.0f} s")
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                np.save(path, ref.numpy())
        fit = fitting.fit_lm(model, images)
        valid = fit.valid.reshape(-1)
        t1 = fit.params["t1"].reshape(-1)[valid].to(torch.float64)
        cost = least_cost(model, data[:, valid], t1)
        best = least_cost(model, data[:, valid], ref[valid])
        excess = ((cost - best) / best).numpy()
        missed = excess > MISS
        print(
            f"{name}: {int(valid.sum())} of {valid.numel()} voxels valid, "
            f"failures {fit.failures}; valid voxels above the reference's cost by > {MISS:g}: "
            f"{int(missed.sum())} ({int(missed[vials[valid.numpy()]].sum())} in vials), "
            f"largest excess {float(excess.max()):.2g}"
        )


if __name__ == "__main__":
    main()

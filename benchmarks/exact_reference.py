r"""An independent float64 reference for voxel-wise T1/T2* fits: dense grid, then golden section.

It shares nothing with :mod:`qmri_helpers.solvers` but the model's basis :math:`\Phi(\tau)`
(the definition of the model). For every voxel and every tau the magnitude cost is computed
exactly: the linear coefficients by least squares (normal equations in float64) for each sign
pattern a monotone curve can have (none, the first j points negative for every j), the best
pattern kept. A dense log-spaced grid over the model's bounds brackets the global minimum;
golden-section search inside the bracket of two grid steps then refines tau to 1e-11.

Used by ``benchmarks/fit_speed.py`` and by ``tests/test_exact.py``.
"""

from __future__ import annotations

import math

import torch

from qmri_helpers.models import SeparableModel

#: Golden-section ratio.
_GOLDEN = (math.sqrt(5) - 1) / 2


def _patterns(model: SeparableModel) -> torch.Tensor:
    """Sign patterns ``(S, n)`` to try: all 'first j points negative' (in time order)."""
    n = model.times.numel()
    rank = torch.argsort(torch.argsort(model.times))
    if not model.magnitude:
        return torch.ones((1, n), dtype=torch.float64)
    j = torch.arange(n)[:, None]
    return torch.where(rank[None, :] < j, -1.0, 1.0).to(torch.float64)  # j = 0 .. n-1


def profile_cost(model: SeparableModel, y: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Least-squares cost over the linear coefficients, magnitude aware.

    ``y`` (n, V) float64 data, ``tau`` (G, V): returns the cost (G, V). The coefficients solve
    the normal equations (written out for one or two of them); the seed model's M0 is >= 0.
    """
    g, v = tau.shape
    phi = model.basis(tau.reshape(-1)).reshape(y.shape[0], -1, g, v)  # (n, p, G, V)
    seed = model.magnitude and not model.polarity
    if seed:
        phi = phi.abs()
    p = phi.shape[1]
    gram = (phi[:, :, None] * phi[:, None, :]).sum(0)  # (p, p, G, V)
    yy = (y * y).sum(0)
    best = None
    patterns = _patterns(model) if model.polarity else torch.ones((1, y.shape[0]), dtype=y.dtype)
    for s in patterns:
        b = (phi * (y * s[:, None])[:, None, None]).sum(0)  # (p, G, V)
        if p == 1:
            c = b / gram[0]
            if seed:
                c = c.clamp_min(0)
            fit = 2 * c * b - c * c * gram[0]
        elif p == 2:
            det = gram[0, 0] * gram[1, 1] - gram[0, 1] ** 2
            c0 = (gram[1, 1] * b[0] - gram[0, 1] * b[1]) / det
            c1 = (gram[0, 0] * b[1] - gram[0, 1] * b[0]) / det
            fit = (c0 * b[0] + c1 * b[1])[None]
        else:
            raise NotImplementedError("the reference handles one or two coefficients")
        cost = yy - fit[0]
        best = cost if best is None else torch.minimum(best, cost)
    return best


def reference_fit(
    model: SeparableModel, data: torch.Tensor, points: int = 1000, chunk: int = 1024
) -> torch.Tensor:
    """The global least-squares tau of each voxel of ``data (n, V)``, in float64, shape (V,)."""
    lo, hi = (math.log(b) for b in model.bounds)
    log_grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    step = log_grid[1] - log_grid[0]
    out = torch.empty(data.shape[1], dtype=torch.float64)
    for start in range(0, data.shape[1], chunk):
        y = data[:, start : start + chunk].to(torch.float64)
        v = y.shape[1]
        costs = torch.cat(
            [
                profile_cost(model, y, log_grid[i : i + 250, None].exp().expand(-1, v))
                for i in range(0, points, 250)
            ]
        )
        k = costs.argmin(0)
        a = (log_grid[k] - step).clamp(lo, hi)
        b = (log_grid[k] + step).clamp(lo, hi)
        # golden section on [a, b]
        x1 = b - _GOLDEN * (b - a)
        x2 = a + _GOLDEN * (b - a)
        f1 = profile_cost(model, y, x1[None].exp())[0]
        f2 = profile_cost(model, y, x2[None].exp())[0]
        for _ in range(48):  # 0.618^48 of two grid steps: below 1e-11 in ln tau
            left = f1 < f2
            a, b = torch.where(left, a, x1), torch.where(left, x2, b)
            x1, x2 = (
                torch.where(left, b - _GOLDEN * (b - a), x2),
                torch.where(left, x1, a + _GOLDEN * (b - a)),
            )
            fn = profile_cost(model, y, torch.where(left, x1, x2)[None].exp())[0]
            f1, f2 = torch.where(left, fn, f2), torch.where(left, f1, fn)
        out[start : start + v] = ((a + b) / 2).exp()
    return out

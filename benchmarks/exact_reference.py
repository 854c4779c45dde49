r"""An independent float64 reference for voxel-wise T1/T2* fits: dense grid, then golden section.

It shares nothing with :mod:`qmri_helpers.solvers` but the model's basis :math:`\Phi(\tau)`
(the definition of the model). Magnitude data are fitted once for every sign pattern a
monotone curve can have (the first j points negative, for every j), each a smooth function of
tau after the linear coefficients are solved for (normal equations, float64); the best pattern
is kept. For each pattern a dense log-spaced grid over the model's bounds brackets the global
minimum, and golden-section search inside the bracket of two grid steps refines tau to 1e-11.

Used by ``benchmarks/fit_speed.py`` and by ``tests/test_exact.py``.
"""

from __future__ import annotations

import math

import torch

from qmri_helpers.models import SeparableModel

#: Golden-section ratio.
_GOLDEN = (math.sqrt(5) - 1) / 2


def _patterns(model: SeparableModel) -> torch.Tensor:
    """Sign patterns ``(S, n)`` to try.

    For magnitude data every 'first j points negative' (in time order, j = 0 .. n-1; the others
    follow by the overall sign), for signed data none.
    """
    n = model.times.numel()
    if not model.magnitude:
        return torch.ones((1, n), dtype=torch.float64)
    rank = torch.argsort(torch.argsort(model.times))
    j = torch.arange(n)[:, None]
    return torch.where(rank[None, :] < j, -1.0, 1.0).to(torch.float64)


def signed_cost(model: SeparableModel, ys: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Least-squares cost of the signed model over its linear coefficients.

    ``ys`` (n, V) float64 (sign-restored) data, ``tau`` (G, V): returns the cost (G, V). The
    coefficients solve the normal equations, written out for one or two of them.
    """
    g, v = tau.shape
    phi = model.basis(tau.reshape(-1)).reshape(ys.shape[0], -1, g, v)  # (n, p, G, V)
    gram = (phi[:, :, None] * phi[:, None, :]).sum(0)  # (p, p, G, V)
    b = (phi * ys[:, None, None]).sum(0)  # (p, G, V)
    if phi.shape[1] == 1:
        fit = b[0] ** 2 / gram[0, 0]
    elif phi.shape[1] == 2:
        det = gram[0, 0] * gram[1, 1] - gram[0, 1] ** 2
        c0 = (gram[1, 1] * b[0] - gram[0, 1] * b[1]) / det
        c1 = (gram[0, 0] * b[1] - gram[0, 1] * b[0]) / det
        fit = c0 * b[0] + c1 * b[1]
    else:
        raise NotImplementedError("the reference handles one or two coefficients")
    return (ys * ys).sum(0) - fit


def least_cost(model: SeparableModel, data: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """The cost of each voxel of ``data (n, V)`` at ``tau (V,)``: the least over sign patterns.

    For magnitude data the cost of the magnitude model (every pattern tried), for signed data
    :func:`signed_cost`; float64, shape (V,).
    """
    ys = data.to(torch.float64)
    each = [signed_cost(model, s[:, None] * ys, tau[None])[0] for s in _patterns(model)]
    return torch.stack(each).min(0).values


def reference_fit(
    model: SeparableModel, data: torch.Tensor, points: int = 600, chunk: int = 1024
) -> torch.Tensor:
    r"""The global least-squares tau of each voxel of ``data (n, V)``, in float64, shape (V,).

    For magnitude data :math:`\| |\Phi c| - y \|^2 = \min_s \|\Phi c - s y\|^2` over the
    sign patterns, so each pattern is minimised on its own (a smooth function of tau) and the
    best pattern kept.
    """
    lo, hi = (math.log(b) for b in model.bounds)
    log_grid = torch.linspace(lo, hi, points, dtype=torch.float64)
    step = log_grid[1] - log_grid[0]
    out = torch.empty(data.shape[1], dtype=torch.float64)
    for start in range(0, data.shape[1], chunk):
        y = data[:, start : start + chunk].to(torch.float64)
        v = y.shape[1]
        best_cost = torch.full((v,), torch.inf, dtype=torch.float64)
        best_u = torch.zeros(v, dtype=torch.float64)
        for s in _patterns(model):
            ys = y * s[:, None]
            costs = torch.cat(
                [
                    signed_cost(model, ys, log_grid[i : i + 200, None].exp().expand(-1, v))
                    for i in range(0, points, 200)
                ]
            )
            k = costs.argmin(0)
            a = (log_grid[k] - step).clamp(lo, hi)
            b = (log_grid[k] + step).clamp(lo, hi)
            x1 = b - _GOLDEN * (b - a)
            x2 = a + _GOLDEN * (b - a)
            f1 = signed_cost(model, ys, x1[None].exp())[0]
            f2 = signed_cost(model, ys, x2[None].exp())[0]
            for _ in range(48):  # 0.618^48 of two grid steps: below 1e-11 in ln tau
                left = f1 < f2
                a, b = torch.where(left, a, x1), torch.where(left, x2, b)
                x1, x2 = (
                    torch.where(left, b - _GOLDEN * (b - a), x2),
                    torch.where(left, x1, a + _GOLDEN * (b - a)),
                )
                fn = signed_cost(model, ys, torch.where(left, x1, x2)[None].exp())[0]
                f1, f2 = torch.where(left, fn, f2), torch.where(left, f1, fn)
            u = (a + b) / 2
            cost = signed_cost(model, ys, u[None].exp())[0]
            better = cost < best_cost
            best_cost = torch.where(better, cost, best_cost)
            best_u = torch.where(better, u, best_u)
        out[start : start + v] = best_u.exp()
    return out

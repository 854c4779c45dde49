"""Fast and exact voxel-wise fits of separable models: variable projection and Levenberg-Marquardt.

A :class:`~qmri_helpers.models.SeparableModel` has linear coefficients (M0, or a and b) and one
nonlinear time constant tau (T1 or T2*). :func:`fit_varpro` finds the best tau of each voxel on
a grid, with the coefficients in closed form; :func:`fit_lm` refines it to the least-squares
optimum. Both return a :class:`~qmri_helpers.fitting.FitResult`.
"""

from __future__ import annotations

import einops
import torch
from tqdm.auto import trange

from .fitting import (
    FitResult,
    _estimate_sigma,
    _flushing_denormals,
    _goodness,
    _result,
    _solve,
)
from .models import SeparableModel
from .validation import (
    at_bound,
    check_data,
    check_mask,
    check_times,
    sort_model_times,
    voxel_status,
)

__all__ = ["fit_lm", "fit_varpro"]

#: Working memory for one chunk of voxels in the variable-projection grid search (bytes).
VARPRO_CHUNK_BYTES = 128 * 2**20
#: Voxels per chunk in Levenberg-Marquardt.
LM_CHUNK_VOXELS = 2**17


def _polarity_signs(y: torch.Tensor) -> torch.Tensor:
    """Sign patterns to try for magnitude IR data ``(n, V)``: shape ``(2, n, V)``.

    The null of an IR curve lies next to its smallest magnitude, at index m: the points before
    it are negative. Either the minimum itself is still negative (flip points 0..m) or already
    positive (flip points 0..m-1); these two candidates cover every position of the null.
    """
    n = y.shape[0]
    index = torch.arange(n, device=y.device)[:, None]
    m = y.argmin(0, keepdim=True)
    flip_through_min = torch.where(index <= m, -1.0, 1.0).to(y.dtype)
    flip_before_min = torch.where(index < m, -1.0, 1.0).to(y.dtype)
    return torch.stack([flip_through_min, flip_before_min])


def _varpro_chunk(
    model: SeparableModel, y: torch.Tensor, grid: torch.Tensor, polarity: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best grid value, coefficients and sign pattern for the voxels ``y`` of shape (n, V)."""
    basis = model.dictionary(grid).to(y.dtype)  # (n, p, K)
    if model.magnitude and not polarity:
        basis = basis.abs()  # the seed model's sign follows from tau: fit c |phi|
    q = torch.linalg.qr(einops.rearrange(basis, "n p k -> k n p")).Q  # (K, n, p), orthonormal
    signs = _polarity_signs(y) if polarity else torch.ones((1, *y.shape), dtype=y.dtype)
    n_voxels = y.shape[1]
    best = torch.full((n_voxels,), -torch.inf, dtype=y.dtype)
    best_k = torch.zeros(n_voxels, dtype=torch.long)
    best_sign = torch.zeros(n_voxels, dtype=torch.long)
    around = torch.zeros((3, n_voxels), dtype=y.dtype)  # scores at k-1, k, k+1 of the best
    for s, sign in enumerate(signs):
        projection = einops.einsum(q, sign * y, "k n p, n v -> k p v")
        scores = projection.square_().sum(1)  # (K, V): the largest projection, least residual
        score, k = scores.max(0)
        inner = k.clamp(1, grid.numel() - 2)
        neighbours = scores.gather(0, torch.stack([inner - 1, inner, inner + 1]))
        better = score > best
        best, best_k = torch.where(better, score, best), torch.where(better, k, best_k)
        best_sign = torch.where(better, s, best_sign)
        around = torch.where(better, neighbours, around)
    sign = signs[best_sign, :, torch.arange(n_voxels)].T  # (n, V)
    signed = sign * y
    # Refine between grid points: the vertex of a parabola through the scores at k-1, k, k+1
    # (in log tau), so that Levenberg-Marquardt starts close and needs few steps.
    inner = best_k.clamp(1, grid.numel() - 2)
    curvature = around[0] - 2 * around[1] + around[2]
    offset = torch.where(
        (curvature < 0) & (inner == best_k), 0.5 * (around[0] - around[2]) / curvature, 0.0
    ).clamp(-0.5, 0.5)
    log_grid = grid.log()
    spacing = (log_grid[inner + 1] - log_grid[inner - 1]) / 2
    tau = torch.exp(log_grid[best_k] + offset * spacing)
    phi = model.basis(tau)  # (n, p, V)
    if model.magnitude and not polarity:
        phi = phi.abs()
    phi = einops.rearrange(phi, "n p v -> v n p")
    normal = phi.transpose(1, 2) @ phi
    coefficients = _solve(normal, (phi.transpose(1, 2) @ signed.T[..., None])[..., 0]).T
    if model.magnitude and not polarity:
        coefficients = coefficients.abs()
    return tau, coefficients, sign


def _lm_chunk(
    model: SeparableModel,
    y: torch.Tensor,
    coefficients: torch.Tensor,
    tau: torch.Tensor,
    max_iter: int,
    tol: float,
    history: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt on all voxels of a chunk at once, with per-voxel damping.

    ``y`` is (n, V), ``coefficients`` (p, V), ``tau`` (V,). Each voxel keeps its own damping
    factor and stops on its own once a step changes its cost or tau by less than ``tol``
    (relative). Returns the coefficients, tau and the per-voxel iteration count.
    """
    lo, hi = model.bounds
    p = coefficients.shape[0]
    x = torch.cat([coefficients, tau[None]], 0).T.contiguous()  # (V, q)
    data = y.T  # (V, n)

    def evaluate(xs: torch.Tensor, ys: torch.Tensor):
        signal, jac = model.evaluate(xs[:, :p].T, xs[:, p])
        residual = ys - signal.T
        return residual, einops.rearrange(jac, "n q v -> v n q"), (residual**2).sum(-1)

    residual, jac, cost = evaluate(x, data)
    iterations = torch.zeros(cost.shape, dtype=torch.long)
    # The working set holds only the voxels still iterating; a voxel that is done is written
    # back once and dropped, so late iterations cost little.
    index = torch.arange(cost.numel())
    xa, ya, ra, ja, ca = x, data, residual, jac, cost
    lam = torch.full(cost.shape, 1e-3, dtype=y.dtype)
    total = float(cost.sum())
    for _ in range(max_iter):
        if index.numel() == 0:
            break
        jt = ja.transpose(1, 2)
        system = jt @ ja  # (A, q, q)
        gradient = (jt @ ra[..., None])[..., 0]  # (A, q)
        diagonal = system.diagonal(dim1=1, dim2=2)
        diagonal.add_(lam[:, None] * diagonal.clamp_min(1e-30))  # Marquardt's scaled damping
        step = _solve(system, gradient)
        trial = xa + step
        trial[:, p] = trial[:, p].clamp(lo, hi)
        trial_residual, trial_jac, trial_cost = evaluate(trial, ya)
        accept = torch.isfinite(trial_cost) & (trial_cost < ca)
        keep = accept[:, None]
        small_change = (ca - trial_cost <= tol * ca) | (
            (trial[:, p] - xa[:, p]).abs() <= tol * xa[:, p]
        )
        total -= float(torch.where(accept, ca - trial_cost, 0.0).sum())
        xa = torch.where(keep, trial, xa)
        ra = torch.where(keep, trial_residual, ra)
        ja = torch.where(keep[..., None], trial_jac, ja)
        ca = torch.where(accept, trial_cost, ca)
        lam = torch.where(accept, (lam / 10).clamp_min(1e-12), lam * 10)
        iterations[index] += 1
        done = (accept & small_change) | (lam > 1e12)
        if bool(done.any()):
            x[index[done]] = xa[done]
            going = ~done
            index, xa, ya, ra, ja, ca, lam = (
                index[going],
                xa[going],
                ya[going],
                ra[going],
                ja[going],
                ca[going],
                lam[going],
            )
        if history is not None:
            history.append(total)  # a number, not a map: memory stays flat
    x[index] = xa
    return x[:, :p].T, x[:, p], iterations


def _flatten(
    data: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    shape = data.shape[1:]
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool)
    mask_flat = check_mask(mask, shape)
    voxels = einops.rearrange(data, "c ... -> c (...)")
    if bool(mask_flat.all()):
        return voxels, mask_flat, shape  # a view: no copy of the data
    return voxels[:, mask_flat], mask_flat, shape


def _check_model(model: SeparableModel, data: torch.Tensor) -> None:
    if model.times.numel() != data.shape[0]:
        raise ValueError(
            f"the model has {model.times.numel()} time points but the data has {data.shape[0]}"
        )
    if model.times.numel() <= len(model.linear) + 1:
        raise ValueError(
            f"{model.times.numel()} time points cannot determine the {len(model.linear) + 1} "
            f"parameters of {model.name}"
        )


@_flushing_denormals
def fit_varpro(
    model: SeparableModel,
    data: torch.Tensor,
    grid: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    lm_iterations: int = 0,
    tol: float = 1e-6,
    noise_sigma: float | None = None,
    dtype: torch.dtype = torch.float64,
    progress: bool = False,
) -> FitResult:
    """Fit a separable model by variable projection, optionally refined by Levenberg-Marquardt.

    For every value of a log-spaced grid of tau the linear coefficients (M0, or a and b) have a
    closed-form least-squares solution, so the best grid value of each voxel is found with one
    projection per grid value; for magnitude IR data the two possible positions of the null
    are tried (polarity restoration). ``lm_iterations`` Levenberg-Marquardt steps then refine
    all parameters of all voxels at once, each voxel with its own damping and stopping rule,
    tau kept within ``model.bounds``. Voxels are processed in chunks, so memory stays bounded.

    Parameters
    ----------
    model
        A :class:`~qmri_helpers.models.SeparableModel`, e.g. ``ir_tr_model(ti, tr)``.
    data
        Signal of shape ``(n_times, ...)``: magnitudes for a magnitude model, else signed.
    grid
        Grid of tau in s; default 120 log-spaced values, 10 ms to 5 s for T1 and 1 ms to 1 s
        otherwise.
    mask
        Voxels to fit, shape ``(...)``; None fits all.
    lm_iterations
        Maximum number of Levenberg-Marquardt iterations (0: grid search only).
    tol
        A voxel has converged when a step changes its cost or tau by less than this, relative.
    noise_sigma
        Noise standard deviation for the Cramér-Rao ``sd``; None estimates it.
    dtype
        Precision of the computation (float64 by default; maps are returned in data's dtype).
    progress
        Show a tqdm progress bar over chunks.

    Returns
    -------
    FitResult
        Maps of the physical parameters (``model.derive``) and tau, with goodness of fit.
        Voxels with NaN or inf data, without signal (all zero) or with tau on a bound fail
        and are counted (``failures``); the bounds are ``model.bounds`` with
        Levenberg-Marquardt, the ends of the grid without.

    Raises
    ------
    ValueError
        For times that are not finite, negative or look like ms, empty data, a mask that
        selects nothing, a bad grid, or a model whose number of times differs from the data's.

    Notes
    -----
    Times out of order are sorted together with the data first (the polarity search needs
    them in order); the result is that of the sorted series.
    """
    data = check_data(data)
    check_times(model.times, "TI" if model.nonlinear == "t1" else "TE")
    _check_model(model, data)
    model, data = sort_model_times(model, data)
    voxels, mask_flat, shape = _flatten(data, mask)
    if grid is None:
        lo, hi = (0.01, 5.0) if model.nonlinear == "t1" else (0.001, 1.0)
        grid = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 120)
    grid = check_times(grid, f"grid of {model.nonlinear}").to(dtype)
    if grid.numel() < 3 or not bool((grid > 0).all()):
        raise ValueError(f"the grid needs at least 3 values, all > 0 s; got {grid.tolist()[:5]}")
    n, n_voxels = voxels.shape
    p = len(model.linear)
    work = model  # its basis is evaluated in the dtype of tau, so float64 throughout
    polarity = model.polarity
    finite, has_signal = voxel_status(voxels)
    chunk = max(1, VARPRO_CHUNK_BYTES // (8 * grid.numel() * (p + 2) + 8 * n * 4))
    chunk = min(chunk, LM_CHUNK_VOXELS) if lm_iterations else chunk
    # Parameters are kept in ``dtype`` (their exact optimum is the point), the goodness of fit
    # in the data's precision, to bound memory; each chunk fills its part.
    keep = data.dtype
    coefficients = torch.empty(p, n_voxels, dtype=dtype)
    tau = torch.empty(n_voxels, dtype=dtype)
    rss = torch.empty(n_voxels, dtype=keep)
    r_squared = torch.empty(n_voxels, dtype=keep)
    inverse_diag = torch.empty(n_voxels, p + 1, dtype=keep)
    history_chunks: list[list[float]] = []
    for start in trange(0, n_voxels, chunk, desc="VarPro+LM", disable=not progress, leave=False):
        sl = slice(start, start + chunk)
        y = torch.where(finite[sl], voxels[:, sl].to(dtype), 0.0)
        t, c, _ = _varpro_chunk(work, y, grid, polarity)
        history: list[float] = [float(((y - work(c, t)) ** 2).sum())]
        if lm_iterations:
            c, t, _ = _lm_chunk(work, y, c, t, lm_iterations, tol, history)
        history_chunks.append(history)
        signal, jac = work.evaluate(c, t)
        residual = (y - signal).T
        jac = einops.rearrange(jac, "n q v -> v n q")
        rss[sl], r_squared[sl], inverse_diag[sl] = _goodness(residual, jac, y.T)
        coefficients[:, sl], tau[sl] = c, t
    # A grid search alone cannot leave its grid: a voxel at either end is pinned there.
    pinned = at_bound(tau, model.bounds if lm_iterations else (grid.min(), grid.max()))
    ok = has_signal & torch.isfinite(rss) & torch.isfinite(tau) & ~pinned
    sigma = noise_sigma if noise_sigma is not None else _estimate_sigma(rss, ok, n - p - 1)
    params = {**model.derive(coefficients), model.nonlinear: tau}
    sd_unit = {name: inverse_diag[:, i].clamp_min(0).sqrt() for i, name in enumerate(model.linear)}
    sd_unit[model.nonlinear] = inverse_diag[:, p].clamp_min(0).sqrt()
    depth = max(len(h) for h in history_chunks)
    loss_history = [
        sum(h[min(i, len(h) - 1)] for h in history_chunks) / (n_voxels * n) for i in range(depth)
    ]
    return _result(
        shape, mask_flat, ok, params, rss.sqrt(), r_squared, sd_unit, sigma, loss_history,
        torch.device("cpu"), data.dtype,
        {"not finite": ~finite, "no signal": ~has_signal, "at a bound": pinned},
    )  # fmt: skip


def fit_lm(
    model: SeparableModel,
    data: torch.Tensor,
    max_iter: int = 50,
    **kwargs,
) -> FitResult:
    """Variable-projection start, then batched Levenberg-Marquardt: the fast and exact fit.

    A shorthand for ``fit_varpro(model, data, lm_iterations=max_iter, ...)``; see
    :func:`fit_varpro` for the parameters.
    """
    return fit_varpro(model, data, lm_iterations=max_iter, **kwargs)

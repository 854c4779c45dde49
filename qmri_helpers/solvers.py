r"""Fast and exact voxel-wise fits of separable models: variable projection on one time constant.

A :class:`~qmri_helpers.models.SeparableModel` has linear coefficients :math:`c` (M0, or a and
b) and one nonlinear time constant :math:`\tau` (T1 or T2*, in s). For a given :math:`\tau`
the coefficients have a closed-form least-squares solution, so each voxel's cost is a function
of :math:`\tau` alone (variable projection):

.. math:: f(\tau) = \min_c \|y - \Phi(\tau) c\|^2
          = \|y\|^2 - \|P_{\Phi(\tau)}\, y\|^2 .

:func:`fit_lm` finds the global minimum of :math:`f` within the model's bounds for every voxel:

1. a log-spaced grid over the whole bound range brackets each voxel's best :math:`\tau`;
2. one-dimensional Levenberg-Marquardt steps on :math:`\ln\tau` (the Golub-Pereyra
   Gauss-Newton curvature, or the secant of the slope over the last step where that is
   positive; a damping factor and a trust radius per voxel) refine it; a voxel leaves as soon
   as it has converged, or at once when it sits on a bound and the cost still falls beyond;
3. magnitude data: :math:`\| |\Phi c| - y \|` equals the smallest signed cost
   :math:`\|\Phi c - s \odot y\|` over the sign patterns :math:`s` a monotone IR curve can
   have (the first :math:`j` points negative, or the last). Each pattern gives a smooth
   :math:`f_s(\tau) \ge f(\tau)`, equal where the pattern is the model's own, so the global
   optimum is the best of the patterns' minima. The kink check refines several patterns and
   keeps the best: for the 3-parameter and TR-aware models the null next to the smallest
   magnitude (two patterns) and one point further either way, each from its own best grid
   value; for the seed model, whose pattern follows from tau, the pattern of the best grid
   value and, where a null lies within four grid steps, its neighbours. This is what fixes the
   local minima next to the null, where :math:`f` has a kink. (The patterns assume a monotone
   curve: exact for a constant TR; with a TR that changes with TI, as on Siemens scanners,
   a curve could in principle change sign twice.)

:func:`fit_varpro` with ``lm_iterations=0`` stops after the grid (with a parabolic refinement
between grid values), to show what the grid alone gives. Both run on the device of the data,
in chunks sized for that device, and return a :class:`~qmri_helpers.fitting.FitResult`.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import trange

from .fitting import (
    FitResult,
    _estimate_sigma,
    _flushing_denormals,
    _goodness,
    _result,
    thread_policy,
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

__all__ = ["CHUNK_BYTES", "chunk_voxels", "fit_lm", "fit_varpro"]

#: Working memory of one chunk of voxels, per device type (bytes): on a CPU about 70k voxels
#: (a 256x256 slice in one chunk, the per-operation overhead paid once); a GPU is
#: launch-bound, so it takes as much as fits.
CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 8 * 2**30}
#: Default number of grid values over the bounds of tau (log-spaced), for refined fits.
GRID_POINTS = 80
#: Largest step of ln(tau) in one iteration: about two grid spacings.
MAX_LOG_STEP = 0.25


def chunk_voxels(device: torch.device, bytes_per_voxel: int) -> int:
    """Voxels per chunk on ``device``, each using ``bytes_per_voxel``.

    The budget is :data:`CHUNK_BYTES` for the device's type, or on a GPU a quarter of its free
    memory if that is less.
    """
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 4)
    return max(1024, int(budget // max(1, bytes_per_voxel)))


# --- sign patterns of magnitude data ---------------------------------------------------------


def _with_pattern(y: torch.Tensor, rank: torch.Tensor, j: torch.Tensor, n: int) -> torch.Tensor:
    """The data ``y (n, V)`` with the signs of the patterns ``j (V,)``: rank < j negated.

    A point's rank is its place in time order.

    ``j`` counts modulo ``n``: j = 0 flips nothing, j = n - 1 flips all but the last point,
    which (up to the overall sign, which the coefficients absorb) is the pattern of a curve
    that crosses zero before its last point from above. So ``j ± 1`` are always the patterns
    with the null moved by one point.
    """
    flip = rank[:, None] < torch.remainder(j, n)[None, :]
    return torch.where(flip, -y, y)


# --- the cost of one pattern as a function of tau, with its derivatives ----------------------


def _inverse_times(gram: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G⁻¹ b`` for a batch of Gram matrices ``(p, p, A)`` and vectors ``(p, A)``.

    Written out for p = 1 and 2 (a few element-wise operations on ``(A,)`` vectors), a batched
    solve otherwise.
    """
    p = gram.shape[0]
    if p == 1:
        return b / gram[0]
    if p == 2:
        g00, g01, g11 = gram[0, 0], gram[0, 1], gram[1, 1]
        det = g00 * g11 - g01 * g01
        return torch.stack([g11 * b[0] - g01 * b[1], g00 * b[1] - g01 * b[0]]) / det
    return torch.linalg.solve(gram.permute(2, 0, 1), b.T[..., None])[..., 0].T


def _symmetric_dots(x: torch.Tensor) -> torch.Tensor:
    """The dot products over the first axis of the columns of ``x (n, p, A)``: ``(p, p, A)``.

    Each pair once (i <= j), the other triangle by symmetry.
    """
    p = x.shape[1]
    dots = {(i, j): (x[:, i] * x[:, j]).sum(0) for i in range(p) for j in range(i, p)}
    return torch.stack(
        [torch.stack([dots[min(i, j), max(i, j)] for j in range(p)]) for i in range(p)]
    )


def _profile(
    model: SeparableModel, ys: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Variable-projection cost, its slope and Gauss-Newton curvature in ``u = ln tau``.

    ``ys`` (n, A) are the (sign-restored) data, ``u`` (A,). With :math:`\Phi` the basis,
    :math:`G = \Phi^T\Phi`, :math:`c = G^{-1}\Phi^T y`, :math:`r = y - \Phi c` and
    :math:`w = \partial_\tau\Phi\, c`:

    - :math:`f = r^T r`, :math:`\partial_\tau f = -2 r^T w` (exact, as :math:`r \perp \Phi`);
    - the curvature (Golub-Pereyra's Jacobian of variable projection):
      :math:`2(\|w\|^2 - (\Phi^T w)^T G^{-1} \Phi^T w + z^T G^{-1} z)`,
      :math:`z = \partial_\tau\Phi^T r`.

    All of them follow from the dot products of the columns of :math:`[\Phi, \partial_\tau\Phi,
    y]`, computed in one pass over the n time points; the rest works on ``(A,)`` vectors.
    Returns f, df/du, d²f/du² (>= 0) and c ``(p, A)``.
    """
    tau = u.exp()
    phi, dphi = model.basis_fn(tau)  # (n, p, A)
    p = phi.shape[1]
    # the dot products over the n time points, one product and one sum each: no copies;
    # the Gram matrices are symmetric, so only their upper triangles are computed
    gram = _symmetric_dots(phi)  # (p, p, A)
    cross = torch.stack(
        [torch.stack([(phi[:, i] * dphi[:, j]).sum(0) for j in range(p)]) for i in range(p)]
    )
    dd = _symmetric_dots(dphi)
    b = torch.stack([(phi[:, i] * ys).sum(0) for i in range(p)])  # (p, A)
    dy = torch.stack([(dphi[:, i] * ys).sum(0) for i in range(p)])
    yy = (ys * ys).sum(0)
    c = _inverse_times(gram, b)
    cost = (yy - (c * b).sum(0)).clamp_min(0)
    q = (cross * c[None]).sum(1)  # Phi^T w, (p, A)
    cq = (c * q).sum(0)
    rw = (c * dy).sum(0) - cq  # r^T w
    z = dy - (cross * c[:, None]).sum(0)  # dPhi^T r, (p, A)
    ww = (c[:, None] * dd * c[None]).sum((0, 1))
    curvature = ww - (q * _inverse_times(gram, q)).sum(0) + (z * _inverse_times(gram, z)).sum(0)
    slope = -2 * rw * tau
    curvature = 2 * curvature.clamp_min(0) * tau * tau
    return cost, slope, curvature, c


# --- stage 1: the grid -----------------------------------------------------------------------


def _grid_basis(model: SeparableModel, grid: torch.Tensor, absolute: bool) -> torch.Tensor:
    """Orthonormal bases of the grid values, as one matrix ``(n, p * K)`` for a matmul.

    Column ``i * K + k`` is the i-th orthonormal basis vector of grid value k.
    """
    basis = model.dictionary(grid)  # (n, p, K)
    if absolute:
        basis = basis.abs()
    q = torch.linalg.qr(basis.permute(2, 0, 1)).Q  # (K, n, p)
    return q.permute(1, 2, 0).reshape(basis.shape[0], -1)


def _grid_search(
    qmat: torch.Tensor, p: int, signed: list[torch.Tensor], buffer: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Per pattern: best grid index, its score and the scores at k-1, k, k+1.

    ``signed`` holds the data of each sign pattern, ``(n, V)`` each. The score is
    :math:`\|P_k s y\|^2`, the largest score the least cost. ``buffer`` holds the
    ``(V, p * K)`` projections and is reused from pattern to pattern and chunk to chunk; the
    voxels run along its rows, so the search over the grid reduces contiguous memory (about
    twice as fast on a CPU as along the columns). Returns tensors of shape ``(S, V)``,
    ``(S, V)`` and ``(S, 3, V)``.
    """
    n_grid = qmat.shape[1] // p
    best_k, best, around = [], [], []
    # MKL splits the rows of a product with few rows (5 to 30 voxels) between its threads,
    # and the projections' rounding then depends on their number; so few voxels gain nothing
    # from threads, so they take one, and the fit does not depend on the thread count
    threads = torch.get_num_threads()
    serial = qmat.device.type == "cpu" and signed[0].shape[1] < 1024 and threads > 1
    for ys in signed:
        out = buffer[: qmat.shape[1] * ys.shape[1]].view(ys.shape[1], qmat.shape[1])
        if serial:
            torch.set_num_threads(1)
        try:
            projection = torch.matmul(ys.T.to(qmat.dtype), qmat, out=out)
        finally:
            if serial:
                torch.set_num_threads(threads)
        scores = projection.square_()
        if p > 1:
            scores = scores.view(-1, p, n_grid).sum(1)
        score, k = scores.max(1)
        inner = k.clamp(1, n_grid - 2)
        best_k.append(k)
        best.append(score)
        around.append(scores.gather(1, torch.stack([inner - 1, inner, inner + 1], 1)).T)
    dtype = signed[0].dtype
    return torch.stack(best_k), torch.stack(best).to(dtype), torch.stack(around).to(dtype)


def _parabola(around: torch.Tensor, k: torch.Tensor, log_grid: torch.Tensor) -> torch.Tensor:
    """The ln tau at the vertex of the parabola through the scores at k-1, k, k+1."""
    n_grid = log_grid.numel()
    inner = k.clamp(1, n_grid - 2)
    curvature = around[0] - 2 * around[1] + around[2]
    offset = torch.where(
        (curvature < 0) & (inner == k), 0.5 * (around[0] - around[2]) / curvature, 0.0
    ).clamp(-0.5, 0.5)
    spacing = (log_grid[inner + 1] - log_grid[inner - 1]) / 2
    return log_grid[k] + offset * spacing


# --- stage 2: one-dimensional Levenberg-Marquardt on ln tau ---------------------------------


def _refine(
    model: SeparableModel,
    ys: torch.Tensor,
    u: torch.Tensor,
    bounds: tuple[float, float],
    max_iter: int,
    tol: float,
    history: list[float] | None,
    n_main: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise the pattern costs of ``ys (n, A)`` over ``u = ln tau`` from ``u (A,)``.

    Each column keeps its own damping factor and leaves the working set once its step is below
    ``tol`` (in ln tau, i.e. relative in tau) or its Newton decrement says the cost cannot fall
    by more than 1e-10 of itself, and at once when it sits on a bound and the cost still falls
    beyond it. ``history`` gets the summed cost of the first ``n_main`` columns after each
    iteration. Returns u, cost, coefficients ``(p, A)`` and iterations ``(A,)``.
    """
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    u = u.clamp(lo, hi)
    fa, ga, ha, ca = _profile(model, ys, u)
    cost, c = fa.clone(), ca.clone()
    iterations = torch.zeros_like(u, dtype=torch.long)
    index = torch.arange(u.numel(), device=u.device)
    main = index < n_main
    finished = torch.zeros((), dtype=fa.dtype, device=fa.device)  # cost of the columns done

    def pinned(u, g):  # on a bound, and the cost still falls beyond it
        return ((u <= lo) & (g > 0)) | ((u >= hi) & (g < 0))

    # the working set holds only the columns still iterating; the others are written back once
    going = ~(pinned(u, ga) | (ga.abs() <= tol * ha))  # on a bound, or already converged
    ua, ya, lam = u.clone(), ys, torch.full_like(u, 1e-3)
    radius = torch.full_like(u, MAX_LOG_STEP)  # doubles while full steps keep being accepted
    if not bool(going.all()):
        finished = finished + (fa * main)[~going].sum()
        index, ua, ya, fa, ga, ha, ca, lam, radius, main = (
            x[..., going] for x in (index, ua, ya, fa, ga, ha, ca, lam, radius, main)
        )
    if history is not None:
        history.append(float(finished + (fa * main).sum()))
    for _ in range(max_iter):
        if index.numel() == 0:
            break
        step = -ga / (ha * (1 + lam)).clamp_min(1e-300)
        step = torch.maximum(torch.minimum(step, radius), -radius)
        trial = (ua + step).clamp(lo, hi)
        f_t, g_t, h_t, c_t = _profile(model, ya, trial)
        accept = f_t <= fa  # False for NaN
        moved = (trial - ua).abs()
        # Gauss-Newton ignores the residual's own curvature, which on noisy voxels makes its
        # steps overshoot and oscillate; the secant of the slope over the step measures the
        # true curvature, and is used where it is positive (superlinear, like the secant method)
        secant = (g_t - ga) / (trial - ua)
        ha = torch.where(
            torch.isfinite(secant) & (secant > 0), secant, torch.where(accept, h_t, ha)
        )
        ua = torch.where(accept, trial, ua)
        fa = torch.where(accept, f_t, fa)
        ga = torch.where(accept, g_t, ga)
        ca = torch.where(accept, c_t, ca)
        lam = torch.where(accept, lam * 0.3, lam * 10)
        full = accept & (moved >= radius * 0.999)
        radius = torch.where(full, radius * 2, torch.where(accept, radius, radius * 0.5))
        iterations[index] += 1
        flat = ga * ga <= 1e-10 * fa * ha
        # converged: the step taken, or the Newton step still to take, is below tol
        converged = (moved <= tol) | (ga.abs() <= tol * ha) | flat
        done = (accept & converged) | pinned(ua, ga) | (lam > 1e6)
        if history is not None:
            history.append(float(finished + (fa * main).sum()))
        # drop the finished columns once they are worth a copy of the working set (an eighth)
        if int(done.sum()) * 8 >= index.numel():
            finished_index = index[done]
            u[finished_index], cost[finished_index] = ua[done], fa[done]
            c[:, finished_index] = ca[:, done]
            finished = finished + (fa * main)[done].sum()
            going = ~done
            index, ua, ya, fa, ga, ha, ca, lam, radius, main = (
                x[..., going] for x in (index, ua, ya, fa, ga, ha, ca, lam, radius, main)
            )
    u[index], cost[index], c[:, index] = ua, fa, ca
    return u, cost, c, iterations


# --- one chunk: grid, kink check, refinement -------------------------------------------------


def _fit_chunk(
    model: SeparableModel,
    y: torch.Tensor,
    rank: torch.Tensor,
    qmat: torch.Tensor,
    log_grid: torch.Tensor,
    buffer: torch.Tensor,
    grid_pattern: torch.Tensor,
    max_iter: int,
    tol: float,
    history: list[float] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(p, V)`` and tau ``(V,)`` of the voxels ``y (n, V)`` (float64).

    ``grid_pattern (K,)`` holds the sign pattern of the seed model's curve at each grid value.
    """
    n, n_voxels = y.shape
    p = len(model.linear)
    if model.magnitude and model.polarity:
        # the null lies next to the smallest magnitude, at index m: the patterns with the first
        # m or m+1 points negative, and (the kink check) the null one point further either way
        m = rank[y.min(0).indices]  # (min is much faster than argmin along dim 0 on a CPU)
        patterns = [m - 1, m, m + 1, m + 2]
        signed = [_with_pattern(y, rank, j, n) for j in patterns]
    else:  # signed data, or the seed model whose |basis| carries its own signs
        patterns, signed = None, [y]
    ks, scores, around = _grid_search(qmat, p, signed, buffer)
    starts = torch.stack([_parabola(around[s], ks[s], log_grid) for s in range(len(signed))])
    if patterns is not None:  # every pattern from its own best grid value, the best first
        order = torch.argsort(scores, dim=0, descending=True)  # (S, V)
        js = torch.stack(patterns).gather(0, order)
        us = starts.gather(0, order)
        candidates = [(js[s], us[s]) for s in range(len(patterns))]
    elif not model.magnitude:
        candidates = [(torch.zeros_like(ks[0]), starts[0])]
    else:  # seed model: its pattern at the best grid value, and the neighbours' where a null
        # lies within four grid steps (elsewhere f is smooth there and has no second minimum)
        best_k, u0 = ks[0], starts[0]
        last = grid_pattern.numel() - 1
        j = grid_pattern[best_k]
        low = grid_pattern[(best_k - 4).clamp(0, last)]
        high = grid_pattern[(best_k + 4).clamp(0, last)]
        candidates = [(j, u0), (j - 1, u0), (j + 1, u0)]
    if max_iter == 0:  # the grid alone: the pattern of the best grid value
        candidates = candidates[:1]
    n_c = len(candidates)
    js = torch.cat([j for j, _ in candidates])
    us = torch.cat([u for _, u in candidates])
    if model.magnitude and patterns is None and n_c > 1:
        keep = torch.cat([torch.ones_like(ks[0], dtype=torch.bool), low < j, high > j])
        cols = torch.nonzero(keep)[:, 0]
    else:
        cols = torch.arange(n_c * n_voxels, device=y.device)
    ys = y[:, cols % n_voxels]  # one column per (voxel, pattern) refined
    if model.magnitude:
        ys = _with_pattern(ys, rank, js[cols], n)
    with thread_policy(y.device, cols.numel() * n, small=2**18):
        u, cost, c, _ = _refine(model, ys, us[cols], model.bounds, max_iter, tol, history, n_voxels)
    all_cost = torch.full((n_c * n_voxels,), torch.inf, dtype=y.dtype, device=y.device)
    all_u = torch.zeros_like(all_cost)
    all_c = torch.zeros((p, n_c * n_voxels), dtype=y.dtype, device=y.device)
    all_cost[cols], all_u[cols], all_c[:, cols] = cost, u, c
    pick = all_cost.reshape(n_c, n_voxels).min(0).indices
    col = pick * n_voxels + torch.arange(n_voxels, device=y.device)
    tau, coefficients = all_u[col].exp(), all_c[:, col]
    if history is not None and n_c > 1:
        history.append(float(all_cost[col].sum()))  # after the kink check
    if model.magnitude:
        # the overall sign is free: the seed's M0 is positive, other curves end positive
        if patterns is None:
            coefficients = coefficients.abs()
        else:
            last = model.basis(tau)[int(rank.argmax())]  # (p, V) at the latest time
            flip = (last * coefficients).sum(0) < 0
            coefficients = torch.where(flip, -coefficients, coefficients)
    return coefficients, tau


# --- the public fits -------------------------------------------------------------------------


def _flatten(
    data: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    shape = data.shape[1:]
    voxels = data.reshape(data.shape[0], -1)
    if mask is None:
        mask_flat = torch.ones(shape.numel(), dtype=torch.bool, device=data.device)
        return voxels, mask_flat, shape  # a view: no copy of the data
    mask_flat = check_mask(mask, shape).to(data.device)
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
    """Fit a separable model by variable projection: a grid over tau, then 1-D refinement.

    For every value of a log-spaced grid of tau the linear coefficients (M0, or a and b) have
    a closed-form least-squares solution, so the best grid value of each voxel is found with
    one projection per grid value; for magnitude IR data the sign pattern is searched too.
    With ``lm_iterations > 0`` one-dimensional Levenberg-Marquardt steps on ln tau take every
    voxel to the global least-squares optimum within ``model.bounds``, with the kink check
    next to the null of magnitude data (see the module's description). The fit runs on the
    device of ``data``, in chunks sized for it.

    Parameters
    ----------
    model
        A :class:`~qmri_helpers.models.SeparableModel`, e.g. ``ir_tr_model(ti, tr)``.
    data
        Signal of shape ``(n_times, ...)``: magnitudes for a magnitude model, else signed.
    grid
        Grid of tau in s, ascending; default 120 log-spaced values over ``model.bounds`` for
        the grid alone, :data:`GRID_POINTS` when refined.
    mask
        Voxels to fit, shape ``(...)``; None fits all.
    lm_iterations
        Maximum number of refinement iterations (0: the grid and a parabola only).
    tol
        A voxel has converged when a step changes tau by less than this, relative.
    noise_sigma
        Noise standard deviation for the Cramér-Rao ``sd``; None estimates it.
    dtype
        Precision of the refinement (float64 by default; maps come back in data's dtype).
    progress
        Show a tqdm progress bar over chunks.

    Returns
    -------
    FitResult
        Maps of the physical parameters (``model.derive``) and tau, with goodness of fit,
        on the CPU; ``device`` says where the fit ran. Voxels with NaN or inf data, without
        signal (all zero) or with tau on a bound fail and are counted (``failures``); the
        bounds are ``model.bounds`` with Levenberg-Marquardt, the ends of the grid without.

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
    device = data.device
    lo, hi = model.bounds
    if grid is None:
        points = 120 if lm_iterations == 0 else GRID_POINTS
        # exactly the bounds at both ends, so a voxel pinned there is recognised at once
        grid = torch.linspace(math.log(lo), math.log(hi), points, dtype=dtype, device=device).exp()
    grid = check_times(grid, f"grid of {model.nonlinear}").to(device=device, dtype=dtype)
    if grid.numel() < 3 or not bool((grid > 0).all()):
        raise ValueError(f"the grid needs at least 3 values, all > 0 s; got {grid.tolist()[:5]}")
    n, n_voxels = voxels.shape
    p = len(model.linear)
    rank = torch.argsort(torch.argsort(model.times.to(device)))  # time order of each point
    polarity = model.magnitude and model.polarity
    qmat = _grid_basis(model, grid, absolute=model.magnitude and not polarity)
    # the grid's projections in the data's precision (they only pick a start), float32 at least
    grid_dtype = torch.promote_types(data.dtype, torch.float32)
    qmat = qmat.to(grid_dtype)
    log_grid = grid.log().clamp(math.log(lo), math.log(hi))
    grid_pattern = (model.basis(grid)[:, 0] < 0).sum(0)  # (K,), used for the seed model
    candidates = 3 if model.magnitude and lm_iterations else 1
    per_voxel = grid.numel() * p * 4 + candidates * n * 8 * 12 + n * 8 * 4
    chunk = min(n_voxels, chunk_voxels(device, per_voxel)) or 1
    buffer = torch.empty(qmat.shape[1] * chunk, dtype=grid_dtype, device=device)
    finite, has_signal = voxel_status(voxels)
    coefficients = torch.empty((p, n_voxels), dtype=dtype, device=device)
    tau = torch.empty(n_voxels, dtype=dtype, device=device)
    keep = data.dtype
    rss = torch.empty(n_voxels, dtype=keep, device=device)
    r_squared = torch.empty(n_voxels, dtype=keep, device=device)
    inverse_diag = torch.empty((n_voxels, p + 1), dtype=keep, device=device)
    history_chunks: list[list[float]] = []
    bar = trange(0, n_voxels, chunk, desc="VarPro", disable=not progress, leave=False)
    # the grid's matrix products use the idle cores; the small operations of the refinement
    # (its working set shrinks fast) run on one thread, see thread_policy
    with thread_policy(device, chunk * n * p):
        for start in bar:
            sl = slice(start, start + chunk)
            y = torch.where(finite[sl], voxels[:, sl].to(dtype), 0.0)
            history: list[float] = []
            c, t = _fit_chunk(
                model, y, rank, qmat, log_grid, buffer, grid_pattern, lm_iterations, tol, history
            )
            history_chunks.append(history)
            signal, jac = model.evaluate(c, t)
            residual = (y - signal).T
            rss[sl], r_squared[sl], inverse_diag[sl] = _goodness(
                residual, jac.permute(2, 0, 1), y.T
            )
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
        device, data.dtype,
        {"not finite": ~finite, "no signal": ~has_signal, "at a bound": pinned},
    )  # fmt: skip


def fit_lm(
    model: SeparableModel,
    data: torch.Tensor,
    max_iter: int = 50,
    **kwargs,
) -> FitResult:
    """The fast and exact fit: variable projection with 1-D Levenberg-Marquardt refinement.

    A shorthand for ``fit_varpro(model, data, lm_iterations=max_iter, ...)``; see
    :func:`fit_varpro` for the parameters. Every voxel ends at the global least-squares optimum
    of its model within ``model.bounds``, magnitude IR data included.
    """
    return fit_varpro(model, data, lm_iterations=max_iter, **kwargs)

r"""Fast and exact voxel-wise fits of separable models: variable projection on one time constant.

A :class:`~qmri_helpers.models.SeparableModel` has linear coefficients :math:`c` (M0, or a and
b) and one nonlinear time constant :math:`\tau` (T1 or T2*, in s). For a given :math:`\tau`
the coefficients have a closed-form least-squares solution, so each voxel's cost is a function
of :math:`\tau` alone (variable projection):

.. math:: f(\tau) = \min_c \|y - \Phi(\tau) c\|^2
          = \|y\|^2 - \|P_{\Phi(\tau)}\, y\|^2 .

:func:`fit_lm` finds the global minimum of :math:`f` within the model's bounds for every voxel:

1. a log-spaced grid over the whole bound range brackets each voxel's best :math:`\tau`;
2. one-dimensional Levenberg-Marquardt steps on :math:`\ln\tau` refine it, with a damping
   factor and a trust radius per voxel; a voxel leaves as soon as it has converged, or at once
   when it sits on a bound and the cost still falls beyond. A voxel whose Newton step leaves a
   quarter of its slope (the cost keeps falling, as it flattens out towards a bound on
   background voxels) tries that bound next, once. For models whose curves are
   :math:`\alpha_j + \beta_j e^{-t/\tau}` (``model.decay``: the seed and 3-parameter IR
   models, T2*) the projections come from sums of the exponential, with the exact second
   derivative of :math:`f`: Newton's method, from the top of a quartic through five grid
   scores, and a converged voxel takes its last (sub-tolerance) step without another
   evaluation. Other models use the Golub-Pereyra Gauss-Newton curvature, or the secant of
   the slope over the last step where that is positive;
3. magnitude data (:math:`y \ge 0`; negative data are refused): :math:`\| |\Phi c| - y \|`
   equals the smallest signed cost :math:`\|\Phi c - s \odot y\|` over the sign patterns
   :math:`s` a monotone IR curve can have (the first :math:`j` points negative, or the last).
   Each pattern gives a smooth :math:`f_s(\tau) \ge f(\tau)`, equal where the pattern is the
   model's own, so the global optimum is the best of the patterns' minima. The kink check
   refines several patterns and keeps the best: for the 3-parameter and TR-aware models the
   grid scores every pattern; the best one is refined, and with it the null next to the
   smallest magnitude (two patterns) and one point further either way, and every other pattern
   whose best grid score comes close to the best (on noise the best pattern can be any), each
   from its own best grid value, and the best pattern's best other basin where it scores nearly
   as well (:data:`FAR_BASINS`). The seed model's pattern follows from tau: tau's segment
   between two nulls (:math:`\tau = TI_i/\ln 2`) fixes it. Its check refines the pattern of the
   best grid value, then a neighbouring pattern where a null lies within three grid steps and a
   grid value past it scores nearly as well, within that pattern's own segment; the best other
   basin of its grid scores, far from the best grid value, where it scores nearly as well
   (:data:`FAR_BASINS`: curves the model fits poorly can have their global optimum there); and
   a minimum found outside its pattern's segment is refined again in the pattern there. This is
   what fixes the local minima next to the null, where :math:`f` has a kink, and those far from
   the best grid value. (The patterns assume a monotone curve: exact for a constant TR; with a
   TR that changes with TI, as on Siemens scanners, a curve could in principle change sign
   twice.)

The work is organised for the hardware: on a CPU the refinement runs over blocks of columns
that fit the cache, on a GPU over all of a chunk at once, and the voxels that have converged
leave the working set. On a GPU, where an iteration costs kernel launches however few its
columns, the seed model's neighbouring patterns are refined in the same run as the voxels' own
(:data:`ONE_REFINEMENT`), and a refinement's last few columns finish on the CPU
(:data:`HOST_TAIL`); the grid's small constants are computed on the CPU and moved once.

A voxel whose fitted curve does not change with tau (a T1 far below the shortest TI, where
:math:`e^{-TI/T_1}` is below rounding: its cost equals the bound's) fails as "not
determined" rather than report a tau the data cannot see.

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
    _gram,
    _last_information,
    _result,
    _ridged_inverse_diagonal,
    _threads,
    thread_policy,
)
from .models import _LOG2_E, SeparableModel
from .validation import (
    at_bound,
    check_data,
    check_mask,
    check_times,
    device_copy,
    sort_model_times,
    voxel_status,
)

__all__ = ["CHUNK_BYTES", "chunk_voxels", "fit_lm", "fit_varpro"]

#: Working memory of one chunk of voxels, per device type (bytes): on a CPU about 70k voxels
#: (a 256x256 slice in one chunk, the per-operation overhead paid once); a GPU is
#: launch-bound, so it takes as much as fits.
CHUNK_BYTES = {"cpu": 256 * 2**20, "cuda": 64 * 2**30}
#: Default number of grid values over the bounds of tau (log-spaced), for refined fits.
GRID_POINTS = 80
#: Largest step of ln(tau) in one iteration: about two grid spacings.
MAX_LOG_STEP = 0.25
#: The seed model's kink check: neighbouring sign patterns are refined too where a null lies
#: within this many grid steps of the best grid value and a grid value past it scores within
#: KINK_MARGIN times the best value's drop to its neighbours; rounds of the consistency check.
KINK_STEPS, KINK_ROUNDS, KINK_MARGIN = 3, 3, 4.0
#: A fitted tau counts as determined where a change of ln tau by one changes the fitted curve
#: (its coefficients fitted again) by at least this fraction of its norm, see _determined.
MIN_SENSITIVITY = 1e-6
#: Elements of one ``(n, columns)`` work array of the refinement on a CPU (2 MB in float64).
CACHE_ELEMENTS = 2**18
#: Bytes of the grid's projections of one block of voxels, per device type: on a CPU a block
#: whose projections stay in the core's cache while the search reads them; on a GPU all of a
#: chunk (blocks of 32 or 128 MB, which its L2 cache holds, measured no faster on an H200).
GRID_BLOCK_BYTES = {"cpu": 4 * 2**20, "cuda": 2**62}
#: Per device type: the refinement's last columns (at most this many) finish on the CPU. On a
#: GPU an iteration costs about a millisecond of kernel launches however few its columns, on a
#: CPU a few microseconds per operation; a refinement's last iterations are on few columns.
HOST_TAIL = {"cuda": 4096}
#: Per device type: whether the seed model's neighbouring patterns (the kink check) are refined
#: together with the voxels' own patterns, in one run. On a GPU one run costs less than two:
#: the last iterations, on few columns, cost kernel launches rather than arithmetic. On a CPU
#: two runs are faster (about 13%, measured).
ONE_REFINEMENT = {"cpu": False, "cuda": True}
#: The kink check also refines the best other basin of each voxel's grid scores (for the
#: 3-parameter and TR-aware models: of its best pattern's) where it scores close to the best.
#: Curves that the model fits poorly have such basins, and a far one can hold the global
#: optimum. Without this check, on the synthetic phantom at 256x256, 14 of the 59k valid
#: background voxels of the seed model ended up to 1.3% above the global optimum's cost; on
#: hazen's site-1 plate-5 scan (its TR changes with TI, which the seed model ignores) 242
#: voxels with strong signal reported T1 = 1.48 s where the seed model's global optimum lies
#: at 0.74 s, and 4 voxels of the TR-aware model T1 = 5-10 s instead of 0.15 s. It costs
#: about 20% more time at 256x256 for the seed model and 13% for the 3-parameter model (the
#: search for the basin's peak over the grid).
FAR_BASINS = True


def chunk_voxels(device: torch.device, bytes_per_voxel: int) -> int:
    """Voxels per chunk on ``device``, each using ``bytes_per_voxel``.

    The budget is :data:`CHUNK_BYTES` for the device's type, or on a GPU half of its free
    memory if that is less.
    """
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cpu"])
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = min(budget, free // 2)
    return max(1024, int(budget // max(1, bytes_per_voxel)))


# --- sign patterns of magnitude data ---------------------------------------------------------


def _signs(rank: torch.Tensor, j: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The signs ``(n, J)`` of the patterns ``j (J,)``: -1 where rank < j (mod n), else +1.

    A point's rank is its place in time order.

    ``j`` counts modulo ``n``: j = 0 flips nothing, j = n - 1 flips all but the last point,
    which (up to the overall sign, which the coefficients absorb) is the pattern of a curve
    that crosses zero before its last point from above. So ``j ± 1`` are always the patterns
    with the null moved by one point.
    """
    keep = rank[:, None] >= torch.remainder(j, rank.numel())[None, :]
    return keep.to(dtype).mul_(2).sub_(1)


def _with_pattern(y: torch.Tensor, rank: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """The data ``y (n, V)`` with the signs of the patterns ``j (V,)`` (:func:`_signs`).

    A product with +-1: twice as fast on a CPU as torch.where on a mask, and the same numbers.
    """
    return _signs(rank, j, y.dtype).mul_(y)


def _drop(around: torch.Tensor) -> torch.Tensor:
    """How far the score at k lies above the mean of k-1 and k+1 (>= 0), ``around (..., 3, V)``.

    A minimum between two grid values can hide about this much (a parabola's top lies at
    most a quarter of it above the middle value); the kink checks allow KINK_MARGIN times it.
    """
    left, middle, right = around.unbind(-2)
    return (middle - 0.5 * (left + right)).clamp_min(0)


def _close_basins(
    far_k: torch.Tensor, far_around: torch.Tensor, best: torch.Tensor
) -> torch.Tensor:
    """The voxels whose other basin (:func:`_grid_search`'s ``other``) is worth refining.

    Those with such a basin (``far_k (V,)`` > 0) whose peak score, the middle of
    ``far_around (3, V)``, comes within KINK_MARGIN times its own drop of ``best (V,)``.
    """
    close = (far_k > 0) & (far_around[1] + KINK_MARGIN * _drop(far_around) >= best)
    return torch.nonzero(close)[:, 0]


# --- the cost of one pattern as a function of tau, with its derivatives ----------------------


def _inverse_times(gram: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``G⁻¹ b`` for a batch of Gram matrices ``(p, p, A)`` and vectors ``(p, A)``.

    Written out for p = 1 and 2 (a few element-wise operations on ``(A,)`` vectors), a batched
    solve otherwise.
    """
    p = gram.shape[0]
    if p <= 2:
        return torch.stack(_solve([list(row) for row in gram], list(b)))
    return torch.linalg.solve(gram.permute(2, 0, 1), b.T[..., None])[..., 0].T


def _block(columns: torch.Tensor) -> int:
    """Columns of ``(n, A)`` per block of work: :data:`CACHE_ELEMENTS` on a CPU, all on a GPU."""
    if columns.device.type != "cpu":
        return max(1, columns.shape[1])
    return max(1, CACHE_ELEMENTS // max(1, columns.shape[0]))


def _profile(
    model: SeparableModel, ys: torch.Tensor, u: torch.Tensor, yy: torch.Tensor, ysum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_profile_block` in blocks of columns small enough to stay in a CPU's cache.

    Element-wise operations on ``(n, A)`` arrays larger than the cache run at memory speed,
    about 2.5 times slower per element than on arrays that fit (measured on 2 cores); a GPU
    takes all columns at once. ``yy`` holds the squared norms of the columns, which do not
    change with tau.
    """
    block = _block(ys)
    if ys.shape[1] <= block:
        return _profile_block(model, ys, u, yy, ysum)
    parts = [
        _profile_block(
            model,
            ys[:, i : i + block],
            u[i : i + block],
            yy[i : i + block],
            ysum[i : i + block],
        )  # fmt: skip
        for i in range(0, ys.shape[1], block)
    ]
    f, g, h, c = zip(*parts, strict=True)
    return torch.cat(f), torch.cat(g), torch.cat(h), torch.cat(c, 1)


def _profile_block(
    model: SeparableModel, ys: torch.Tensor, u: torch.Tensor, yy: torch.Tensor, ysum: torch.Tensor
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
    if model.decay is not None:
        return _profile_decay(model, ys, u, yy, ysum)
    tau = u.exp()
    phi, dphi = model.basis_fn(tau)  # (n, p, A)
    p = phi.shape[1]
    if p == 1:  # the same, written out for one coefficient: fewer operations on (A,) vectors
        f0, d0 = phi[:, 0], dphi[:, 0]
        g, x, dd = (f0 * f0).sum(0), (f0 * d0).sum(0), (d0 * d0).sum(0)
        b, dy = (f0 * ys).sum(0), (d0 * ys).sum(0)
        c = b / g
        q = x * c  # Phi^T w
        z = dy - q  # dPhi^T r; r^T w = c z
        curvature = (c * c * dd + (z * z - q * q) / g).clamp_min(0)
        cost = (yy - c * b).clamp_min(0)
        return cost, -2 * c * z * tau, 2 * curvature * tau * tau, c[None]
    # the dot products over the n time points, one product and one sum each: no copies;
    # the Gram matrices are symmetric, so only their upper triangles are computed
    gram = _gram(phi.unbind(1))  # (p, p, A)
    cross = torch.stack(
        [torch.stack([(phi[:, i] * dphi[:, j]).sum(0) for j in range(p)]) for i in range(p)]
    )
    dd = _gram(dphi.unbind(1))
    b = torch.stack([(phi[:, i] * ys).sum(0) for i in range(p)])  # (p, A)
    dy = torch.stack([(dphi[:, i] * ys).sum(0) for i in range(p)])
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


def _combine(*terms: tuple[float, torch.Tensor]) -> torch.Tensor | float:
    """The sum of ``coefficient * tensor`` over ``terms``, skipping zero coefficients."""
    total: torch.Tensor | float = 0.0
    for coefficient, x in terms:
        if coefficient:
            total = coefficient * x if isinstance(total, float) else total.add(x, alpha=coefficient)
    return total


def _solve(gram: list[list], b: list) -> list:
    """``G⁻¹ b`` for symmetric 1x1 or 2x2 Gram matrices of ``(A,)`` entries, written out."""
    if len(b) == 1:
        return [b[0] / gram[0][0]]
    g00, g01, g11 = gram[0][0], gram[0][1], gram[1][1]
    det = g00 * g11 - g01 * g01
    return [(g11 * b[0] - g01 * b[1]) / det, (g00 * b[1] - g01 * b[0]) / det]


def _dot(x: list, y: list) -> torch.Tensor:
    total = x[0] * y[0]
    for a, b in zip(x[1:], y[1:], strict=True):
        total = total + a * b
    return total


def _decay_sums(
    model: SeparableModel, r: torch.Tensor, ys: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The exponential ``e = exp(-t r)`` at ``r = 1/tau``, ``(n, A)``, and its weighted sums.

    The sums over the points of ``e``, ``e²`` and ``e ys`` (None without ``ys``), each
    weighted by ``1, t, t²``: ``(3, A)`` each. (``models._exp_decay`` takes tau and divides
    per voxel; the solvers hold ``1/tau`` already.)
    """
    t = device_copy(model.times, r.device, r.dtype)
    e = torch.exp2(torch.outer(t * -_LOG2_E, r))
    weights = torch.stack([torch.ones_like(t), t, t * t])  # (3, n)
    return e, weights @ e, weights @ (e * e), None if ys is None else weights @ (e * ys)


def _profile_decay(
    model: SeparableModel, ys: torch.Tensor, u: torch.Tensor, yy: torch.Tensor, ysum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r""":func:`_profile_block` for curves :math:`\phi_j = \alpha_j + \beta_j e` (``model.decay``).

    With :math:`e_i = e^{-t_i/\tau}` and :math:`s_i = t_i/\tau`, every dot product of the
    curves, their derivatives by :math:`u = \ln\tau` (:math:`\partial_u e = e s`,
    :math:`\partial_u s = -s`) and the data is a sum of :math:`e`, :math:`e^2` or :math:`e y`
    weighted by :math:`1, s, s^2`: three ``(3, n) @ (n, A)`` products after three element-wise
    passes, where the general form takes about sixteen per coefficient. With
    :math:`b = \Phi^T y`, :math:`G = \Phi^T\Phi` and :math:`c = G^{-1} b`, the cost
    :math:`f = \|y\|^2 - b^T c` has the slope :math:`c^T G' c - 2 c^T b'` and the exact second
    derivative :math:`c^T (G'' c - 2 b'') - 2 w^T G^{-1} w`, :math:`w = b' - G' c` (Newton's
    method, not Gauss-Newton's: the residual's curvature is in it). The curvature returned is
    the exact one where positive, Gauss-Newton's elsewhere. ``ysum`` holds the sums of the
    columns of ``ys``.
    """
    pairs = model.decay
    p, n = len(pairs), ys.shape[0]
    if p == 1:
        return _profile_decay_one(model, ys, u, yy, ysum)
    r = torch.exp(-u)  # 1 / tau
    _, se, see, sey = _decay_sums(model, r, ys)
    r2 = r * r
    # sums over the points of e s^k, e^2 s^k, e y s^k (k = 0, 1, 2)
    e1, e2 = r * se[1], r2 * se[2]
    f1, f2 = r * see[1], r2 * see[2]
    y1 = r * sey[1]
    y21 = r2 * sey[2] - y1
    e21, f21 = e2 - e1, 4 * f2 - 2 * f1
    b = [_combine((alpha, ysum), (beta, sey[0])) for alpha, beta in pairs]
    db = [beta * y1 for _, beta in pairs]
    d2b = [beta * y21 for _, beta in pairs]
    gram, dgram, d2gram, dd = ([[None] * p for _ in range(p)] for _ in range(4))
    cross = [[None] * p for _ in range(p)]  # phi_j . dphi_k
    for j, (aj, bj) in enumerate(pairs):
        for k, (ak, bk) in enumerate(pairs):
            mixed, both = aj * bk + bj * ak, bj * bk
            cross[j][k] = _combine((aj * bk, e1), (both, f1))
            if k < j:
                gram[j][k], dgram[j][k] = gram[k][j], dgram[k][j]
                d2gram[j][k], dd[j][k] = d2gram[k][j], dd[k][j]
                continue
            gram[j][k] = _combine((mixed, se[0]), (both, see[0])) + aj * ak * n
            dgram[j][k] = _combine((mixed, e1), (2 * both, f1))
            d2gram[j][k] = _combine((mixed, e21), (both, f21))
            dd[j][k] = _combine((both, f2))
    c = _solve(gram, b)
    d_c = [_dot(row, c) for row in dgram]  # G' c
    slope = _dot(c, d_c) - 2 * _dot(c, db)
    w = [x - y for x, y in zip(db, d_c, strict=True)]
    exact = _dot(c, [_dot(row, c) - 2 * x for row, x in zip(d2gram, d2b, strict=True)])
    exact = exact - 2 * _dot(w, _solve(gram, w))
    # Gauss-Newton's curvature: 2 (|dPhi c|^2 - q^T G^-1 q + z^T G^-1 z), q = Phi^T dPhi c,
    # z = dPhi^T r
    q = [_dot(row, c) for row in cross]
    z = [x - _dot([cross[i][j] for i in range(p)], c) for j, x in enumerate(db)]
    ww = _dot(c, [_dot(row, c) for row in dd])
    gauss_newton = 2 * (ww - _dot(q, _solve(gram, q)) + _dot(z, _solve(gram, z))).clamp_min(0)
    curvature = torch.where(exact > 0, exact, gauss_newton)
    cost = (yy - _dot(c, b)).clamp_min(0)
    return cost, slope, curvature, torch.stack(c)


def _profile_decay_one(
    model: SeparableModel, ys: torch.Tensor, u: torch.Tensor, yy: torch.Tensor, ysum: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_profile_decay` for one curve, with fewer operations on ``(A,)`` vectors.

    The seed model's and T2*'s refinement, written out: the same formulas with
    :math:`p = 1` (:math:`G = g`, :math:`w = b' - c g'`).
    """
    ((alpha, beta),) = model.decay
    r = torch.exp(-u)  # 1 / tau
    _, se, see, sey = _decay_sums(model, r, ys)
    # b = phi.y, g = phi.phi and their first and second derivatives by u, written so that
    # few operations on (A,) vectors remain: dg = kappa r m1, d2g = kappa r (r m2 - m1)
    br = beta * r
    b = beta * sey[0] + alpha * ysum if alpha else beta * sey[0]
    db = br * sey[1]
    d2b = br * (r * sey[2] - sey[1])
    if alpha:
        g = torch.add(se[0], see[0], alpha=beta / (2 * alpha)).mul_(2 * alpha * beta)
        g = g.add_(alpha * alpha * ys.shape[0])
        kappa, m1 = 2 * alpha * beta, torch.add(se[1], see[1], alpha=beta / alpha)
        m2 = torch.add(se[2], see[2], alpha=2 * beta / alpha)
    else:
        g, kappa, m1, m2 = beta * beta * see[0], 2 * beta * beta, see[1], 2 * see[2]
    kr = kappa * r
    dg = m1 * kr
    d2g = (r * m2 - m1).mul_(kr)
    c = b / g
    w = db - c * dg  # dPhi^T r, the residual's projection on the derivative
    slope = (w + db).mul_(c).neg_()  # c (c dg - 2 db)
    exact = (c * d2g - 2 * d2b).mul_(c) - 2 * w * w / g
    # Gauss-Newton's curvature: 2 (c^2 dphi.dphi + w db / g)
    gauss_newton = ((c * br).square_().mul_(see[2]) + w * db / g).clamp_min_(0).mul_(2)
    curvature = torch.where(exact > 0, exact, gauss_newton)
    cost = (yy - c * b).clamp_min_(0)
    return cost, slope, curvature, c[None]


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
    bases: list[torch.Tensor],
    p: int,
    y: torch.Tensor,
    buffer: torch.Tensor,
    width: int = 0,
    other: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple | None]:
    r"""Per sign pattern: best grid index, its score, the scores at k-1, k, k+1 and k-w ... k+w.

    ``bases`` holds the grid's orthonormal bases ``(n, p * K)`` (:func:`_grid_basis`) with the
    signs of each pattern applied to their rows (:math:`S Q` projects :math:`S y`); ``y`` the
    data ``(n, V)``. The score is :math:`\|P_k S y\|^2`, the largest score the least cost.
    ``buffer`` holds the projections of one block of voxels, ``(B, p * K)``, reused from block
    to block and pattern to pattern (a block that fits the cache: the search over the grid
    then reads it from there); the voxels run along its rows, so the search reduces contiguous
    memory (about twice as fast on a CPU as along the columns). Returns tensors of shape
    ``(S, V)``, ``(S, V)``, ``(S, 3, V)`` and ``(S, 2 w + 1, V)`` (indices clamped to the
    grid; the window in the grid's precision), and with ``other`` the best other basin: the
    highest inner local maximum of the scores more than ``w`` grid values from the best, its
    index ``(S, V)`` (0: none) and the scores at k-1, k, k+1 there ``(S, 3, V)``; else None.
    """
    qmat = bases[0]
    n_grid, columns = qmat.shape[1] // p, qmat.shape[1]
    n_voxels, device, dtype = y.shape[1], qmat.device, y.dtype
    block = max(1, buffer.numel() // columns)
    offsets = torch.arange(-width, width + 1, device=device)
    # one coefficient, a basis and data without negative numbers: the projections are >= 0,
    # so the largest projection has the largest score, and only the few gathered are squared
    positive = (
        p == 1 and len(bases) == 1 and bool((qmat >= 0).all()) and bool((y >= 0).all())
    )  # fmt: skip
    # a first basis vector that is the same for every grid value (a constant term, as in the
    # 3-parameter model a + b e): its projection is computed once, and the search runs over
    # the second vector's alone (half the products, and no sum over the two)
    split = p == 2 and bool((qmat[:, :n_grid] == qmat[:, :1]).all())
    if split:
        heads = [basis[:, 0] for basis in bases]
        bases = [basis[:, n_grid:].contiguous() for basis in bases]
    shape = (len(bases), n_voxels)
    best_k = torch.empty(shape, dtype=torch.long, device=device)
    best = torch.empty(shape, dtype=qmat.dtype, device=device)
    around = torch.empty((shape[0], 3, n_voxels), dtype=qmat.dtype, device=device)
    window = torch.empty((shape[0], 2 * width + 1 if width else 0, n_voxels), dtype=qmat.dtype,
                         device=device)  # fmt: skip
    if other:
        steps = torch.arange(-1, 2, device=device)
        other_k = torch.empty(shape, dtype=torch.long, device=device)
        other_around = torch.empty((shape[0], 3, n_voxels), dtype=qmat.dtype, device=device)
    for start in range(0, n_voxels, block):
        sl = slice(start, min(n_voxels, start + block))
        rows = sl.stop - sl.start
        out = buffer[: bases[0].shape[1] * rows].view(rows, bases[0].shape[1])
        y_block = y[:, sl].T.to(qmat.dtype)
        # MKL splits the rows of a product with few rows (5 to 30 voxels) between its
        # threads, and the projections' rounding then depends on their number; so few
        # voxels gain nothing from threads, so they take one, and the fit does not depend
        # on the thread count
        serial = device.type == "cpu" and rows < 1024
        for s, basis in enumerate(bases):
            with _threads(1 if serial else torch.get_num_threads()):
                scores = torch.matmul(y_block, basis, out=out)
            if not positive:
                scores = scores.square_()
                if p > 1 and not split:  # the basis vectors' squared projections, added
                    parts = [scores[:, i * n_grid : (i + 1) * n_grid] for i in range(p)]
                    scores = sum(parts[1:], parts[0])  # (column i K + k: vector i of value k)
            score, k = scores.max(1)
            inner = k.clamp(1, n_grid - 2)
            near = torch.stack([inner - 1, inner, inner + 1], 1)
            if width:
                near = torch.cat([near, (k[:, None] + offsets).clamp(0, n_grid - 1)], 1)
            values = scores.gather(1, near).T
            if positive:
                score, values = score.square(), values.square()
            if split:  # the constant term's share, the same at every grid value
                head = torch.matmul(y_block, heads[s]).square_()
                score, values = score + head, values + head
            best_k[s, sl], best[s, sl] = k, score
            around[s, :, sl] = values[:3]
            window[s, :, sl] = values[3:]
            if other:  # inner local maxima (ties to the right broken), the best's basin cleared
                inner_scores = scores[:, 1:-1]
                peaks = torch.where(
                    (inner_scores >= scores[:, :-2]) & (inner_scores > scores[:, 2:]),
                    inner_scores, 0,
                )  # fmt: skip
                basin = (k[:, None] - 1 + offsets).clamp(0, n_grid - 3)
                peak, k2 = peaks.scatter_(1, basin, 0).max(1)
                k2 = torch.where(peak > 0, k2 + 1, 0)
                values = scores.gather(1, k2.clamp(1, n_grid - 2)[:, None] + steps).T
                if positive:
                    values = values.square()
                elif split:
                    values = values + head
                other_k[s, sl] = k2
                other_around[s, :, sl] = values
    found = (other_k, other_around.to(dtype)) if other else None
    return best_k, best.to(dtype), around.to(dtype), window, found


def _grid_constants(
    model: SeparableModel, grid: torch.Tensor, seed: bool
) -> tuple[torch.Tensor, torch.Tensor, float | None, torch.Tensor, torch.Tensor | None]:
    """The grid's constants, on the grid's device (the CPU in :func:`fit_varpro`).

    The orthonormal bases of the grid values (:func:`_grid_basis`), ln tau of the grid values
    within the bounds and its even step (or None), the seed model's sign pattern at each grid
    value and, for the seed model's refinement (``seed``), the ln tau of its nulls.
    """
    lo, hi = model.bounds
    qmat = _grid_basis(model, grid, absolute=model.magnitude and not model.polarity)
    log_grid = grid.log().clamp(math.log(lo), math.log(hi))
    grid_pattern = (model.basis(grid)[:, 0] < 0).sum(0)  # (K,), used for the seed model
    kinks = _kinks(model, grid_pattern, log_grid) if seed else None
    return qmat, log_grid, _even_spacing(log_grid), grid_pattern, kinks


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


def _even_spacing(log_grid: torch.Tensor) -> float | None:
    """The step of a grid evenly spaced in ln tau (to 1e-9 of it), else None."""
    steps = log_grid.diff()
    spacing = float(steps.mean()) if steps.numel() else 0.0
    if spacing <= 0 or not bool(((steps - spacing).abs() <= 1e-9 * spacing).all()):
        return None
    return spacing


def _quartic(
    window: torch.Tensor,
    k: torch.Tensor,
    log_grid: torch.Tensor,
    spacing: float | None,
    fallback: torch.Tensor,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ln tau of the top of the quartic through the scores at k-2 ... k+2, or ``fallback``.

    ``window`` holds the scores at k-w ... k+w (w >= 2), ``(2 w + 1, V)``. A parabola through
    three grid values puts the start about a tenth of a grid step off (the profile is not a
    parabola over two grid steps), and then Newton's method needs two steps to converge; the
    quartic's top is about ten times closer, and one step does. Used where the five values lie
    inside the grid, the quartic curves downwards and, for the seed model, ``smooth`` (no null
    between k-2 and k+2); ``fallback`` elsewhere, and for a grid whose ln tau is not evenly
    spaced (``spacing`` None, see :func:`_even_spacing`).
    """
    n_grid = log_grid.numel()
    if n_grid < 5 or spacing is None:
        return fallback
    w = window.shape[0] // 2
    v0, v1, v2, v3, v4 = window[w - 2 : w + 3]
    a1 = (v0 - 8 * v1 + 8 * v3 - v4) / 12  # the quartic's coefficients, in grid steps from k
    a2 = (16 * (v1 + v3) - v0 - v4 - 30 * v2) / 24
    a3 = (2 * (v1 - v3) + v4 - v0) / 12
    a4 = (v0 + v4 - 4 * (v1 + v3) + 6 * v2) / 24
    x = (-a1 / (2 * a2)).clamp(-1, 1)
    for _ in range(3):  # Newton's method on the quartic's slope
        d1 = a1 + x * (2 * a2 + x * (3 * a3 + 4 * a4 * x))
        d2 = 2 * a2 + x * (6 * a3 + 12 * a4 * x)
        x = (x - d1 / d2).clamp(-1, 1)
    ok = (a2 < 0) & (d2 < 0) & (k >= 2) & (k <= n_grid - 3) & torch.isfinite(x)
    if smooth is not None:
        ok &= smooth
    return torch.where(ok, log_grid[k] + x.to(log_grid.dtype) * spacing, fallback)


def _start(
    around: torch.Tensor,
    k: torch.Tensor,
    log_grid: torch.Tensor,
    spacing: float | None,
    window: torch.Tensor | None,
    smooth: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ln tau to start Newton's method from.

    The top of the quartic through the ``window`` of scores (:func:`_quartic`); without a
    window, or where the quartic does not serve, the parabola's (:func:`_parabola`).
    """
    start = _parabola(around, k, log_grid)
    if window is None:
        return start
    return _quartic(window, k, log_grid, spacing, start, smooth)


# --- stage 2: one-dimensional Levenberg-Marquardt on ln tau ---------------------------------


def _take(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The columns ``keep`` of ``x (..., A)``.

    ``index_select`` for vectors (three times faster than indexing on a CPU), indexing for
    arrays (faster than ``index_select`` there).
    """
    return x.index_select(0, keep) if x.dim() == 1 else x[..., keep]


def _refine(
    model: SeparableModel,
    ys: torch.Tensor,
    u: torch.Tensor,
    bounds: tuple[float | torch.Tensor, float | torch.Tensor],
    max_iter: int,
    tol: float,
    history: list[torch.Tensor] | None,
    n_main: int,
    log_bounds: bool = False,
    host_tail: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Minimise the pattern costs of ``ys (n, A)`` over ``u = ln tau`` from ``u (A,)``.

    ``bounds`` on tau (s) are numbers, or tensors ``(A,)`` with bounds per column (on ln tau
    with ``log_bounds``). Once no more than ``host_tail`` columns are left (default
    :data:`HOST_TAIL` of the device's type), they finish on the CPU.

    Each column keeps its own damping factor and leaves the working set once its step is below
    ``tol`` (in ln tau, i.e. relative in tau) or its Newton decrement says the cost cannot fall
    by more than 1e-10 of itself, and at once when it sits on a bound and the cost still falls
    beyond it. ``history`` gets the summed cost of the first ``n_main`` columns after each
    iteration. Returns u, cost, coefficients ``(p, A)`` and iterations ``(A,)``.
    """
    lo, hi = (torch.as_tensor(b, dtype=u.dtype, device=u.device) for b in bounds)
    if not log_bounds:
        lo, hi = lo.log(), hi.log()
    lo, hi = lo.expand_as(u), hi.expand_as(u)
    u = u.clamp(lo, hi)
    yy, ysum = (ys * ys).sum(0), ys.sum(0)
    fa, ga, ha, ca = _profile(model, ys, u, yy, ysum)
    cost, c = fa.clone(), ca.clone()
    iterations = torch.zeros_like(u, dtype=torch.long)
    index = torch.arange(u.numel(), device=u.device)
    main = index < n_main
    finished = torch.zeros((), dtype=fa.dtype, device=fa.device)  # cost of the columns done

    def pinned(u, g, lo, hi):  # on a bound, and the cost still falls beyond it
        return ((u <= lo) & (g > 0)) | ((u >= hi) & (g < 0))

    exact = model.decay is not None and max_iter > 0  # the grid alone stays the grid's

    def leave(ua, fa, ga, ha, lo, hi):
        # ln tau as written back. With the exact curvature (Newton's method), a column that has
        # converged (its next step below tol, or a flat minimum) takes that step without
        # another evaluation: it lands within about the square of that step of the minimum
        # (the coefficients follow from tau, see _statistics), where stopping before it would
        # leave up to the step itself
        if not exact:
            return ua
        small = (ga.abs() <= tol * ha) | (ga * ga <= 1e-10 * fa * ha)
        last = small & (ha > 0) & ~pinned(ua, ga, lo, hi)
        return torch.where(last, (ua - ga / ha).clamp(lo, hi), ua)

    # the working set holds only the columns still iterating; the others are written back once
    going = ~(pinned(u, ga, lo, hi) | (ga.abs() <= tol * ha))  # on a bound, or already converged
    u = torch.where(going, u, leave(u, fa, ga, ha, lo, hi))
    ua, ya, lam = u.clone(), ys, torch.full_like(u, 1e-3)
    radius = torch.full_like(u, MAX_LOG_STEP)  # doubles while full steps keep being accepted
    state = torch.zeros_like(u)  # 0: may try the bound ahead, 1: tries it now, 2: has tried
    if not bool(going.all()):
        finished = finished + (fa * main)[~going].sum()
        keep = torch.nonzero(going)[:, 0]  # one index for all: one device sync, not ten
        index, ua, ya, yy, ysum, fa, ga, ha, ca, lam, radius, state, main, lo, hi = (
            _take(x, keep)
            for x in (index, ua, ya, yy, ysum, fa, ga, ha, ca, lam, radius, state, main, lo, hi)
        )
    if history is not None:
        history.append(finished + (fa * main).sum())
    done_after = 0  # iterations made
    tail = HOST_TAIL.get(u.device.type, 0) if host_tail is None else host_tail
    for it in range(1, max_iter + 1):
        if index.numel() == 0:
            break
        if index.numel() <= tail:  # the last few columns: on the CPU, from where they are
            host = torch.device("cpu")
            with _threads(1):
                u_h, cost_h, c_h, it_h = _refine(
                    model, ya.to(host), ua.to(host), (lo.to(host), hi.to(host)),
                    max_iter - it + 1, tol, None, 0, log_bounds=True, host_tail=0,
                )  # fmt: skip
            u[index], cost[index] = u_h.to(u.device), cost_h.to(u.device)
            c[:, index], iterations[index] = c_h.to(u.device), it_h.to(u.device) + (it - 1)
            if history is not None:
                history.append(finished + (cost[index] * main).sum())
            return u, cost, c, iterations
        done_after = it
        step = (ga / (ha * (1 + lam)).clamp_min(1e-300)).clamp_(-radius, radius)
        trial = (ua - step).clamp_(lo, hi)
        if exact:  # the columns whose cost keeps falling try the bound ahead of them
            now = state == 1
            trial = torch.where(now, torch.where(ga > 0, lo, hi), trial)
        f_t, g_t, h_t, c_t = _profile(model, ya, trial, yy, ysum)
        accept = f_t <= fa  # False for NaN
        moved = (trial - ua).abs_()
        if exact:
            # after a Newton step on a quadratic the slope is about 0; a step that leaves a
            # quarter of it, with the same sign, says the cost keeps falling beyond (as on
            # background voxels, whose cost flattens out exponentially towards a bound, where
            # Newton's steps stay short and many): the next trial is that bound (once per
            # column; a rejected try costs no damping)
            ahead = accept & (g_t * ga > 0) & (g_t.abs() > 0.25 * ga.abs()) & (state == 0)
            state = torch.where(now, 2.0, torch.where(ahead, 1.0, state))
        # Gauss-Newton ignores the residual's own curvature, which on noisy voxels makes its
        # steps overshoot and oscillate; the secant of the slope over the step measures the
        # true curvature, and is used where it is positive (superlinear, like the secant method)
        if not exact:
            secant = (g_t - ga) / (trial - ua)
            good = torch.isfinite(secant) & (secant > 0)
            ha = torch.where(good, secant, torch.where(accept, h_t, ha))
        else:  # the exact curvature (Newton's method, quadratic convergence)
            ha = torch.where(accept, h_t, ha)
        ua = torch.where(accept, trial, ua)
        fa = torch.where(accept, f_t, fa)
        ga = torch.where(accept, g_t, ga)
        ca = torch.where(accept, c_t, ca)
        # a rejected try of the bound says nothing about the step: damping and radius stay
        kept = (accept | now) if exact else accept
        lam = torch.where(accept, lam * 0.3, torch.where(kept, lam, lam * 10))
        full = accept & (moved >= radius * 0.999)
        radius = radius * torch.where(full, 2.0, torch.where(kept, 1.0, 0.5))
        # converged: the step taken, or the Newton step still to take, is below tol, or the
        # cost cannot fall by more than 1e-10 of itself (a flat minimum)
        small = ga.abs() <= tol * ha
        converged = (moved <= tol) | small | (ga * ga <= 1e-10 * fa * ha)
        done = (accept & converged & (state != 1)) | pinned(ua, ga, lo, hi) | (lam > 1e6)
        if history is not None:
            history.append(finished + (fa * main).sum())
        # drop the finished columns once they are worth a copy of the working set (an eighth)
        if int(done.sum()) * 8 >= index.numel():
            gone = torch.nonzero(done)[:, 0]
            leaving = index.index_select(0, gone)
            u[leaving] = leave(*(x.index_select(0, gone) for x in (ua, fa, ga, ha, lo, hi)))
            cost[leaving], c[:, leaving], iterations[leaving] = fa[gone], ca[:, gone], it
            finished = finished + (fa * main)[gone].sum()
            keep = torch.nonzero(~done)[:, 0]
            index, ua, ya, yy, ysum, fa, ga, ha, ca, lam, radius, state, main, lo, hi = (
                _take(x, keep)
                for x in (
                    index, ua, ya, yy, ysum, fa, ga, ha, ca, lam, radius, state, main, lo, hi
                )
            )  # fmt: skip
    u[index], cost[index], c[:, index] = leave(ua, fa, ga, ha, lo, hi), fa, ca
    iterations[index] = done_after
    return u, cost, c, iterations


# --- one chunk: grid, kink check, refinement -------------------------------------------------


def _refine_candidates(
    model: SeparableModel,
    y: torch.Tensor,
    rank: torch.Tensor,
    voxels: torch.Tensor | None,
    js: torch.Tensor | None,
    us: torch.Tensor,
    max_iter: int,
    tol: float,
    history: list[torch.Tensor] | None = None,
    n_main: int = 0,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine one column per (voxel, pattern) candidate: ``y[:, voxels]`` with pattern ``js``.

    ``voxels`` None stands for all voxels in order (no copy of ``y``).
    ``bounds`` on tau per candidate, else the model's. Returns ln tau, cost and coefficients
    ``(p, A)`` of each candidate.
    """
    ys = y if voxels is None else y.index_select(1, voxels)
    if js is not None:
        ys = _with_pattern(ys, rank, js)
    with thread_policy(y.device, ys.numel(), small=2**18):
        u, cost, c, _ = _refine(
            model, ys, us, bounds or model.bounds, max_iter, tol, history, n_main
        )
    return u, cost, c


def _kinks(model: SeparableModel, grid_pattern: torch.Tensor, log_grid: torch.Tensor):
    """Ln tau of the nulls of the seed model's curve, where its sign pattern changes, or None.

    Found by bisection, then Newton's method, between the grid values where the sign of a
    point changes; None when the pattern is not the number of nulls below tau (then no
    segment bounds are used).
    """
    signs = model.basis(log_grid.exp())[:, 0] < 0  # (n, K)
    changes = signs[:, 1:] != signs[:, :-1]
    points = torch.nonzero(changes.sum(1) == 1)[:, 0]
    if points.numel() != int(changes.sum()):  # a point changes sign more than once
        return None
    k = changes[points].int().argmax(1)
    a, b = log_grid[k], log_grid[k + 1]
    low_sign = signs[points, k]
    order = torch.arange(points.numel(), device=log_grid.device)
    for _ in range(8):  # bisection: the bracket shrinks to 1/256 of a grid step
        mid = 0.5 * (a + b)
        same = (model.basis(mid.exp())[points, 0, order] < 0) == low_sign  # point i at mid_i
        a, b = torch.where(same, mid, a), torch.where(same, b, mid)
    u = 0.5 * (a + b)
    for _ in range(4):  # then Newton's method on ln tau, kept in the bracket: to rounding
        tau = u.exp()
        phi, dphi = model.basis_fn(tau)
        step = phi[points, 0, order] / (dphi[points, 0, order] * tau)
        u = (u - step).clamp(a, b)
    kinks = torch.sort(u).values
    if not bool((torch.searchsorted(kinks, log_grid) == grid_pattern).all()):
        return None
    return kinks


def _take_better(
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    voxels: torch.Tensor,
    found: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    """Where a candidate of ``voxels`` has a lower cost than the voxel's best, take it.

    ``best`` and ``found`` hold cost ``(V,)``/``(A,)``, ln tau, coefficients ``(p, ...)`` and
    pattern; ``best`` is updated in place. Of several better candidates of one voxel the least
    cost wins, and of equal ones the first.
    """
    cost, u, c, j = found
    least = torch.full_like(best[0], torch.inf).scatter_reduce(0, voxels, cost, "amin")
    winner = torch.nonzero((cost == least[voxels]) & (cost < best[0][voxels]))[:, 0]
    if winner.numel() == 0:
        return
    none = voxels.numel()
    first = torch.full_like(best[3], none).scatter_reduce(0, voxels[winner], winner, "amin")
    take = torch.nonzero(first < none)[:, 0]
    pick = first[take]
    best[0][take], best[1][take], best[2][:, take], best[3][take] = (
        cost[pick], u[pick], c[:, pick], j[pick]
    )  # fmt: skip


def _seed_pattern(model: SeparableModel, tau: torch.Tensor, n: int) -> torch.Tensor:
    """The sign pattern of the seed model's curve at ``tau``: its number of negative points."""
    return torch.remainder((model.basis(tau)[:, 0] < 0).sum(0), n)


def _fit_chunk(
    model: SeparableModel,
    y: torch.Tensor,
    rank: torch.Tensor,
    qmat: torch.Tensor,
    log_grid: torch.Tensor,
    spacing: float | None,
    buffer: torch.Tensor,
    grid_pattern: torch.Tensor,
    kinks: torch.Tensor | None,
    max_iter: int,
    tol: float,
    history: list[torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients ``(p, V)`` and tau ``(V,)`` of the voxels ``y (n, V)`` (float64).

    ``grid_pattern (K,)`` holds the sign pattern of the seed model's curve at each grid value,
    ``kinks`` the ln tau of its nulls (see :func:`_kinks`).
    """
    n, n_voxels = y.shape
    p = len(model.linear)
    polarity = model.magnitude and model.polarity
    bases = [qmat]  # signed data, or the seed model whose |basis| carries its own signs
    if polarity:  # every pattern a monotone curve can have: the first j points negative
        signs = _signs(rank, torch.arange(n, device=y.device), qmat.dtype)  # (n, n patterns)
        bases = [qmat * sign[:, None] for sign in signs.T]
    seed = model.magnitude and not polarity
    # the window for the kink check, and the quartic start of Newton's method
    width = (KINK_STEPS if seed else 2 if model.decay is not None else 0) if max_iter else 0
    ks, scores, around, window, other = _grid_search(
        bases, p, y, buffer, width, other=seed and max_iter > 0 and FAR_BASINS
    )
    if polarity:  # the patterns worth refining, each from its own best grid value
        j, voxels_c, js_c = _polarity_candidates(y, rank, scores, around, max_iter > 0)
        pattern = torch.cat([j, js_c])
        voxels = torch.cat([torch.arange(n_voxels, device=y.device), voxels_c])
        # the starts of these (pattern, voxel) pairs only: about 4 of the n patterns
        starts = _start(
            around[pattern, :, voxels].T, ks[pattern, voxels], log_grid, spacing,
            window[pattern, :, voxels].T if width else None,
        )  # fmt: skip
        if max_iter and FAR_BASINS:  # and the best other basin of each voxel's best pattern
            far = _far_candidates(bases, p, y, buffer, j, scores.gather(0, j[None])[0], log_grid)
            if far is not None:
                voxels_c, js_c = torch.cat([voxels_c, far[0]]), torch.cat([js_c, far[1]])
                voxels, pattern = torch.cat([voxels, far[0]]), torch.cat([pattern, far[1]])
                starts = torch.cat([starts, far[2]])
        u, cost, c = _refine_candidates(
            model, y, rank, voxels, pattern, starts, max_iter, tol, history, n_voxels
        )
        best = (cost[:n_voxels], u[:n_voxels], c[:, :n_voxels], j)
        if voxels_c.numel():
            rest = slice(n_voxels, None)
            _take_better(best, voxels_c, (cost[rest], u[rest], c[:, rest], js_c))
            if history is not None:
                history.append(best[0].sum())  # after the kink check
    else:
        smooth = None
        if seed and width:  # the same sign pattern at k-2 and k+2: no null between
            last = grid_pattern.numel() - 1
            smooth = (
                grid_pattern[(ks[0] - 2).clamp(0, last)] == grid_pattern[(ks[0] + 2).clamp(0, last)]
            )
        start = _start(around[0], ks[0], log_grid, spacing, window[0] if width else None, smooth)
        j = grid_pattern[ks[0]] if seed else torch.zeros_like(ks[0])
        candidates = None
        if seed and max_iter:
            candidates = _neighbour_candidates(
                model, j, ks[0], scores[0], around[0], window[0], grid_pattern, log_grid, kinks,
                None if other is None else (other[0][0], other[1][0]),
            )  # fmt: skip
        if candidates is not None and ONE_REFINEMENT.get(y.device.type, True):
            voxels_c, js_c, us_c, (lo_c, hi_c) = candidates
            lo, hi = (torch.full_like(start, b) for b in model.bounds)
            u, cost, c = _refine_candidates(
                model, y, rank, torch.cat([torch.arange(n_voxels, device=y.device), voxels_c]),
                torch.cat([j, js_c]), torch.cat([start, us_c]), max_iter, tol, history,
                n_voxels, (torch.cat([lo, lo_c]), torch.cat([hi, hi_c])),
            )  # fmt: skip
            best = (cost[:n_voxels], u[:n_voxels], c[:, :n_voxels], j.clone())
            rest = slice(n_voxels, None)
            _take_better(best, voxels_c, (cost[rest], u[rest], c[:, rest], js_c))
            candidates = None
        else:
            u, cost, c = _refine_candidates(
                model, y, rank, None, j if seed else None, start, max_iter, tol, history,
                n_voxels,
            )  # fmt: skip
            best = (cost, u, c, j.clone())
        if seed and max_iter:
            _seed_kink_check(model, y, rank, best, candidates, kinks, max_iter, tol, history)
    coefficients, tau = best[2], best[1].exp()
    if model.magnitude:
        # the overall sign is free: the seed's M0 is positive, other curves end positive
        if not polarity:
            coefficients = coefficients.abs()
        else:
            last = model.basis(tau)[int(rank.argmax())]  # (p, V) at the latest time
            flip = (last * coefficients).sum(0) < 0
            coefficients = torch.where(flip, -coefficients, coefficients)
    return coefficients, tau


def _polarity_candidates(
    y: torch.Tensor,
    rank: torch.Tensor,
    scores: torch.Tensor,
    around: torch.Tensor,
    refined: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sign patterns of a model with a free polarity (3-parameter, TR-aware) to refine.

    ``scores (S, V)`` and ``around (S, 3, V)`` are the grid's results for every pattern
    j = 0 ... n-1 (the first j points negative). Each voxel's pattern with the
    best grid score is refined; with ``refined`` also, as candidates, the patterns with the
    null next to the smallest magnitude and one point further either way (where a curve with
    signal crosses zero), and every other pattern whose best grid score comes within
    KINK_MARGIN times its own drop to its neighbours of the best one (a minimum between two
    grid values can hide that much). On noise, whose magnitudes say nothing of a null, the
    best pattern can be any. Returns the best pattern ``(V,)`` and the candidates' voxels and
    patterns.
    """
    n = y.shape[0]
    best = scores.argmax(0)
    if not refined:
        return best, best[:0], best[:0]
    keep = scores + KINK_MARGIN * _drop(around) >= scores.gather(0, best[None])
    m = rank[y.min(0).indices]  # (min is much faster than argmin along dim 0 on a CPU)
    near = torch.remainder(m + torch.arange(-1, 3, device=y.device)[:, None], n)  # (4, V)
    keep.scatter_(0, near, True).scatter_(0, best[None], False)
    js, voxels = torch.nonzero(keep, as_tuple=True)
    return best, voxels, js


def _far_candidates(
    bases: list[torch.Tensor],
    p: int,
    y: torch.Tensor,
    buffer: torch.Tensor,
    j: torch.Tensor,
    best: torch.Tensor,
    log_grid: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The far basins of the 3-parameter and TR-aware models: :data:`FAR_BASINS` for them.

    For each voxel's best pattern ``j (V,)`` (its grid scores searched again, pattern by
    pattern, by :func:`_grid_search`) the best other basin more than KINK_STEPS grid values
    from the best, where its score comes within KINK_MARGIN times its own drop of the best
    score ``best (V,)``. Returns the candidates' voxels, patterns and starts (ln tau, the top
    of the parabola through the basin's peak), or None.
    """
    voxels, js, us = [], [], []
    for pattern in torch.unique(j).tolist():
        chosen = torch.nonzero(j == pattern)[:, 0]
        *_, found = _grid_search(
            [bases[pattern]], p, y.index_select(1, chosen), buffer, KINK_STEPS, other=True
        )
        far_k, far_around = found[0][0], found[1][0]
        keep = _close_basins(far_k, far_around, best[chosen])
        voxels.append(chosen.index_select(0, keep))
        js.append(torch.full_like(keep, pattern))
        us.append(_parabola(far_around[:, keep], far_k.index_select(0, keep), log_grid))
    if not voxels or sum(v.numel() for v in voxels) == 0:
        return None
    return torch.cat(voxels), torch.cat(js), torch.cat(us)


def _neighbour_candidates(
    model: SeparableModel,
    j: torch.Tensor,
    best_k: torch.Tensor,
    score: torch.Tensor,
    around: torch.Tensor,
    window: torch.Tensor,
    grid_pattern: torch.Tensor,
    log_grid: torch.Tensor,
    kinks: torch.Tensor | None,
    other: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]] | None:
    """Step 1 of the seed model's kink check: the neighbouring patterns worth refining.

    Where a null lies within KINK_STEPS grid steps of the best grid value ``best_k`` and a
    grid value past it scores within KINK_MARGIN times the drop of the score from the best
    grid value to its neighbours (a minimum between two grid values can hide that much), the
    pattern past the null is refined too, from its best grid value there, and within its own
    segment between two nulls (``kinks``, ln tau): where its cost falls towards the null, it
    ends on the null (one step). That step is needed: the cost on the null can lie below the
    minimum that the voxel's own pattern found, in another basin of that pattern's smooth cost
    (leaving at the start instead lost 64 of the check's 97 lower costs at 256x256 without
    :data:`FAR_BASINS`, one of them in a vial). With FAR_BASINS, likewise the best other
    basin of the grid scores, ``other`` (its index, 0 for none, and the scores at
    k-1, k, k+1 there; see :func:`_grid_search`), where it comes within KINK_MARGIN times its
    own drop of the best score: on noise the cost has several basins, and a farther one can
    hide a lower minimum. Returns the candidates' voxels, patterns, starts (ln tau) and bounds
    on tau, or None.
    """
    device = j.device
    last = grid_pattern.numel() - 1
    offsets = torch.arange(-KINK_STEPS, KINK_STEPS + 1, device=device)[:, None]
    near_k = (best_k + offsets).clamp(0, last)  # (2w + 1, V)
    near = grid_pattern[near_k]
    close = window >= score - KINK_MARGIN * _drop(around)
    voxels, js, us = [], [], []
    for side in (-1, 1):
        # the best close grid value past the null (none: -inf), as the start
        past, at = torch.where(close & (near == j + side), window, -torch.inf).max(0)
        chosen = torch.nonzero(past > -torch.inf)[:, 0]
        if chosen.numel() == 0:
            continue
        voxels.append(chosen)
        js.append(j.index_select(0, chosen) + side)
        start_k = near_k.gather(0, at[None])[0].index_select(0, chosen)
        us.append(log_grid.index_select(0, start_k))
    if other is not None:  # the best other basin, from its peak, in the pattern there
        far_k, far_around = other
        chosen = _close_basins(far_k, far_around, score)
        start_k = far_k.index_select(0, chosen)
        voxels.append(chosen)
        js.append(grid_pattern.index_select(0, start_k))
        us.append(log_grid.index_select(0, start_k))
    if not voxels:
        return None
    voxels_t, js_t, us_t = torch.cat(voxels), torch.cat(js), torch.cat(us)
    lo, hi = (torch.full_like(us_t, b) for b in model.bounds)
    if kinks is not None:  # each pattern within its own segment, between two nulls
        edges = torch.cat([lo[:1].log(), kinks, hi[:1].log()])
        lo, hi = edges[js_t].exp(), edges[js_t + 1].exp()
    return voxels_t, js_t, us_t, (lo, hi)


def _seed_kink_check(
    model: SeparableModel,
    y: torch.Tensor,
    rank: torch.Tensor,
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    candidates: tuple | None,
    kinks: torch.Tensor | None,
    max_iter: int,
    tol: float,
    history: list[torch.Tensor] | None,
) -> None:
    """The seed model's kink check, updating ``best`` (cost, ln tau, coefficients, pattern).

    1. The neighbouring patterns ``candidates`` (:func:`_neighbour_candidates`; None when
       there are none, or when they were refined together with the voxels' own patterns) are
       refined, and a lower cost taken.
    2. Consistency: the cost of a pattern bounds the true cost from above and equals it only
       where the curve has that pattern; a minimum found outside its own pattern means that
       a lower cost lies in the pattern there, which is refined in turn (KINK_ROUNDS rounds).
    """
    n = y.shape[0]
    if candidates is not None:
        voxels, js, us, bounds = candidates
        u, cost, c = _refine_candidates(
            model, y, rank, voxels, js, us, max_iter, tol, bounds=bounds
        )
        _take_better(best, voxels, (cost, u, c, js))
    for _ in range(KINK_ROUNDS):
        if kinks is not None:  # the number of nulls below tau
            own = torch.remainder(torch.searchsorted(kinks, best[1]), n)
        else:
            own = _seed_pattern(model, best[1].exp(), n)
        moved = torch.nonzero(own != torch.remainder(best[3], n))[:, 0]
        if moved.numel() == 0:
            break
        u, cost, c = _refine_candidates(
            model, y, rank, moved, own[moved], best[1][moved], max_iter, tol
        )
        # a voxel whose own pattern gives no lower cost keeps its result and leaves the check
        best[3][moved] = own[moved]
        _take_better(best, moved, (cost, u, c, own[moved]))
    if history is not None:
        history.append(best[0].sum())  # after the kink check


# --- the public fits -------------------------------------------------------------------------


def _statistics(
    model: SeparableModel, y: torch.Tensor, c: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """RSS, R², the diagonal of (JᵀJ)⁻¹, the coefficients and whether tau is determined.

    ``y (n, V)`` are the data, ``c (p, V)`` and ``tau (V,)`` the fits; for a model with a
    ``decay`` basis the coefficient is computed again here, in closed form at tau (the
    refinement's last Newton step moves tau without evaluating it there). Tau is determined
    where :func:`_determined` says so. In blocks of columns that fit a CPU's cache, like
    :func:`_profile`.
    """
    block = _block(y)
    if y.shape[1] <= block:
        return _statistics_block(model, y, c, tau)
    parts = [
        _statistics_block(model, y[:, i : i + block], c[:, i : i + block], tau[i : i + block])
        for i in range(0, y.shape[1], block)
    ]
    rss, r_squared, inverse_diag, coefficients, determined = zip(*parts, strict=True)
    return (
        torch.cat(rss), torch.cat(r_squared), torch.cat(inverse_diag), torch.cat(coefficients, 1),
        torch.cat(determined),
    )  # fmt: skip


def _determined(fisher: torch.Tensor, tau: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    r"""Where the fitted curve changes measurably with tau: by MIN_SENSITIVITY of its norm.

    ``fisher (V, q, q)`` is JᵀJ with tau's column last, ``energy (V,)`` the fitted curve's
    squared norm. The change of the curve for a change of ln tau by one, with the
    coefficients fitted again, is :math:`\tau \sqrt{I_\tau}` (:func:`_last_information`).
    Where it is below MIN_SENSITIVITY of the curve's norm, no data determine tau: a seed-model
    T1 far below the shortest TI (``exp(-TI/T1)`` under float64's rounding) leaves the curve
    constant, and its cost equals the bound's.
    """
    information = _last_information(fisher) * tau * tau
    return information > MIN_SENSITIVITY**2 * energy  # False for NaN, and for no signal


def _statistics_block(
    model: SeparableModel, y: torch.Tensor, c: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_statistics` of one block of columns.

    For magnitude data the Jacobian is that of the signed model times the sign of the signal,
    which leaves JᵀJ unchanged, so the signed model's columns serve.
    """
    if model.decay is not None and len(model.decay) == 1:
        return _statistics_decay(model, y, tau)
    phi, dphi = model.basis_fn(tau)  # (n, p, V)
    if model.decay is not None:  # Newton's last step moved tau: the coefficients again there,
        ys = y  # with the signs of the signal for magnitude data
        if model.magnitude:
            ys = torch.where((phi * c[None]).sum(1) < 0, -y, y)
        b = torch.stack([(phi[:, i] * ys).sum(0) for i in range(phi.shape[1])])
        c = _inverse_times(_gram(phi.unbind(1)), b)
    columns = [*phi.unbind(1), (dphi * c[None]).sum(1)]  # J's columns: by c_i, and by tau
    signal = (phi * c[None]).sum(1)
    if model.magnitude:
        signal = signal.abs()
    rss, r_squared, fisher = _goodness(y - signal, columns, y)
    determined = _determined(fisher, tau, (signal * signal).sum(0))
    return rss, r_squared, _ridged_inverse_diagonal(fisher), c, determined


def _statistics_decay(
    model: SeparableModel, y: torch.Tensor, tau: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    r""":func:`_statistics_block` for one curve :math:`\phi = \alpha + \beta e` (``model.decay``).

    The coefficient :math:`c = |\phi|^T y / \phi^T\phi` (:math:`\phi^T y` for signed data;
    :math:`M_0 \ge 0` for magnitudes), then :math:`RSS = \|y\|^2 - 2 c\, b + c^2 g` and
    :math:`J^TJ` from the sums of :math:`e` and :math:`e^2` weighted by :math:`1, t, t^2`, as in
    :func:`_profile_decay`: the same numbers as the general form with fewer operations.
    """
    ((alpha, beta),) = model.decay
    n = y.shape[0]
    r = 1 / tau
    e, se, see, _ = _decay_sums(model, r)
    phi = torch.rsub(e, alpha, alpha=-beta)  # alpha + beta e
    if model.magnitude:
        phi = phi.abs_()
    b = (phi * y).sum(0)
    g = alpha * alpha * n + 2 * alpha * beta * se[0] + beta * beta * see[0]
    c = b / g
    if model.magnitude:
        c = c.abs()
    yy = (y * y).sum(0)
    rss = (yy - 2 * c * b + c * c * g).clamp_min(0)
    tss = (y - y.mean(0)).square_().sum(0)
    r_squared = 1 - rss / tss.clamp_min(torch.finfo(y.dtype).tiny)
    # J's columns: phi and c dphi/dtau, dphi/dtau = beta e t / tau^2
    x = c * beta * r * r * (alpha * se[1] + beta * see[1])
    dd = (c * beta * r * r) ** 2 * see[2]
    fisher = torch.stack([torch.stack([g, x], -1), torch.stack([x, dd], -1)], -2)  # (V, 2, 2)
    determined = _determined(fisher, tau, c * c * g)
    return rss, r_squared, _ridged_inverse_diagonal(fisher), c[None], determined


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


def _check_magnitudes(model: SeparableModel, voxels: torch.Tensor) -> None:
    """Refuse negative data for a magnitude model.

    Real-valued (phase-corrected) IR images are negative before the null. A magnitude model
    cannot fit them, and its sign search would fit something else: a plausible, wrong map.
    """
    if not model.magnitude:
        return
    negative = (voxels < 0) & torch.isfinite(voxels)  # NaN and -inf voxels fail on their own
    if bool(negative.any()):
        lowest = float(voxels[negative].min())
        raise ValueError(
            f"{model.name} fits magnitude images, but the data hold negative values (down to "
            f"{lowest:.4g}, in {int(negative.any(0).sum())} voxels): signed (real-valued) images "
            f"need the model made with magnitude=False, e.g. ir_three_parameter_model(ti, "
            f"magnitude=False); magnitudes with a few negative values (from filtering) can be "
            f"passed as data.abs()"
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
        signal (all zero), with tau on a bound, or whose fitted curve does not change with tau
        (by :data:`MIN_SENSITIVITY` of itself for a change of ln tau by one: "not determined")
        fail and are counted (``failures``); the bounds are ``model.bounds`` with
        Levenberg-Marquardt, the ends of the grid without.

    Raises
    ------
    ValueError
        For times that are not finite, negative or look like ms, empty data, a mask that
        selects nothing, a bad grid, a model whose number of times differs from the data's, or
        negative data for a magnitude model (signed images need ``magnitude=False``).

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
    _check_magnitudes(model, voxels)
    device = data.device
    lo, hi = model.bounds
    if grid is None:
        points = 120 if lm_iterations == 0 else GRID_POINTS
        # exactly the bounds at both ends, so a voxel pinned there is recognised at once
        grid = torch.linspace(math.log(lo), math.log(hi), points, dtype=dtype, device=device).exp()
    # the grid's constants are computed on the CPU (small, sequential work: a GPU would wait on
    # its kernel launches), then moved to the data's device once
    grid = check_times(grid, f"grid of {model.nonlinear}").to(dtype=dtype).cpu()
    if grid.numel() < 3 or not bool((grid > 0).all()):
        raise ValueError(f"the grid needs at least 3 values, all > 0 s; got {grid.tolist()[:5]}")
    n, n_voxels = voxels.shape
    p = len(model.linear)
    rank = torch.argsort(torch.argsort(model.times)).to(device)  # time order of each point
    polarity = model.magnitude and model.polarity
    seed = model.magnitude and not polarity and lm_iterations > 0
    qmat, log_grid, spacing, grid_pattern, kinks = _grid_constants(model, grid, seed)
    # the grid's projections in the data's precision (they only pick a start), float32 at least
    grid_dtype = torch.promote_types(data.dtype, torch.float32)
    qmat = qmat.to(device=device, dtype=grid_dtype)
    log_grid, grid_pattern = log_grid.to(device), grid_pattern.to(device)
    kinks = kinks.to(device) if kinks is not None else None
    candidates = 3 if model.magnitude and lm_iterations else 1
    per_voxel = grid.numel() * p * 4 + candidates * n * 8 * 12 + n * 8 * 4
    chunk = min(n_voxels, chunk_voxels(device, per_voxel)) or 1
    # the grid's projections of one block of voxels
    block_bytes = GRID_BLOCK_BYTES.get(device.type, GRID_BLOCK_BYTES["cuda"])
    grid_block = max(1, block_bytes // (qmat.shape[1] * qmat.element_size()))
    buffer = torch.empty(qmat.shape[1] * min(chunk, grid_block), dtype=grid_dtype, device=device)
    finite, has_signal = voxel_status(voxels)
    coefficients = torch.empty((p, n_voxels), dtype=dtype, device=device)
    tau = torch.empty(n_voxels, dtype=dtype, device=device)
    keep = data.dtype
    rss = torch.empty(n_voxels, dtype=keep, device=device)
    r_squared = torch.empty(n_voxels, dtype=keep, device=device)
    inverse_diag = torch.empty((n_voxels, p + 1), dtype=keep, device=device)
    determined = torch.empty(n_voxels, dtype=torch.bool, device=device)
    history_chunks: list[list[float]] = []  # summed costs, one device sync per chunk
    bar = trange(0, n_voxels, chunk, desc="VarPro", disable=not progress, leave=False)
    # the grid's matrix products use the idle cores; the small operations of the refinement
    # (its working set shrinks fast) run on one thread, see thread_policy
    with thread_policy(device, chunk * n * p):
        for start in bar:
            sl = slice(start, start + chunk)
            y = torch.where(finite[sl], voxels[:, sl].to(dtype), 0.0)
            history: list[torch.Tensor] = []
            c, t = _fit_chunk(
                model, y, rank, qmat, log_grid, spacing, buffer, grid_pattern, kinks,
                lm_iterations, tol,
                history,
            )  # fmt: skip
            history_chunks.append(torch.stack(history).tolist() if history else [])
            rss[sl], r_squared[sl], inverse_diag[sl], c, determined[sl] = _statistics(
                model, y, c, t
            )
            coefficients[:, sl], tau[sl] = c, t
    # A grid search alone cannot leave its grid: a voxel at either end is pinned there.
    ends = (float(grid.min()), float(grid.max()))
    pinned = at_bound(tau, model.bounds if lm_iterations else ends)
    ok = has_signal & torch.isfinite(rss) & torch.isfinite(tau) & ~pinned & determined
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
        {"not finite": ~finite, "no signal": ~has_signal, "at a bound": pinned,
         "not determined": ~determined},
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

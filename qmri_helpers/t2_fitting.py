r"""T2 and B1 from a CPMG multi-echo spin-echo series: EPG dictionary matching, then refinement.

The model is :math:`S_n = M_0\, \mathrm{EPG}_n(T_2, B_1; T_1, ESP)` (:func:`.epg.cpmg_signal`).
For every atom of a dictionary over (T2, B1) the amplitude :math:`M_0` has the closed form
:math:`M_0 = \langle y, d\rangle / \langle d, d\rangle`, so the best atom is the one whose
normalised curve has the largest dot product with the voxel's curve. The search is coarse to
fine: a coarse sub-grid first, then the fine grid in a window around the coarse winner, then
the vertex of the quadratic through the residuals of the best fine atom's 3x3 neighbours (T2
and B1 are correlated, so the valley need not run along an axis). The signal at the refined
(T2, B1) is interpolated (bilinear in log T2 and B1) from the fine dictionary, which also gives
the Jacobian for the Cramér-Rao standard deviations. :func:`fit_epg` returns the
:class:`~qmri_helpers.fitting.FitResult` of the other solvers (it is importable from
:mod:`qmri_helpers.fitting` too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import einops
import torch

from . import epg
from .fitting import FitResult, _flush_denormals
from .validation import check_data, check_mask, check_times, count_failures, voxel_status

__all__ = ["EPG_CHUNK_BYTES", "epg_dictionary", "fit_epg"]

#: Working memory that one chunk of voxels may use (bytes).
EPG_CHUNK_BYTES = 128 * 2**20


def epg_dictionary(
    t2_grid: torch.Tensor,
    b1_grid: torch.Tensor,
    esp: float,
    n_echoes: int,
    t1: float = 1.0,
    refocusing: float = math.pi,
) -> torch.Tensor:
    """Echo trains (M0 = 1) for every (T2, B1) of the grids, shape ``(n_echoes, n_t2, n_b1)``.

    Computed in the dtype and on the device of ``t2_grid``.
    """
    t2 = t2_grid[:, None]
    b1 = b1_grid.to(device=t2.device, dtype=t2.dtype)[None, :]
    return epg.cpmg_signal(t2, b1, esp, n_echoes, t1=t1, refocusing=refocusing)


def _flatten(data: torch.Tensor, mask: torch.Tensor | None):
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise TypeError(f"data must be a floating-point torch.Tensor, got {type(data).__name__}")
    if data.ndim < 2:
        raise ValueError(f"data must have shape (n_echoes, ...voxels), got {tuple(data.shape)}")
    shape = data.shape[1:]
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool)
    mask_flat = check_mask(mask, shape).to(data.device)
    voxels = einops.rearrange(data, "n ... -> n (...)")
    return voxels[:, mask_flat], mask_flat.cpu(), shape


def _quadratic_vertex(cost: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertex (in grid steps, within ±1) of the quadratic through a 3x3 patch ``(3, 3, v)``.

    Where the patch is not convex the vertex falls back to a parabola along each axis.
    """
    g_t = 0.5 * (cost[2, 1] - cost[0, 1])
    g_b = 0.5 * (cost[1, 2] - cost[1, 0])
    h_tt = cost[2, 1] - 2 * cost[1, 1] + cost[0, 1]
    h_bb = cost[1, 2] - 2 * cost[1, 1] + cost[1, 0]
    h_tb = 0.25 * (cost[2, 2] - cost[2, 0] - cost[0, 2] + cost[0, 0])
    det = h_tt * h_bb - h_tb**2
    convex = (h_tt > 0) & (h_bb > 0) & (det > 0)
    safe = torch.where(convex, det, torch.ones_like(det))
    dt = torch.where(convex, -(h_bb * g_t - h_tb * g_b) / safe, torch.zeros_like(det))
    db = torch.where(convex, -(h_tt * g_b - h_tb * g_t) / safe, torch.zeros_like(det))
    dt_axis = torch.where(h_tt > 0, -g_t / torch.where(h_tt > 0, h_tt, 1.0), 0.0)
    db_axis = torch.where(h_bb > 0, -g_b / torch.where(h_bb > 0, h_bb, 1.0), 0.0)
    dt = torch.where(convex, dt, dt_axis).clamp(-1, 1)
    db = torch.where(convex, db, db_axis).clamp(-1, 1)
    return dt, db


@dataclass(frozen=True)
class _Dictionary:
    """The fine (T2, B1) grid, its atoms as rows, and the coarse sub-grid of unit atoms."""

    log_t2: torch.Tensor  # (n_t2,), float64
    b1: torch.Tensor  # (n_b1,), float64
    atoms: torch.Tensor  # (n_t2 * n_b1, n): echo trains for M0 = 1, index i * n_b1 + j
    unit: torch.Tensor  # the same, normalised to unit length
    coarse_unit: torch.Tensor  # (n, n_coarse): the coarse sub-grid's unit atoms, as columns
    coarse_t2: torch.Tensor  # (n_coarse_t2,): fine indices of the coarse T2 values
    coarse_b1: torch.Tensor  # (n_coarse_b1,)

    @classmethod
    def build(cls, esp, n, t1, refocusing, t2_range, b1_range, t2_step, b1_step, coarse,
              device, dtype) -> _Dictionary:  # fmt: skip
        n_t2 = math.ceil(math.log(t2_range[1] / t2_range[0]) / math.log1p(t2_step)) + 1
        log_t2 = torch.linspace(math.log(t2_range[0]), math.log(t2_range[1]), n_t2,
                                device=device, dtype=torch.float64)  # fmt: skip
        n_b1 = math.ceil((b1_range[1] - b1_range[0]) / b1_step - 1e-9) + 1
        b1 = torch.linspace(b1_range[0], b1_range[1], n_b1, device=device, dtype=torch.float64)
        atoms = epg_dictionary(log_t2.exp().to(dtype), b1, esp, n, t1=t1, refocusing=refocusing)
        unit = atoms / atoms.norm(dim=0).clamp_min(torch.finfo(dtype).tiny)
        coarse_t2 = torch.arange(0, n_t2, coarse, device=device)
        coarse_b1 = torch.arange(0, n_b1, coarse, device=device)
        if int(coarse_b1[-1]) != n_b1 - 1:  # keep B1 = 1 (the upper end) in the coarse grid
            coarse_b1 = torch.cat([coarse_b1, torch.tensor([n_b1 - 1], device=device)])
        coarse_unit = einops.rearrange(unit[:, coarse_t2][:, :, coarse_b1], "n a b -> n (a b)")
        return cls(
            log_t2, b1, einops.rearrange(atoms, "n a b -> (a b) n"),
            einops.rearrange(unit, "n a b -> (a b) n"), coarse_unit, coarse_t2, coarse_b1,
        )  # fmt: skip

    @property
    def shape(self) -> tuple[int, int]:
        return self.log_t2.numel(), self.b1.numel()

    def index(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return i * self.b1.numel() + j


def _interpolate(grid, i, j, dt, db, yt) -> dict[str, torch.Tensor]:
    """Atom, its derivatives, amplitude and residual at fine index ``(i + dt, j + db)``."""
    n_t2, n_b1 = grid.shape
    dtype = yt.dtype
    it = torch.where(dt < 0, i - 1, i).clamp(0, n_t2 - 2)
    jb = torch.where(db < 0, j - 1, j).clamp(0, n_b1 - 2)
    ft = (i - it + dt).to(dtype)[:, None]
    fb = (j - jb + db).to(dtype)[:, None]
    a00, a01 = grid.atoms[grid.index(it, jb)], grid.atoms[grid.index(it, jb + 1)]
    a10, a11 = grid.atoms[grid.index(it + 1, jb)], grid.atoms[grid.index(it + 1, jb + 1)]
    step_t2 = float(grid.log_t2[1] - grid.log_t2[0])
    step_b1 = float(grid.b1[1] - grid.b1[0])
    d = (1 - ft) * ((1 - fb) * a00 + fb * a01) + ft * ((1 - fb) * a10 + fb * a11)
    m0 = (d * yt).sum(1) / (d * d).sum(1).clamp_min(torch.finfo(dtype).tiny)
    return {
        "d": d,
        "d_logt2": ((1 - fb) * (a10 - a00) + fb * (a11 - a01)) / step_t2,
        "d_b1": ((1 - ft) * (a01 - a00) + ft * (a11 - a10)) / step_b1,
        "m0": m0,
        "rss": ((yt - m0[:, None] * d) ** 2).sum(1),
        "t2": torch.exp(grid.log_t2[it] + ft[:, 0].double() * step_t2).to(dtype),
        "b1": (grid.b1[jb] + fb[:, 0].double() * step_b1).to(dtype),
    }


def _fit_chunk(
    y: torch.Tensor, grid: _Dictionary, half: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fit the voxels ``y (n, v)``: coarse and fine match, quadratic vertex, interpolated atom."""
    dtype = y.dtype
    n_t2, n_b1 = grid.shape
    finite = torch.isfinite(y).all(0)
    y = torch.where(finite, y, torch.zeros_like(y))
    yt = y.T  # (v, n)
    energy = (y**2).sum(0)
    losses = torch.zeros(3, dtype=torch.float64, device=y.device)
    # 1. Coarse match: the largest projection on a unit atom is the smallest residual.
    projection = yt @ grid.coarse_unit  # (v, coarse atoms)
    best = projection.argmax(1, keepdim=True)
    losses[0] = (energy - projection.gather(1, best)[:, 0].clamp_min(0) ** 2).sum()
    del projection
    i0 = grid.coarse_t2[best[:, 0] // grid.coarse_b1.numel()]
    j0 = grid.coarse_b1[best[:, 0] % grid.coarse_b1.numel()]
    # 2. Fine match in a window of w x w atoms around the coarse winner (clipped to the grids).
    w = 2 * half + 1
    offsets = torch.arange(-half, half + 1, device=y.device)
    ii = (i0[:, None] + offsets).clamp(0, n_t2 - 1)  # (v, w)
    jj = (j0[:, None] + offsets).clamp(0, n_b1 - 1)
    flat = grid.index(ii[:, :, None], jj[:, None, :]).reshape(len(i0), -1)  # (v, w*w)
    # The residual energy - projection**2 cancels: in float32 its error (about 1e-7 of the
    # energy) exceeds the differences between neighbouring atoms near the grids' ends, and then
    # the order of the summation - set by the other voxels in the chunk - picks the atom.
    # The window is small, so it is computed in float64.
    projection = einops.einsum(
        grid.unit[flat].double(), yt.double(), "v k n, v n -> v k"
    ).clamp_min(0)
    cost = energy.double()[:, None] - projection**2  # residual sum of squares of each atom
    del projection
    k = cost.argmin(1, keepdim=True)
    fine_rss = cost.gather(1, k)[:, 0]
    losses[1] = fine_rss.sum()
    a, b = k[:, 0] // w, k[:, 0] % w
    i, j = ii.gather(1, a[:, None])[:, 0], jj.gather(1, b[:, None])[:, 0]

    # 3. Refinement: the vertex of the quadratic through the residuals of the 3x3 neighbours
    #    in the window (T2 and B1 are correlated, so the valley of the cost runs diagonally).
    pa, pb = a.clamp(1, w - 2), b.clamp(1, w - 2)
    step = torch.tensor([-1, 0, 1], device=y.device)
    patch = (pa[:, None, None] + step[:, None]) * w + (pb[:, None, None] + step[None, :])
    c = einops.rearrange(cost.gather(1, patch.reshape(-1, 9)), "v (p q) -> p q v", p=3)
    dt, db = (x.to(dtype) for x in _quadratic_vertex(c))
    # Only where the patch holds 3 distinct consecutive grid values along the axis.
    rows = ii.gather(1, torch.stack([pa - 1, pa, pa + 1], 1))
    cols = jj.gather(1, torch.stack([pb - 1, pb, pb + 1], 1))
    inner_t = (rows[:, 2] - rows[:, 0] == 2) & (i > 0) & (i < n_t2 - 1)
    inner_b = (cols[:, 2] - cols[:, 0] == 2) & (j > 0) & (j < n_b1 - 1)
    dt = torch.where(inner_t, dt + (rows[:, 1] - i), torch.zeros_like(dt)).clamp(-1, 1)
    db = torch.where(inner_b, db + (cols[:, 1] - j), torch.zeros_like(db)).clamp(-1, 1)
    # 4. The signal at the refined point, bilinear between the 4 surrounding atoms; the grid
    #    point itself where the vertex fits worse (a cost far from a quadratic).
    best = _interpolate(grid, i, j, dt, db, yt)
    worse = torch.nonzero(best["rss"] > fine_rss)[:, 0]
    if len(worse):
        zero = torch.zeros(len(worse), dtype=dt.dtype, device=y.device)
        on_grid = _interpolate(grid, i[worse], j[worse], zero, zero, yt[worse])
        for key, value in on_grid.items():
            best[key][worse] = value
    d, d_logt2, d_b1, m0, rss = (best[k] for k in ("d", "d_logt2", "d_b1", "m0", "rss"))
    losses[2] = rss.sum()
    t2, b1 = best["t2"], best["b1"]
    # 5. Cramér-Rao: Jacobian by (m0, t2, b1), Fisher matrix per voxel, ridge-regularised.
    jac = torch.stack([d, m0[:, None] * d_logt2 / t2[:, None], m0[:, None] * d_b1], -1)
    fisher = (jac.transpose(1, 2) @ jac).to(torch.float64)
    ridge = 1e-10 * fisher.diagonal(dim1=1, dim2=2).amax(1).clamp_min(1e-30)
    eye = torch.eye(3, dtype=torch.float64, device=y.device)
    sd = torch.linalg.inv(fisher + ridge[:, None, None] * eye).diagonal(dim1=1, dim2=2)
    sd = sd.clamp_min(0).sqrt().to(dtype)
    values = {
        "m0": m0, "t2": t2, "b1": b1,
        "rss": torch.where(finite, rss, torch.full_like(rss, float("nan"))),
        "tss": ((y - y.mean(0)) ** 2).sum(0),
        "sd_m0": sd[:, 0], "sd_t2": sd[:, 1], "sd_b1": sd[:, 2],
        "edge": ((~inner_t) | (j == 0)).to(dtype),
    }  # fmt: skip
    return values, losses


def _t1_groups(
    t1: float | torch.Tensor, shape: torch.Size, mask_flat: torch.Tensor, device: torch.device
) -> list[tuple[float, torch.Tensor | None]]:
    """One (T1, voxel indices) pair per distinct T1; indices None for a single value."""
    if not isinstance(t1, torch.Tensor) or t1.numel() == 1:
        value = float(t1)
        if not value > 0 or not math.isfinite(value):
            raise ValueError(f"t1 must be a positive time in s, got {value}")
        return [(value, None)]
    if tuple(t1.shape) != tuple(shape):
        raise ValueError(f"the t1 map has shape {tuple(t1.shape)}, expected {tuple(shape)}")
    values = t1.detach().flatten()[mask_flat.to(t1.device)].to(torch.float64).cpu()
    if not bool((values > 0).all() & torch.isfinite(values).all()):
        raise ValueError("the t1 map must be positive and finite (s) in every fitted voxel")
    steps = torch.round(torch.log(values) / math.log(1.02))
    groups = []
    for step in torch.unique(steps):
        where = torch.nonzero(steps == step)[:, 0].to(device)
        groups.append((float(math.exp(float(step) * math.log(1.02))), where))
    return groups


def fit_epg(
    data: torch.Tensor,
    te: torch.Tensor,
    t1: float | torch.Tensor = 1.0,
    mask: torch.Tensor | None = None,
    t2_range: tuple[float, float] = (0.004, 10.0),
    b1_range: tuple[float, float] = (0.4, 1.0),
    t2_step: float = 0.02,
    b1_step: float = 0.02,
    coarse: int = 2,
    refocusing: float = math.pi,
    noise_sigma: float | None = None,
    max_bytes: int = EPG_CHUNK_BYTES,
) -> FitResult:
    r"""Fit :math:`M_0`, :math:`T_2` and :math:`B_1` of the EPG CPMG model in every voxel.

    Parameters
    ----------
    data
        Echo magnitudes, shape ``(n_echoes, ...)``, on any device (the fit runs there).
    te
        Echo times in s, shape ``(n_echoes,)``: a CPMG train, ``TE_n = n * ESP``.
    t1
        Longitudinal relaxation time in s that the fit assumes (it sets how fast the stored
        states decay): one value for every voxel (1 s is a common choice when it is
        unknown), or a map of shape ``(...)``, e.g. from a T1 measurement. A map is rounded
        to 2% steps and each distinct value gets its own dictionary, so it costs one
        dictionary per value.
    mask
        Voxels to fit, shape ``(...)``; None fits all.
    t2_range
        Range of the T2 dictionary in s (log-spaced).
    b1_range
        Range of the refocusing scale :math:`B_1`. Flip angles :math:`B_1 \alpha` and
        :math:`2\pi - B_1 \alpha` give the same echoes, so values above 1 cannot be told apart
        from those below, and the range ends at 1 by default.
    t2_step
        Relative step of the fine T2 grid (0.02: 2%; the quadratic vertex and the interpolation
        refine within it).
    b1_step
        Step of the fine B1 grid.
    coarse
        The coarse search takes every ``coarse``-th value of both fine grids.
    refocusing
        Nominal refocusing angle in radians.
    noise_sigma
        Noise standard deviation for the Cramér-Rao ``sd``; None estimates it from the
        residuals.
    max_bytes
        Working-memory budget of one chunk of voxels.

    Returns
    -------
    FitResult
        Maps ``m0`` (a.u.), ``t2`` (s) and ``b1`` (1), shape ``(...)``, with validity (T2
        inside the dictionary, B1 above its lower end, M0 > 0), residual norm, R² and
        Cramér-Rao SDs. ``loss_history`` holds the mean squared residual of the coarse
        match, of the fine match and of the refined fit. Voxels with NaN or inf data, without
        signal (all zero) or on the dictionary's edge fail and are counted (``failures``);
        half-precision data are fitted in float32.
    """
    data = check_data(data)  # half precision is fitted in float32
    check_times(te, "TE")
    voxels, mask_flat, shape = _flatten(data, mask)
    finite, has_signal = voxel_status(voxels)  # NaN/inf or all-zero voxels fail, counted
    voxels = torch.where(finite, voxels, 0.0)
    esp = epg.cpmg_echo_spacing(te)
    n = int(torch.as_tensor(te).numel())
    if data.shape[0] != n:
        raise ValueError(f"data has {data.shape[0]} echoes but te has {n} echo times")
    if n < 4:
        raise ValueError(f"{n} echoes cannot determine M0, T2 and B1: acquire at least 4")
    if not (0 < t2_range[0] < t2_range[1]) or not (0 < b1_range[0] < b1_range[1]):
        raise ValueError(f"bad ranges: t2_range {t2_range}, b1_range {b1_range}")
    device, dtype = data.device, data.dtype
    n_voxels = voxels.shape[1]
    groups = _t1_groups(t1, shape, mask_flat, device)
    window = (2 * coarse + 1) ** 2
    names = ("m0", "t2", "b1", "rss", "tss", "sd_m0", "sd_t2", "sd_b1", "edge")
    out = {k: torch.empty(n_voxels, dtype=dtype, device=device) for k in names}
    losses = torch.zeros(3, dtype=torch.float64, device=device)
    with _flush_denormals():
        for t1_value, where in groups:
            grid = _Dictionary.build(esp, n, t1_value, refocusing, t2_range, b1_range, t2_step,
                                     b1_step, coarse, device, dtype)  # fmt: skip
            per_voxel = 4 * (grid.coarse_unit.shape[1] + 2 * window * n + 12 * n)
            chunk = max(1, max_bytes // per_voxel)
            index = torch.arange(n_voxels, device=device) if where is None else where
            for start in range(0, len(index), chunk):
                part = index[start : start + chunk]
                values, chunk_losses = _fit_chunk(voxels[:, part].to(dtype), grid, coarse)
                for name, value in values.items():
                    out[name][part] = value
                losses += chunk_losses

    ok = has_signal & torch.isfinite(out["rss"]) & (out["edge"] == 0) & (out["m0"] > 0)
    ok &= torch.isfinite(out["t2"]) & torch.isfinite(out["b1"])
    dof = n - 3
    if noise_sigma is None:
        noise_sigma = float((out["rss"][ok] / dof).median().sqrt()) if bool(ok.any()) else math.nan
    r_squared = 1 - out["rss"] / out["tss"].clamp_min(torch.finfo(dtype).tiny)

    def pack(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(mask_flat.numel(), dtype=dtype)
        clean = torch.where(ok & torch.isfinite(values), values, torch.zeros_like(values))
        full[mask_flat] = clean.cpu()
        return full.reshape(shape)

    valid = torch.zeros(mask_flat.numel(), dtype=torch.bool)
    valid[mask_flat] = ok.cpu()
    total = max(1, n_voxels * n)
    return FitResult(
        params={name: pack(out[name]) for name in ("m0", "t2", "b1")},
        valid=valid.reshape(shape),
        n_failed=int((~ok).sum()),
        residual_norm=pack(out["rss"].sqrt()),
        r_squared=pack(r_squared),
        sd={name: pack(out[f"sd_{name}"] * noise_sigma) for name in ("m0", "t2", "b1")},
        noise_sigma=noise_sigma,
        loss_history=[float(v) / total for v in losses],
        device=device,
        failures=count_failures(
            ok, {"not finite": ~finite, "no signal": ~has_signal, "at a bound": out["edge"] != 0}
        ),
    )

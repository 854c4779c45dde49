"""Voxel-wise fitting, the teaching path: dictionary matching for start values, then Adam.

Also the pieces every fit shares: :class:`FitResult`, goodness of fit and Cramér-Rao SDs,
:func:`default_device`, and the flushing of subnormal floats. The fast and exact solvers
(variable projection, Levenberg-Marquardt) live in :mod:`.solvers`; :func:`fit_varpro` and
:func:`fit_lm` are importable from here too.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import einops
import torch
from tqdm.auto import trange

from .models import SignalModel, mse
from .validation import (
    FAILURE_REASONS,
    check_data,
    check_mask,
    check_times,
    count_failures,
    voxel_status,
    warn_not_finite,
    working_dtype,
)

__all__ = [
    "FitResult",
    "default_device",
    "dictionary_match",
    "fit_adam",
    "fit_lm",
    "fit_varpro",
    "signal_mask",
    "thread_policy",
]

#: Working memory that dictionary matching may use per chunk (bytes).
DICTIONARY_CHUNK_BYTES = 256 * 2**20


def default_device() -> torch.device:
    """The GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Set to False to switch :func:`thread_policy` off (the benchmark measures both).
THREAD_POLICY = True


def idle_cores() -> int:
    """CPU cores that no other process keeps busy right now (at least 1).

    On Linux: the number of runnable tasks in ``/proc/loadavg`` (an instantaneous count of
    threads), less the runnable threads of this process (``/proc/self/task/*/stat``): torch's
    own worker threads spin for a while after each parallel operation, and counting them as
    foreign load gave one thread where two cores were idle. Elsewhere: the 1-minute load
    average less this thread (it includes this process's recent work, so it errs towards
    fewer threads).
    """
    cores = os.cpu_count() or 1
    try:
        running = int(_read("/proc/loadavg").split()[3].split(b"/")[0])
        running -= _own_runnable_threads()
    except (OSError, ValueError, IndexError):
        try:
            running = round(os.getloadavg()[0]) - 1
        except OSError:  # no load average on this platform
            running = 0
    return max(1, cores - max(0, running))


def _read(path: str) -> bytes:
    """The first 1 kB of a file, by plain system calls (the /proc files are short)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 1024)
    finally:
        os.close(fd)


def _own_runnable_threads() -> int:
    """Threads of this process that are runnable now (state R; Linux), the caller included.

    One short ``stat`` file per thread: about 15 microseconds each.
    """
    count = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = _read(f"/proc/self/task/{tid}/stat")
        except OSError:  # the thread has ended
            continue
        # the state follows the command name in parentheses, which may itself hold ")"
        end = stat.rfind(b")")
        count += stat[end + 2 : end + 3] == b"R"
    return max(1, count)


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    """Torch's CPU thread count set to ``count`` inside the block, then restored."""
    before = torch.get_num_threads()
    if count != before:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def thread_policy(device: torch.device, elements: int, small: int = 0) -> Iterator[int]:
    """Torch's CPU threads for a loop of element-wise operations on ``elements`` numbers.

    Torch splits an element-wise operation over all its threads from about 32k elements on.
    When another process keeps the cores busy, every split waits for a descheduled thread, and
    a loop of small operations runs 10-20 times slower than on one thread (2000 Adam steps:
    minutes instead of seconds). Inside this block torch uses one thread for tensors of fewer
    than ``small`` elements, else no more threads than there are idle cores; the thread count
    comes back afterwards. Yields the number of threads used.
    """
    wanted = torch.get_num_threads()
    if THREAD_POLICY and device.type == "cpu":
        wanted = 1 if elements < small else max(1, min(wanted, idle_cores()))
    with _threads(wanted):
        yield wanted


@contextlib.contextmanager
def _flush_denormals() -> Iterator[None]:
    """Treat subnormal floats as zero inside the block (CPU only), then restore the default.

    Background voxels drive ``exp(-TI/T1)`` and Adam's second moments into the subnormal range,
    where x86 arithmetic is about 50 times slower: 2000 Adam steps on 128x128 took minutes
    instead of seconds. Values that small are zero for any fit.
    """
    changed = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if changed:
            torch.set_flush_denormal(False)


def _flushing_denormals(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _flush_denormals():
            return fn(*args, **kwargs)

    return wrapper


def _check_data(data: torch.Tensor, name: str = "data") -> torch.Tensor:
    """The data, checked and in float32 at least (see :func:`.validation.check_data`)."""
    return check_data(data, name)


def signal_mask(data: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Voxels whose largest signal exceeds ``fraction`` of the image's 99th percentile.

    Voxels with NaN or inf at any time point are left out of the mask (with a warning that
    counts them); the percentile is taken over the others.

    Parameters
    ----------
    data
        Images of shape ``(n_times, ...)``.
    fraction
        Threshold relative to the 99th percentile of the per-voxel maximum.

    Returns
    -------
    torch.Tensor
        Boolean mask of shape ``(...)``.
    """
    data = check_data(data)
    finite, _ = voxel_status(data)
    warn_not_finite(finite, "signal_mask")
    if not bool(finite.any()):
        return finite
    peak = torch.where(finite, data.abs().amax(0), 0.0)
    return finite & (peak > fraction * _quantile(peak[finite].float(), 0.99))


def _quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear), also above its limit of 2**24 values."""
    if values.numel() <= 2**24:
        return torch.quantile(values, q)
    position = q * (values.numel() - 1)
    below, frac = int(position), position - int(position)
    low = values.kthvalue(below + 1).values
    high = values.kthvalue(min(below + 2, values.numel())).values
    return low + frac * (high - low)


@_flushing_denormals
def dictionary_match(
    data: torch.Tensor,
    model: SignalModel,
    name: str,
    grid: torch.Tensor,
    max_bytes: int = DICTIONARY_CHUNK_BYTES,
) -> dict[str, torch.Tensor]:
    """Start values by matching each voxel's curve to a dictionary of simulated curves.

    The dictionary holds ``model(m0=1, name=value)`` for every value of ``grid``. Curves and
    voxels are normalised to unit length, and each voxel takes the value whose curve has the
    largest dot product with its own. M0 follows from the maximum magnitude:
    ``max|data| / max|matched curve|``. Voxels are processed in chunks, so the extra memory
    stays below about ``max_bytes`` whatever the size of the volume.

    Voxels without signal (all zero) or with NaN or inf get 0 for both values (a warning
    counts the latter); a fit then counts them as failures. Half-precision data are matched in
    float32, and the maps are returned in float32.

    Parameters
    ----------
    data
        Measured signal, shape ``(n_times, ...)``.
    model
        Signal model taking ``m0`` and ``name`` as keyword arguments (see :mod:`.models`).
    name
        Name of the matched parameter, e.g. ``"t1"`` or ``"t2star"``.
    grid
        Candidate values, shape ``(k,)``, in the model's units (s).
    max_bytes
        Working-memory budget of one chunk.

    Returns
    -------
    dict
        ``{"m0": ..., name: ...}``, maps of shape ``(...)``.
    """
    data = check_data(data)
    finite, signal = voxel_status(data)
    warn_not_finite(finite, "dictionary_match")
    grid = check_times(grid, f"grid of {name}").to(dtype=data.dtype, device=data.device)
    if not bool((grid > 0).all()):
        raise ValueError(f"the grid of {name} must be > 0 s, got {grid.tolist()[:5]}")
    atoms = model(m0=torch.ones_like(grid), **{name: grid})  # (n_times, k)
    if atoms.shape[0] != data.shape[0]:
        raise ValueError(
            f"the model gives {atoms.shape[0]} time points but the data has {data.shape[0]}"
        )
    atoms_norm = atoms / atoms.norm(dim=0, keepdim=True).clamp_min(1e-12)
    atoms_peak = atoms.abs().amax(0).clamp_min(1e-12)

    voxels = einops.rearrange(data, "c ... -> c (...)")
    n_times, n_voxels = voxels.shape
    chunk = max(1, max_bytes // (4 * (grid.numel() + 2 * n_times)))
    value = torch.empty(n_voxels, dtype=data.dtype, device=data.device)
    m0 = torch.empty_like(value)
    for start in range(0, n_voxels, chunk):
        block = voxels[:, start : start + chunk]
        block_norm = block / block.norm(dim=0, keepdim=True).clamp_min(1e-12)
        similarity = einops.einsum(block_norm, atoms_norm, "c v, c k -> v k")
        best = similarity.argmax(dim=1)
        value[start : start + chunk] = grid[best]
        m0[start : start + chunk] = block.abs().amax(0) / atoms_peak[best]
    shape = data.shape[1:]
    usable = signal.flatten()
    value, m0 = torch.where(usable, value, 0.0), torch.where(usable, m0, 0.0)
    return {"m0": m0.reshape(shape), name: value.reshape(shape)}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class FitResult:
    r"""Outcome of a voxel-wise fit.

    Attributes
    ----------
    params
        Fitted maps by name (e.g. ``"m0"``, ``"t1"`` in s), shape ``(...)``, on the CPU.
        Voxels that were not fitted or failed hold 0.
    valid
        Boolean map: True where the fit ran and gave finite values inside the bounds.
    n_failed
        Number of fitted voxels that failed (masked out, never NaN).
    residual_norm
        :math:`\|data - model\|_2` per voxel, in the units of the data.
    r_squared
        Coefficient of determination per voxel, :math:`1 - RSS / \sum (y - \bar y)^2`.
    sd
        Cramér-Rao standard deviation per parameter (same units), from the Jacobian at the
        solution and the noise level: :math:`\sigma \sqrt{[(J^T J)^{-1}]_{ii}}`.
    noise_sigma
        The noise standard deviation used for ``sd`` (given, or estimated from the residuals).
    loss_history
        Mean squared error over the fitted voxels after each iteration (data units squared).
    device
        Where the fit ran.
    failures
        Failed voxels by reason (keys of :data:`.validation.FAILURE_REASONS`: ``"not
        finite"``, ``"no signal"``, ``"at a bound"``, ``"fit failed"``); each failed voxel
        counts once, so the counts sum to ``n_failed``. :meth:`summary` says it in words.
    """

    params: dict[str, torch.Tensor]
    valid: torch.Tensor
    n_failed: int
    residual_norm: torch.Tensor
    r_squared: torch.Tensor
    sd: dict[str, torch.Tensor]
    noise_sigma: float
    loss_history: list[float]
    device: torch.device
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def n_fitted(self) -> int:
        """Number of voxels the fit was asked for: the valid ones plus the failed ones."""
        return int(self.valid.sum()) + self.n_failed

    def summary(self) -> str:
        """One line: how many voxels were fitted, how many are valid, and why the others failed.

        Examples
        --------
        ``"4096 voxels fitted: 4001 valid, 95 failed (90 without signal (all zero), 5 with NaN
        or inf in the data)"``
        """
        line = f"{self.n_fitted} voxels fitted: {int(self.valid.sum())} valid"
        if not self.n_failed:
            return line + ", none failed"
        reasons = ", ".join(
            f"{n} {FAILURE_REASONS.get(reason, reason)}" for reason, n in self.failures.items()
        )
        return f"{line}, {self.n_failed} failed" + (f" ({reasons})" if reasons else "")


def _cofactors(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adjugate and determinant of a batch of 1x1, 2x2 or 3x3 matrices ``(V, q, q)``.

    Written out element by element: for the tiny systems of a voxel-wise fit this is many
    times faster than a batched LAPACK call per voxel.
    """
    q = a.shape[-1]
    if q == 1:
        return torch.ones_like(a), a[:, 0, 0]
    if q == 2:
        adj = torch.stack(
            [
                torch.stack([a[:, 1, 1], -a[:, 0, 1]], -1),
                torch.stack([-a[:, 1, 0], a[:, 0, 0]], -1),
            ],
            -2,
        )
        return adj, a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    rows = []
    for i in range(3):
        row = []
        for j in range(3):
            # cofactor C[j, i] (transposed: the adjugate), from the 2x2 minor without row j, col i
            r0, r1 = [k for k in range(3) if k != j]
            c0, c1 = [k for k in range(3) if k != i]
            minor = a[:, r0, c0] * a[:, r1, c1] - a[:, r0, c1] * a[:, r1, c0]
            row.append(minor if (i + j) % 2 == 0 else -minor)
        rows.append(torch.stack(row, -1))
    adj = torch.stack(rows, -2)
    return adj, (a[:, 0, :] * adj[:, :, 0]).sum(-1)


def _solve(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve ``a x = b`` for a batch ``a (V, q, q)``, ``b (V, q)``; closed form for q <= 3."""
    if a.shape[-1] > 3:
        return torch.linalg.solve(a, b[..., None])[..., 0]
    adj, det = _cofactors(a)
    return (adj * b.unsqueeze(1)).sum(-1) / det[:, None]


def _inverse_diagonal(a: torch.Tensor) -> torch.Tensor:
    """The diagonal of ``a⁻¹`` for a batch ``(V, q, q)``; closed form for q <= 3."""
    if a.shape[-1] > 3:
        return torch.linalg.inv(a).diagonal(dim1=-2, dim2=-1)
    adj, det = _cofactors(a)
    return adj.diagonal(dim1=-2, dim2=-1) / det[:, None]


def _goodness(
    residual: torch.Tensor, columns: list[torch.Tensor], data: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RSS, R² and the Fisher matrices JᵀJ ``(V, q, q)`` per voxel.

    ``residual``, ``data`` and each of the ``q`` Jacobian ``columns`` are ``(n, V)``: the sums
    run over the first axis, along contiguous memory.
    """
    rss = (residual**2).sum(0)
    tss = ((data - data.mean(0)) ** 2).sum(0)
    r_squared = 1 - rss / tss.clamp_min(torch.finfo(data.dtype).tiny)
    return rss, r_squared, _gram(columns).permute(2, 0, 1)


def _gram(columns: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The dot products over the first axis of ``q`` columns ``(n, ...)``: ``(q, q, ...)``.

    Each pair once (i <= j), the other triangle by symmetry: sums of products, as batched
    2x2 or 3x3 matrix products are slow (on a GPU too).
    """
    q = len(columns)
    dots = {(i, j): (columns[i] * columns[j]).sum(0) for i in range(q) for j in range(i, q)}
    return torch.stack(
        [torch.stack([dots[min(i, j), max(i, j)] for j in range(q)]) for i in range(q)]
    )


def _last_information(fisher: torch.Tensor) -> torch.Tensor:
    """The information on the last parameter with the others fitted too: ``1 / [F⁻¹]_qq``.

    The Schur complement of the other parameters in ``fisher (V, q, q)``, without a ridge;
    NaN where their own block is singular.
    """
    if fisher.shape[-1] == 1:
        return fisher[:, 0, 0]
    if fisher.shape[-1] > 3:
        return 1 / torch.linalg.pinv(fisher)[:, -1, -1]
    adj, det = _cofactors(fisher)
    last = adj[:, -1, -1]
    return torch.where(last != 0, det / last, torch.nan)


def _ridged_inverse_diagonal(fisher: torch.Tensor) -> torch.Tensor:
    """The diagonal of the inverse of Fisher matrices ``(V, q, q)``, with a 1e-12 ridge."""
    eye = torch.eye(fisher.shape[-1], dtype=fisher.dtype, device=fisher.device)
    ridge = 1e-12 * fisher.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-30)
    return _inverse_diagonal(fisher + ridge[:, None, None] * eye)


def _estimate_sigma(rss: torch.Tensor, ok: torch.Tensor, dof: int) -> float:
    """Noise std from the median residual variance of the valid voxels."""
    if dof <= 0 or not bool(ok.any()):
        return float("nan")
    return float((rss[ok] / dof).median().sqrt())


def _pack(
    shape: torch.Size,
    mask_flat: torch.Tensor,
    ok: torch.Tensor,
    values: dict,
    dtype: torch.dtype,
) -> dict:
    """Scatter per-voxel values back into maps of ``shape``; 0 where not ok or not fitted.

    The maps stay on the fit's device (:func:`_to_host` moves them, all at once).
    """
    maps = {}
    for name, value in values.items():
        clean = torch.where(ok & torch.isfinite(value), value, torch.zeros_like(value)).to(dtype)
        if clean.numel() == mask_flat.numel():  # every voxel fitted: nothing to scatter
            maps[name] = clean.reshape(shape)
            continue
        full = torch.zeros(mask_flat.numel(), dtype=dtype, device=value.device)
        full[mask_flat.to(value.device)] = clean
        maps[name] = full.reshape(shape)
    return maps


def _to_host(maps: dict) -> dict:
    """The maps on the CPU; from a GPU in one copy into page-locked memory.

    A copy per map into ordinary memory ran at about 2 GB/s on an H100 (150 ms for the maps of
    a 256x256x128 fit).
    """
    first = next(iter(maps.values()), None)
    if first is None or first.device.type != "cuda":
        return {name: value.cpu() for name, value in maps.items()}
    stacked = torch.stack([value.reshape(-1) for value in maps.values()])
    host = torch.empty(stacked.shape, dtype=stacked.dtype, device="cpu", pin_memory=True)
    host.copy_(stacked, non_blocking=True)
    torch.cuda.current_stream(first.device).synchronize()
    return {name: host[i].view(value.shape) for i, (name, value) in enumerate(maps.items())}


def _result(
    shape, mask_flat, ok, params, residual_norm, r_squared, sd_unit, sigma, history, device, dtype,
    reasons=None,
) -> FitResult:  # fmt: skip
    sd = {k: v * sigma for k, v in sd_unit.items()}
    values = {
        **{("param", k): v for k, v in params.items()},
        **{("sd", k): v for k, v in sd.items()},
        ("fit", "r"): residual_norm,
        ("fit", "r2"): r_squared,
        ("fit", "valid"): torch.ones_like(residual_norm),  # 1 where ok, in the same copy
    }
    maps = _to_host(_pack(shape, mask_flat, ok, values, dtype))
    failures = count_failures(ok, reasons or {})
    return FitResult(
        params={k: v for (kind, k), v in maps.items() if kind == "param"},
        valid=maps["fit", "valid"] != 0,
        n_failed=sum(failures.values()),
        residual_norm=maps["fit", "r"],
        r_squared=maps["fit", "r2"],
        sd={k: v for (kind, k), v in maps.items() if kind == "sd"},
        noise_sigma=sigma,
        loss_history=history,
        device=device,
        failures=failures,
    )


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (one pass per parameter and step) where torch has one."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or dtype
        return torch.optim.Adam(params, lr=lr)


@_flushing_denormals
def fit_adam(
    model: SignalModel,
    data: torch.Tensor,
    init: dict[str, torch.Tensor],
    n_iter: int = 2000,
    lr: float = 0.01,
    mask: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    log_params: bool = True,
    normalise: bool = True,
    noise_sigma: float | None = None,
    callback: Callable[[int, dict[str, torch.Tensor]], None] | None = None,
) -> FitResult:
    """Fit all voxels at once with Adam, minimising the mean squared error.

    Adam moves every parameter by about ``lr`` per step, in the parameter's own units. With
    ``log_params`` (the default) it works on the logarithms of the (positive) parameters, so a
    step changes a T1 of 20 ms and an M0 of 2000 by the same *relative* amount. With
    ``normalise`` the data are divided by their maximum during the fit, so the learning rate
    does not depend on the scanner's intensity scale. Turn both off to see a plain Adam fit
    fail on parameters of very different size.

    Parameters
    ----------
    model
        Signal model taking the names of ``init`` as keyword arguments.
    data
        Measured signal, shape ``(n_times, ...)``.
    init
        Start values by name, maps of shape ``(...)``, all positive (e.g. from
        :func:`dictionary_match`).
    n_iter
        Number of Adam iterations.
    lr
        Learning rate (relative step size of the parameters).
    mask
        Boolean map ``(...)`` of the voxels to fit; None fits all.
    device
        "cpu", "cuda" or a torch.device; None picks the GPU when present.
    progress
        Show a tqdm progress bar.
    log_params
        Optimise the logarithms of the parameters (True) or the parameters themselves.
    normalise
        Divide the data (and M0) by the data's maximum during the fit.
    noise_sigma
        Noise standard deviation of the data, for the Cramér-Rao ``sd``; None estimates it
        from the residuals.
    callback
        Called as ``callback(iteration, params)`` after every step, with the current
        parameters of the fitted voxels (flat, in the units of ``init``).

    Returns
    -------
    FitResult
        Maps, validity mask, failure count, goodness of fit and loss history. Voxels with NaN
        or inf data, or without signal (all zero), fail and are counted (``failures``).
        Half-precision data are fitted in float32, and the maps are float32.
    """
    data = check_data(data)
    shape = data.shape[1:]
    if "m0" not in init:
        raise ValueError(f"init needs a start value for 'm0', got {sorted(init)}")
    for key, value in init.items():
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"start value {key!r} has shape {tuple(getattr(value, 'shape', ()))} but the "
                f"data has {tuple(data.shape)}: expected maps of shape {tuple(shape)}"
            )
    init = {
        k: v.to(working_dtype(v.dtype)) if v.is_floating_point() else v for k, v in init.items()
    }
    mask = torch.ones(shape, dtype=torch.bool) if mask is None else mask
    device = torch.device(device) if device is not None else default_device()
    mask_flat = check_mask(mask, shape).to(data.device)

    voxels = einops.rearrange(data, "c ... -> c (...)")[:, mask_flat].to(device)
    finite, has_signal = voxel_status(voxels)  # voxels with NaN/inf data or no signal fail
    voxels = torch.where(finite, voxels, 0.0)
    scale = voxels.abs().max().clamp_min(torch.finfo(data.dtype).tiny)
    if not normalise:
        scale = torch.ones_like(scale)
    target = voxels / scale
    starts = {k: v.flatten().to(data.device)[mask_flat].to(device) for k, v in init.items()}
    starts["m0"] = starts["m0"] / scale
    to_param, from_param = (torch.exp, torch.log) if log_params else (_identity, _identity)
    theta = {
        k: from_param(v.clamp_min(1e-12)).clone().requires_grad_(True) for k, v in starts.items()
    }
    optimizer = _adam(list(theta.values()), lr)
    n_voxels = max(1, target.shape[1])
    # The loss of a step is the sum of the voxels' own MSEs (the mean over all numbers times the
    # number of voxels): each voxel's gradient is that of its own fit, whatever the number of
    # voxels. It is kept on the device, one number per step, and read once at the end.
    losses = torch.empty(n_iter, dtype=target.dtype, device=device)
    bar = trange(n_iter, desc="Adam fit", disable=not progress, leave=False)
    with thread_policy(device, target.numel()):
        for step in bar:
            optimizer.zero_grad()
            prediction = model(**{k: to_param(v) for k, v in theta.items()})
            loss = mse(prediction, target) * n_voxels
            loss.backward()
            optimizer.step()
            losses[step] = loss.detach()
            if callback is not None:
                with torch.no_grad():
                    current = {k: to_param(v) for k, v in theta.items()}
                    current["m0"] = current["m0"] * scale
                    callback(step, current)
            if progress and step % 100 == 0:
                bar.set_postfix(loss=f"{float(losses[step] * scale**2 / n_voxels):.4g}")
    history = (losses * (scale**2 / n_voxels)).tolist()

    with torch.no_grad():
        fitted = {k: to_param(v) for k, v in theta.items()}
        names = list(fitted)
        primals = tuple(fitted[k] for k in names)

        def signal(*values: torch.Tensor) -> torch.Tensor:
            return model(**dict(zip(names, values, strict=True)))

        prediction = signal(*primals)
        # Voxels are independent, so one forward-mode pass per parameter gives the Jacobian.
        columns = [
            torch.func.jvp(signal, primals, tuple(
                torch.ones_like(p) if i == j else torch.zeros_like(p) for j, p in enumerate(primals)
            ))[1]
            for i in range(len(names))
        ]  # fmt: skip
        rss, r_squared, fisher = _goodness(target - prediction, columns, target)
        inverse_diag = _ridged_inverse_diagonal(fisher)
        fitted["m0"] = fitted["m0"] * scale
        ok = has_signal & torch.isfinite(rss)
        for value in fitted.values():
            ok &= torch.isfinite(value) & (value > 0)
        dof = data.shape[0] - len(names)
        sigma_fit = noise_sigma / float(scale) if noise_sigma is not None else None
        if sigma_fit is None:
            sigma_fit = _estimate_sigma(rss, ok, dof)
        sd_unit = {k: inverse_diag[:, i].clamp_min(0).sqrt() for i, k in enumerate(names)}
        sd_unit["m0"] = sd_unit["m0"] * scale
        return _result(
            shape, mask_flat, ok, fitted, rss.sqrt() * scale, r_squared, sd_unit, sigma_fit,
            history, device, data.dtype, {"not finite": ~finite, "no signal": ~has_signal},
        )  # fmt: skip


# The exact solvers live in their own module; they build on the pieces above, so they are
# imported last (``qmri_helpers/__init__`` imports this module first).
from .solvers import fit_lm, fit_varpro  # noqa: E402
from .t2_fitting import fit_epg as fit_epg  # noqa: E402  (EPG T2/B1 fit: own module, same FitResult)

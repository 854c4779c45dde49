"""Voxel-wise fitting: dictionary matching for start values, then Adam on all voxels at once."""

from __future__ import annotations

from dataclasses import dataclass

import einops
import torch
from tqdm.auto import trange

from .models import SignalModel, mse

__all__ = ["FitResult", "default_device", "dictionary_match", "fit_adam", "signal_mask"]

#: Working memory that dictionary matching may use per chunk (bytes).
DICTIONARY_CHUNK_BYTES = 256 * 2**20


def default_device() -> torch.device:
    """The GPU when one is present, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_data(data: torch.Tensor, name: str = "data") -> None:
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(data).__name__}")
    if data.ndim < 2:
        raise ValueError(f"{name} must have shape (n_times, ...voxels), got {tuple(data.shape)}")


def signal_mask(data: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Voxels whose largest signal exceeds ``fraction`` of the image's 99th percentile.

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
    _check_data(data)
    peak = data.abs().amax(0)
    return peak > fraction * torch.quantile(peak.flatten().float(), 0.99)


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
    _check_data(data)
    grid = torch.as_tensor(grid, dtype=data.dtype, device=data.device).flatten()
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
    return {"m0": m0.reshape(shape), name: value.reshape(shape)}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class FitResult:
    """Outcome of a voxel-wise fit.

    Attributes
    ----------
    params
        Fitted maps by name (e.g. ``"m0"``, ``"t1"`` in s), shape ``(...)``, on the CPU.
        Voxels that were not fitted or failed hold 0.
    valid
        Boolean map: True where the fit ran and gave finite values.
    n_failed
        Number of fitted voxels that gave non-finite values (masked out, never NaN).
    rmse
        Root-mean-square residual per voxel, in the units of the data; 0 where not valid.
    loss_history
        Mean squared error over all fitted voxels after each iteration (data units squared).
    device
        Where the fit ran.
    """

    params: dict[str, torch.Tensor]
    valid: torch.Tensor
    n_failed: int
    rmse: torch.Tensor
    loss_history: list[float]
    device: torch.device


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

    Returns
    -------
    FitResult
        Maps, validity mask, failure count, residuals and loss history.
    """
    _check_data(data)
    shape = data.shape[1:]
    if "m0" not in init:
        raise ValueError(f"init needs a start value for 'm0', got {sorted(init)}")
    for key, value in init.items():
        if tuple(value.shape) != tuple(shape):
            raise ValueError(
                f"start value {key!r} has shape {tuple(value.shape)} but the data has "
                f"{tuple(data.shape)}: expected maps of shape {tuple(shape)}"
            )
    if mask is None:
        mask = torch.ones(shape, dtype=torch.bool)
    elif tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    device = torch.device(device) if device is not None else default_device()
    mask_flat = mask.flatten().to(data.device)

    voxels = einops.rearrange(data, "c ... -> c (...)")[:, mask_flat].to(device)
    finite = torch.isfinite(voxels).all(0)  # voxels with NaN/inf data fail, and only they
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
    optimizer = torch.optim.Adam(list(theta.values()), lr=lr)
    history = []
    bar = trange(n_iter, desc="Adam fit", disable=not progress, leave=False)
    for step in bar:
        optimizer.zero_grad()
        prediction = model(**{k: to_param(v) for k, v in theta.items()})
        per_voxel = mse(prediction, target, dim=0)
        per_voxel.sum().backward()
        optimizer.step()
        history.append(float(per_voxel.detach().mean() * scale**2))
        if step % 100 == 0:
            bar.set_postfix(loss=f"{history[-1]:.4g}")

    with torch.no_grad():
        fitted = {k: to_param(v) for k, v in theta.items()}
        residual = mse(model(**fitted), target, dim=0).sqrt() * scale
        fitted["m0"] = fitted["m0"] * scale
        ok = finite & torch.isfinite(residual)
        for value in fitted.values():
            ok &= torch.isfinite(value) & (value > 0)

    def to_map(values: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(mask_flat.numel(), dtype=data.dtype)
        full[mask_flat.cpu()] = torch.where(ok, values, 0.0).cpu().to(data.dtype)
        return full.reshape(shape)

    valid = torch.zeros(mask_flat.numel(), dtype=torch.bool)
    valid[mask_flat.cpu()] = ok.cpu()
    return FitResult(
        params={k: to_map(v) for k, v in fitted.items()},
        valid=valid.reshape(shape),
        n_failed=int((~ok).sum()),
        rmse=to_map(residual),
        loss_history=history,
        device=device,
    )

"""Checks of what the fitters and models are given: refuse clearly, or count what fails.

The package never gives a confident wrong answer. Before a fit these functions check the
inputs and either raise an error that says what is wrong, or mark the voxels that cannot be
fitted so that the fit counts them as failures:

- times (TI, TE, TR) must be finite, non-negative seconds (:func:`check_times`); times that
  look like milliseconds are refused;
- times out of order are sorted together with the data (:func:`time_order`,
  :func:`sort_model_times`);
- data must be a non-empty floating-point tensor; float16 and bfloat16 are computed in float32
  (:func:`check_data`);
- a mask must be boolean and select at least one voxel (:func:`check_mask`);
- voxels with NaN or inf, voxels without any signal (:func:`voxel_status`) and voxels whose
  time constant sits on a bound (:func:`at_bound`) are failures; every failure is counted by
  its reason (:func:`count_failures`), which :meth:`.fitting.FitResult.summary` reports.

A model's small tensors (times, a sort order) follow the data to its device once
(:func:`device_copy`), so that a fit on a GPU does not wait on a copy in every iteration.
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .models import SeparableModel

__all__ = [
    "MAX_SECONDS",
    "FAILURE_REASONS",
    "at_bound",
    "check_data",
    "check_mask",
    "check_times",
    "count_failures",
    "device_copy",
    "sort_model_times",
    "time_order",
    "voxel_status",
    "warn_not_finite",
    "working_dtype",
]

#: The largest value of each kind of time that can still be seconds. A larger one is taken to
#: be in milliseconds and refused: no inversion or repetition time is 100 s long, no echo 10 s.
MAX_SECONDS: dict[str, float] = {"TI": 100.0, "TR": 100.0, "TE": 10.0}

#: Why a fitted voxel failed, and how :meth:`.fitting.FitResult.summary` says it. A voxel counts
#: for the first reason that applies, in this order.
FAILURE_REASONS: dict[str, str] = {
    "not finite": "with NaN or inf in the data",
    "no signal": "without signal (all zero)",
    "at a bound": "with the time constant on a bound of the fit",
    "not determined": "whose data do not determine the time constant (the curve is flat in it)",
    "fit failed": "with non-finite or non-positive fitted values",
}


def check_times(
    times: object, name: str = "TI", max_seconds: float | None = None, unknown: str = ""
) -> torch.Tensor:
    """Check a vector of inversion, echo or repetition times, in seconds.

    Parameters
    ----------
    times
        The times, anything :func:`torch.as_tensor` takes, shape ``(n,)`` (a scalar TR too).
    name
        What they are, ``"TI"``, ``"TE"`` or ``"TR"``: used in the messages and to pick the
        largest plausible value from :data:`MAX_SECONDS`.
    max_seconds
        The largest time that can be seconds; None takes ``MAX_SECONDS[name]`` (100 s if
        ``name`` is not listed).
    unknown
        What to tell the user when the times are unknown (None, NaN or inf), e.g. which model
        to fit instead.

    Returns
    -------
    torch.Tensor
        The times as a floating-point tensor (float32 at least), unchanged in value.

    Raises
    ------
    ValueError
        If the times are unknown (None, NaN or inf), negative, empty, not 1-D, or so large that
        they must be milliseconds.
    """
    advice = unknown or f"a model that needs {name} cannot be built"
    if times is None:
        raise ValueError(f"{name} is unknown (None): {advice}")
    try:
        t = torch.as_tensor(times)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{name} must be numbers in seconds, got {times!r}") from error
    if t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name} must be real numbers in seconds, got {t.dtype}")
    t = t.to(working_dtype(t.dtype) if t.is_floating_point() else torch.float32)
    if t.ndim > 1:
        raise ValueError(f"{name} must be a vector of shape (n,), got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: a fit needs at least one time point")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} is unknown (NaN) or not finite ({_listing(t)} s): {advice}")
    if bool((t < 0).any()):
        raise ValueError(f"{name} holds negative values ({_listing(t)} s): times are >= 0")
    limit = max_seconds if max_seconds is not None else MAX_SECONDS.get(name, 100.0)
    largest = float(t.max())
    if largest > limit:
        raise ValueError(
            f"{name} looks like milliseconds: the largest is {largest:g}, but qmri_helpers "
            f"works in seconds (no {name} is longer than {limit:g} s). Divide by 1000."
        )
    return t


def _listing(t: torch.Tensor) -> str:
    values = [f"{v:g}" for v in t.flatten().tolist()[:12]]
    return ", ".join(values) + (", ..." if t.numel() > 12 else "")


def time_order(times: torch.Tensor) -> torch.Tensor | None:
    """The permutation that sorts ``times`` in increasing order, or None if they are sorted.

    Parameters
    ----------
    times
        Shape ``(n,)``, in s.

    Returns
    -------
    torch.Tensor or None
        Indices of shape ``(n,)`` (a stable sort: equal times keep their order), or None.
    """
    t = torch.as_tensor(times).flatten()
    if t.numel() < 2 or bool((t[1:] >= t[:-1]).all()):
        return None
    return torch.sort(t, stable=True).indices


def sort_model_times(
    model: SeparableModel, data: torch.Tensor
) -> tuple[SeparableModel, torch.Tensor]:
    """The model and the data with their time points in increasing order.

    Fits that restore the polarity of magnitude IR data look for the null along the time axis,
    so they need sorted times. Sorting the times together with the data changes nothing else:
    the least-squares fit of a voxel does not depend on the order of its points.

    Parameters
    ----------
    model
        A :class:`~qmri_helpers.models.SeparableModel`; its ``times`` have shape ``(n,)``.
    data
        Signal of shape ``(n, ...)``, in the order of ``model.times``.

    Returns
    -------
    tuple
        ``(model, data)``, unchanged (not copied) if the times are sorted already.
    """
    order = time_order(model.times)
    if order is None:
        return model, data
    basis_fn = model.basis_fn

    def sorted_basis(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi, d_phi = basis_fn(tau)
        where = device_copy(order, phi.device)
        return phi[where], d_phi[where]

    sorted_model = dataclasses.replace(model, times=model.times[order], basis_fn=sorted_basis)
    return sorted_model, data[device_copy(order, data.device)]


#: Copies of small tensors (times, orders) on other devices or in other dtypes, made once:
#: ``id(t) -> (weak reference to t, {(device, dtype, version): copy})``.
_COPIES: dict[int, tuple[weakref.ref, dict]] = {}


def device_copy(
    t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``t`` on ``device`` (in ``dtype``), copied once and kept while ``t`` lives and is unchanged.

    For the small tensors a model holds (times, a sort order): on a GPU each copy from the host
    would wait for all the work queued before it (a device synchronisation), and the solvers
    ask for them in every iteration. A copy made after ``t`` was changed in place is made anew.
    """
    dtype = dtype or t.dtype
    if t.device == device and t.dtype == dtype:
        return t
    key = id(t)
    entry = _COPIES.get(key)
    if entry is None or entry[0]() is not t:
        entry = (weakref.ref(t, lambda _, key=key: _COPIES.pop(key, None)), {})
        _COPIES[key] = entry
    copies = entry[1]
    wanted = (device, dtype, t._version)
    if wanted not in copies:
        for old in [k for k in copies if k[2] != t._version]:  # copies of t before a change
            del copies[old]
        copies[wanted] = t.to(device=device, dtype=dtype)
    return copies[wanted]


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision to compute in: ``dtype``, but float32 at least (float16, bfloat16 promoted).

    Parameters
    ----------
    dtype
        A floating-point dtype.
    """
    return torch.promote_types(dtype, torch.float32)


def check_data(data: object, name: str = "data") -> torch.Tensor:
    """Check the signal given to a fitter and return it in the precision to compute in.

    Parameters
    ----------
    data
        Signal of shape ``(n_times, ...voxels)``, a floating-point :class:`torch.Tensor`.
    name
        The argument's name, for the messages.

    Returns
    -------
    torch.Tensor
        ``data``, in float32 if it was float16 or bfloat16 (half precision cannot resolve a
        T1 to better than a few %), else unchanged and not copied.

    Raises
    ------
    TypeError
        If ``data`` is not a floating-point tensor.
    ValueError
        If it has no voxel dimension, no time points or no voxels.
    """
    if not isinstance(data, torch.Tensor) or not data.is_floating_point():
        kind = data.dtype if isinstance(data, torch.Tensor) else type(data).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    if data.ndim < 2:
        raise ValueError(
            f"{name} must have shape (n_times, ...voxels), got {tuple(data.shape)}; "
            f"for one voxel use shape (n_times, 1)"
        )
    if data.numel() == 0:
        what = "time points" if data.shape[0] == 0 else "voxels"
        raise ValueError(f"{name} is empty: shape {tuple(data.shape)} has no {what}")
    return data.to(working_dtype(data.dtype))


def check_mask(mask: object, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Check a mask of the voxels to fit.

    Parameters
    ----------
    mask
        Boolean tensor of shape ``shape`` (the data's shape without its time axis).
    shape
        The voxel shape of the data.

    Returns
    -------
    torch.Tensor
        The mask, boolean, flattened to shape ``(V,)``.

    Raises
    ------
    ValueError
        If its shape differs, it is not boolean, or it selects no voxel (nothing to fit).
    """
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        kind = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a boolean torch.Tensor, got {kind}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if not bool(mask.any()):
        raise ValueError("the mask selects no voxel (all False): there is nothing to fit")
    return mask.flatten()


def voxel_status(voxels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which voxels can be fitted: finite data, and some signal.

    Parameters
    ----------
    voxels
        Signal of shape ``(n_times, ...)``.

    Returns
    -------
    finite, signal
        Boolean maps of shape ``(...)``: ``finite`` where no time point is NaN or inf,
        ``signal`` where the voxel is finite and not zero at every time point. A voxel without
        signal has no time constant; a fit would return an arbitrary one with R² = 1.
    """
    # One reduction gives both: the largest magnitude is NaN or inf exactly where a time point
    # is, and 0 exactly where all are (about 3 times faster than isfinite().all() and any()).
    peak = voxels.abs().amax(0)
    finite = torch.isfinite(peak)
    return finite, finite & (peak > 0)


def at_bound(tau: torch.Tensor, bounds: tuple[float, float], rtol: float = 1e-6) -> torch.Tensor:
    """Where a time constant sits on (or beyond) a bound of its model.

    Parameters
    ----------
    tau
        Fitted time constants in s, any shape.
    bounds
        ``(lo, hi)`` in s, e.g. ``model.bounds``.
    rtol
        A value within this relative distance of a bound counts as on it.

    Returns
    -------
    torch.Tensor
        Boolean, the shape of ``tau``. The data did not determine such a value: it is a failure.
    """
    lo, hi = bounds
    return ~((tau > lo * (1 + rtol)) & (tau < hi * (1 - rtol)))


def count_failures(ok: torch.Tensor, reasons: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Count the failed voxels by reason; each voxel counts once, for its first reason.

    Parameters
    ----------
    ok
        Boolean, shape ``(V,)``: the fitted voxels that succeeded.
    reasons
        Boolean maps of shape ``(V,)`` by reason (keys of :data:`FAILURE_REASONS`), in order;
        failed voxels that none of them marks count as ``"fit failed"``.

    Returns
    -------
    dict
        ``{reason: count}`` for every reason with a count above 0; the counts sum to the
        number of failed voxels.
    """
    left = ~ok
    names, hits = [], []
    for reason, where in reasons.items():
        hit = left & where.to(left.device)
        names.append(reason)
        hits.append(hit.sum())
        left = left & ~hit
    names.append("fit failed")
    hits.append(left.sum())
    counts: dict[str, int] = {}
    for reason, n in zip(names, torch.stack(hits).tolist(), strict=True):  # one device sync
        counts[reason] = counts.get(reason, 0) + n
    return {reason: n for reason, n in counts.items() if n > 0}


def warn_not_finite(finite: torch.Tensor, where: str) -> None:
    """Warn once that voxels with NaN or inf were left out (``finite``: boolean map)."""
    n_bad = int((~finite).sum())
    if n_bad:
        warnings.warn(
            f"{where}: {n_bad} of {finite.numel()} voxels hold NaN or inf and are left out",
            RuntimeWarning,
            stacklevel=3,
        )

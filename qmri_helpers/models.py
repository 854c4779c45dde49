"""Signal models and losses as small, composable torch callables.

A model factory takes the sequence timing and returns a function of the tissue parameters,
so that a fit reads like the physics: ``mse(model(m0=m0, t1=t1), data)``.
Times are in seconds. Parameter maps of shape ``(...)`` give signals of shape
``(n_times, ...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = [
    "ir_signal",
    "inversion_recovery",
    "mono_exp_signal",
    "mono_exponential",
    "mse",
]

SignalModel = Callable[..., torch.Tensor]


def _times(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape times ``(n,)`` to ``(n, 1, ..., 1)`` to broadcast against ``like``."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * like.ndim)


def ir_signal(
    m0: torch.Tensor, t1: torch.Tensor, ti: torch.Tensor, magnitude: bool = True
) -> torch.Tensor:
    r"""Inversion-recovery signal with full recovery, :math:`|M_0 (1 - 2 e^{-TI/T_1})|`.

    Parameters
    ----------
    m0
        Equilibrium magnetisation (a.u.), shape ``(...)``.
    t1
        Longitudinal relaxation time in s, shape ``(...)``.
    ti
        Inversion times in s, shape ``(n,)``.
    magnitude
        Return the magnitude (True, for magnitude DICOMs) or the signed signal.

    Returns
    -------
    torch.Tensor
        Signal of shape ``(n, ...)``.
    """
    ti = _times(ti, t1)
    signal = m0 * (1 - 2 * torch.exp(-ti / t1))
    return signal.abs() if magnitude else signal


def inversion_recovery(ti: torch.Tensor, magnitude: bool = True) -> SignalModel:
    """Return the IR model for the inversion times ``ti`` (s): ``model(m0=..., t1=...)``."""

    def model(m0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        return ir_signal(m0, t1, ti, magnitude)

    return model


def mono_exp_signal(m0: torch.Tensor, t2star: torch.Tensor, te: torch.Tensor) -> torch.Tensor:
    r"""Mono-exponential decay, :math:`M_0 e^{-TE/T_2^*}`.

    Parameters
    ----------
    m0
        Signal at TE = 0 (a.u.), shape ``(...)``.
    t2star
        Decay time in s, shape ``(...)``.
    te
        Echo times in s, shape ``(n,)``.

    Returns
    -------
    torch.Tensor
        Signal of shape ``(n, ...)``.
    """
    return m0 * torch.exp(-_times(te, t2star) / t2star)


def mono_exponential(te: torch.Tensor) -> SignalModel:
    """Return the decay model for the echo times ``te`` (s): ``model(m0=..., t2star=...)``."""

    def model(m0: torch.Tensor, t2star: torch.Tensor) -> torch.Tensor:
        return mono_exp_signal(m0, t2star, te)

    return model


def mse(prediction: torch.Tensor, data: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean squared error between a model prediction and the data.

    Parameters
    ----------
    prediction, data
        Tensors of the same shape, e.g. ``(n_times, ...)``.
    dim
        Average over this dimension only (e.g. ``0`` for a per-voxel loss ``(...)``);
        None averages over everything and returns a scalar.
    """
    if prediction.shape != data.shape:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and data {tuple(data.shape)} differ"
        )
    squared = (prediction - data) ** 2
    return squared.mean() if dim is None else squared.mean(dim)

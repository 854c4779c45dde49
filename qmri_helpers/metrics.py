"""Compare fitted maps with a ground truth: relative error maps and per-vial tables."""

from __future__ import annotations

import numpy as np
import torch

from .phantom import Phantom

__all__ = ["relative_error", "vial_table"]


def relative_error(estimate: torch.Tensor, truth: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``(estimate - truth) / truth`` where the truth is non-zero, else 0 (same shape)."""
    truth = torch.as_tensor(truth, dtype=estimate.dtype)
    safe = torch.where(truth != 0, truth, torch.ones_like(truth))
    return torch.where(truth != 0, (estimate - truth) / safe, torch.zeros_like(truth))


def vial_table(
    estimate: torch.Tensor, phantom: Phantom, parameter: str = "t1"
) -> list[dict[str, float]]:
    """Per-vial statistics of a fitted map against the phantom's truth.

    Parameters
    ----------
    estimate
        Fitted map in s, shape ``(z, y, x)`` like the phantom's maps.
    phantom
        The ground truth.
    parameter
        "t1" or "t2star".

    Returns
    -------
    list of dict
        One row per vial 1-14: ``vial``, ``true`` and ``median`` (s), ``median_rel_error``
        (relative error of the vial median) and ``median_abs_rel_error`` (median over the
        vial's voxels of the absolute relative error).
    """
    truth = getattr(phantom, parameter)
    values = estimate.detach().cpu().numpy()
    if values.shape != truth.shape:
        raise ValueError(f"estimate has shape {values.shape}, the phantom {truth.shape}")
    rows = []
    for vial in range(1, 15):
        inside = phantom.labels == vial
        true_value = float(truth[inside][0])
        median = float(np.median(values[inside]))
        rows.append(
            {
                "vial": vial,
                "true": true_value,
                "median": median,
                "median_rel_error": median / true_value - 1,
                "median_abs_rel_error": float(np.median(np.abs(values[inside] / true_value - 1))),
            }
        )
    return rows

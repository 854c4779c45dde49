"""Signal models and losses as small, composable torch callables.

A model factory takes the sequence timing and returns a function of the tissue parameters,
so that a fit reads like the physics: ``mse(model(m0=m0, t1=t1), data)``.
Times are in seconds. Parameter maps of shape ``(...)`` give signals of shape
``(n_times, ...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .validation import check_times, device_copy

__all__ = [
    "ir_signal",
    "inversion_recovery",
    "mono_exp_signal",
    "mono_exponential",
    "mse",
    "SeparableModel",
    "ir_seed_model",
    "ir_three_parameter_model",
    "ir_tr_model",
    "ir_hazen_model",
    "mono_exp_model",
    "epg_cpmg_model",
]

SignalModel = Callable[..., torch.Tensor]


def _times(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape times ``(n,)`` to ``(n, 1, ..., 1)`` to broadcast against ``like``.

    Times on another device or in another dtype are copied once (:func:`device_copy`).
    """
    if isinstance(t, torch.Tensor):
        t = device_copy(t, like.device, like.dtype)
    else:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(t.shape + (1,) * like.ndim)


#: log2(e): exp(x) = 2 ** (x * _LOG2_E).
_LOG2_E = 1 / math.log(2)


def _exp_decay(t: torch.Tensor, time_constant: torch.Tensor) -> torch.Tensor:
    """``exp(-t / T)`` for times ``(n,)`` and a map of time constants ``(...)``: ``(n, ...)``.

    Computed as ``2 ** (-t * (log2(e) / T))``: one division per voxel rather than per time
    point, and torch's ``exp2``, which on a CPU runs about three times faster than its ``exp`` and
    has no slow path for arguments below -87 (background voxels with a T of a few ms), where
    ``exp`` takes 20-50 times longer per number. Autograd differentiates it as usual.
    """
    return torch.exp2(-_times(t, time_constant) * (_LOG2_E / time_constant))


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
    signal = m0 * (1 - 2 * _exp_decay(ti, t1))
    return signal.abs() if magnitude else signal


def inversion_recovery(ti: torch.Tensor, magnitude: bool = True) -> SignalModel:
    """Return the IR model for the inversion times ``ti`` (s): ``model(m0=..., t1=...)``.

    Raises ``ValueError`` if ``ti`` is not finite, negative or looks like ms
    (:func:`~qmri_helpers.validation.check_times`).
    """
    check_times(ti, "TI")

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
    return m0 * _exp_decay(te, t2star)


def mono_exponential(te: torch.Tensor) -> SignalModel:
    """Return the decay model for the echo times ``te`` (s): ``model(m0=..., t2star=...)``.

    Raises ``ValueError`` if ``te`` is not finite, negative or looks like ms
    (:func:`~qmri_helpers.validation.check_times`).
    """
    check_times(te, "TE")

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
    if dim is None:  # one fused kernel forward and backward: the cheapest loss of a fit
        return torch.nn.functional.mse_loss(prediction, data)
    return ((prediction - data) ** 2).mean(dim)


# --- Separable models: linear coefficients times basis curves of one time constant ---------


@dataclass(frozen=True)
class SeparableModel:
    r"""A signal :math:`s(t) = \sum_j c_j\, \phi_j(t; \tau)`, optionally its magnitude.

    The coefficients :math:`c` enter linearly, so for a given time constant :math:`\tau`
    (T1 or T2*, in s) they have a closed-form least-squares solution: the basis of variable
    projection. One frozen dataclass per model holds its basis, the basis' derivative (the
    Jacobian, by hand) and the names of its parameters.

    Attributes
    ----------
    name
        Short description, e.g. ``"IR |a + b exp(-TI/T1)|"``.
    linear
        Names of the coefficients :math:`c_j`.
    nonlinear
        Name of :math:`\tau`, e.g. ``"t1"`` or ``"t2star"``.
    times
        Inversion or echo times in s, shape ``(n,)``.
    basis_fn
        ``tau (...)`` to :math:`\phi` and :math:`\partial\phi/\partial\tau`, both of shape
        ``(n, p, ...)``, computed together (they share the exponentials).
    magnitude
        True when the data are magnitudes: the model is :math:`|s|`, and IR fits search the
        polarity.
    bounds
        Allowed range of :math:`\tau` in s.
    derive
        Map the coefficients to physical parameters, e.g. ``{"m0": c0, "k": c1 / c0}``.
    polarity
        Whether a fit of magnitude data must search the sign of each point (the null of an
        IR curve whose shape the coefficients set). Models whose sign pattern follows from
        tau alone (the seed IR model) need no search.
    decay
        For a basis whose curves are :math:`\alpha_j + \beta_j e^{-t/\tau}` (one exponential
        for all), the pairs :math:`((\alpha_1, \beta_1), \ldots)`, else None. The solvers then
        compute the projections and their derivatives from sums of the exponential
        (:func:`~qmri_helpers.solvers.fit_lm`): the same numbers with fewer operations, and
        the exact curvature for Newton's method.
    """

    name: str
    linear: tuple[str, ...]
    nonlinear: str
    times: torch.Tensor
    basis_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    magnitude: bool
    bounds: tuple[float, float]
    derive: Callable[[torch.Tensor], dict[str, torch.Tensor]]
    polarity: bool = False
    decay: tuple[tuple[float, float], ...] | None = None

    def basis(self, tau: torch.Tensor) -> torch.Tensor:
        r"""Basis curves :math:`\phi(t; \tau)`, shape ``(n, p, ...)``."""
        return self.basis_fn(tau)[0]

    def dictionary(self, grid: torch.Tensor) -> torch.Tensor:
        r"""The basis for every value of a grid of :math:`\tau`, shape ``(n, p, k)``."""
        return self.basis_fn(grid.flatten())[0]

    def signed(self, coefficients: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Signed signal, shape ``(n, ...)``, for coefficients ``(p, ...)`` and tau ``(...)``."""
        return (self.basis(tau) * coefficients.unsqueeze(0)).sum(1)

    def __call__(self, coefficients: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """The model signal: :meth:`signed`, or its magnitude for magnitude data."""
        signal = self.signed(coefficients, tau)
        return signal.abs() if self.magnitude else signal

    def evaluate(
        self, coefficients: torch.Tensor, tau: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The model signal ``(n, ...)`` and its Jacobian ``(n, p+1, ...)`` in one pass.

        The Jacobian holds the derivatives by ``(c_1, ..., c_p, tau)``, written by hand from the
        basis; for magnitude data it is multiplied by the sign of the signed signal.
        """
        phi, d_phi = self.basis_fn(tau)
        c = coefficients.unsqueeze(0)
        signal = (phi * c).sum(1)
        jac = torch.cat([phi, (d_phi * c).sum(1, keepdim=True)], dim=1)
        if self.magnitude:
            sign = torch.where(signal < 0, -1.0, 1.0).to(signal.dtype)
            return signal.abs(), jac * sign.unsqueeze(1)
        return signal, jac

    def jacobian(self, coefficients: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """Derivatives of the model signal by ``(c_1, ..., c_p, tau)``, shape ``(n, p+1, ...)``."""
        return self.evaluate(coefficients, tau)[1]


def _decay(t: torch.Tensor, tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``exp(-t/tau)`` and its derivative by tau, both ``(n, ...)``."""
    e = _exp_decay(t, tau)
    return e, e * _times(t, tau) / tau**2


def ir_seed_model(ti: torch.Tensor, magnitude: bool = True) -> SeparableModel:
    r"""The seed's IR model, :math:`|M_0 (1 - 2 e^{-TI/T_1})|`: full recovery, ideal inversion."""
    check_times(ti, "TI")

    def basis(tau):
        e, de = _decay(ti, tau)
        return torch.rsub(e, 1.0, alpha=2).unsqueeze(1), (-2 * de).unsqueeze(1)  # 1 - 2e

    return SeparableModel(
        "IR |M0 (1 - 2 exp(-TI/T1))|", ("m0",), "t1", torch.as_tensor(ti), basis,
        magnitude, (1e-3, 10.0), lambda c: {"m0": c[0]}, decay=((1.0, -2.0),),
    )  # fmt: skip


def ir_three_parameter_model(ti: torch.Tensor, magnitude: bool = True) -> SeparableModel:
    r"""The 3-parameter IR model :math:`|a + b\, e^{-TI/T_1}|`.

    It absorbs incomplete recovery at a constant TR and an imperfect inversion into ``a`` and
    ``b``; for an ideal experiment ``b = -2a``.
    """
    check_times(ti, "TI")

    def basis(tau):
        e, de = _decay(ti, tau)
        return torch.stack([torch.ones_like(e), e], 1), torch.stack([torch.zeros_like(de), de], 1)

    return SeparableModel(
        "IR |a + b exp(-TI/T1)|", ("a", "b"), "t1", torch.as_tensor(ti), basis,
        magnitude, (1e-3, 10.0), lambda c: {"a": c[0], "b": c[1]}, polarity=magnitude,
        decay=((1.0, 0.0), (0.0, 1.0)),
    )  # fmt: skip


_TR_UNKNOWN = (
    "this model needs TR. The files lack RepetitionTime (see header.notes); fit "
    "ir_three_parameter_model, which needs no TR"
)


def _known_tr(tr: torch.Tensor | float, ti: torch.Tensor) -> torch.Tensor:
    """TR per TI (s); refuse an unknown TR (NaN, as a loader reports a missing RepetitionTime)."""
    tr = torch.broadcast_to(torch.as_tensor(tr, dtype=ti.dtype), ti.shape)
    if not torch.isfinite(tr).all():
        raise ValueError(
            f"TR is unknown (NaN) or not finite for {int((~torch.isfinite(tr)).sum())} of "
            f"{tr.numel()} TIs ({tr.tolist()} s): this model needs TR. The files lack "
            "RepetitionTime (see header.notes); fit ir_three_parameter_model, which needs no TR"
        )
    return tr


def ir_tr_model(
    ti: torch.Tensor, tr: torch.Tensor | float, magnitude: bool = True
) -> SeparableModel:
    r"""TR-aware IR model, :math:`M_0 (1 - k e^{-TI/T_1} + (k-1) e^{-TR/T_1})`.

    The signal of an inversion-recovery spin echo repeated every TR (which may differ per TI,
    as on Siemens scanners where TR grows with TI); :math:`k = 2` for a perfect inversion. As a
    separable model: :math:`c_0 = M_0`, :math:`c_1 = M_0 k`, with the basis
    :math:`1 - e^{-TR/T_1}` and :math:`e^{-TR/T_1} - e^{-TI/T_1}`.
    """
    check_times(ti, "TI")
    check_times(tr, "TR", unknown=_TR_UNKNOWN)
    ti = torch.as_tensor(ti)
    tr = _known_tr(tr, ti)

    def basis(tau):
        e_ti, de_ti = _decay(ti, tau)
        e_tr, de_tr = _decay(tr, tau)
        return (
            torch.stack([1 - e_tr, e_tr - e_ti], 1),
            torch.stack([-de_tr, de_tr - de_ti], 1),
        )

    def derive(c):
        return {"m0": c[0], "k": c[1] / torch.where(c[0] == 0, torch.ones_like(c[0]), c[0])}

    return SeparableModel(
        "IR M0 (1 - k exp(-TI/T1) + (k-1) exp(-TR/T1))", ("m0", "m0k"), "t1", ti, basis,
        magnitude, (1e-3, 10.0), derive, polarity=magnitude,
    )  # fmt: skip


def mono_exp_model(te: torch.Tensor, name: str = "t2star") -> SeparableModel:
    r"""Mono-exponential decay :math:`M_0 e^{-TE/\tau}` (T2* or, for spin echoes, T2)."""
    check_times(te, "TE")

    def basis(tau):
        e, de = _decay(te, tau)
        return e.unsqueeze(1), de.unsqueeze(1)

    return SeparableModel(
        f"M0 exp(-TE/{name})", ("m0",), name, torch.as_tensor(te), basis,
        False, (1e-4, 10.0), lambda c: {"m0": c[0]}, decay=((0.0, 1.0),),
    )  # fmt: skip


def ir_hazen_model(
    ti: torch.Tensor, tr: torch.Tensor | float, magnitude: bool = True
) -> SeparableModel:
    r"""The IR model of hazen, :math:`S_0 (1 - a_1 e^{-TI/T_1} + e^{-TR/T_1})`, for comparisons.

    Like :func:`ir_tr_model`, but the TR term's coefficient is fixed at 1 (a perfect inversion)
    while :math:`a_1` is free, so it is not self-consistent for an imperfect inversion. It is
    the model behind hazen's published phantom values; use it to compare like with like. For a
    constant TR it gives the same T1 as :func:`ir_tr_model`.
    """
    check_times(ti, "TI")
    check_times(tr, "TR", unknown=_TR_UNKNOWN)
    ti = torch.as_tensor(ti)
    tr = _known_tr(tr, ti)

    def basis(tau):
        e_ti, de_ti = _decay(ti, tau)
        e_tr, de_tr = _decay(tr, tau)
        return torch.stack([1 + e_tr, -e_ti], 1), torch.stack([de_tr, -de_ti], 1)

    def derive(c):
        return {"s0": c[0], "a1": c[1] / torch.where(c[0] == 0, torch.ones_like(c[0]), c[0])}

    return SeparableModel(
        "IR S0 (1 - a1 exp(-TI/T1) + exp(-TR/T1)) (hazen)", ("s0", "s0a1"), "t1", ti, basis,
        magnitude, (1e-3, 10.0), derive, polarity=magnitude,
    )  # fmt: skip


# --- EPG: the multi-echo spin-echo (CPMG) train with imperfect refocusing ------------------


def epg_cpmg_model(
    te: torch.Tensor, t1: torch.Tensor | float = 1.0, refocusing: float = math.pi
) -> SignalModel:
    r"""Return the CPMG echo-train model for the echo times ``te`` (s): ``model(m0=, t2=, b1=)``.

    .. math::

        S_n = M_0\, \mathrm{EPG}_n(T_2, B_1; T_1, ESP), \qquad TE_n = n \cdot ESP,

    where :math:`\mathrm{EPG}_n` is the amplitude of echo :math:`n` of the extended phase
    graph (:func:`qmri_helpers.epg.cpmg_signal`): an ideal 90° excitation, then refocusing
    pulses of flip angle :math:`B_1 \cdot` ``refocusing`` every ESP. For :math:`B_1 = 1` and a
    180° pulse it is :math:`M_0 e^{-TE_n/T_2}`; for :math:`B_1 < 1` stimulated echoes add to the
    spin echoes.

    Parameters
    ----------
    te
        Echo times in s, shape ``(n,)``: every echo of a CPMG train, ``TE_n = n * ESP``.
    t1
        Longitudinal relaxation time in s (a number or a map ``(...)``): how fast the stored
        states decay.
    refocusing
        Nominal refocusing flip angle in radians.

    Returns
    -------
    SignalModel
        ``model(m0, t2, b1)`` with maps of shape ``(...)`` (M0 in a.u., T2 in s, B1 the
        dimensionless scale of the flip angle) giving echoes of shape ``(n, ...)``.
    """
    from .epg import cpmg_echo_spacing, cpmg_signal  # the recursion lives in its own module

    check_times(te, "TE")
    esp = cpmg_echo_spacing(te)
    n_echoes = int(torch.as_tensor(te).numel())

    def model(m0: torch.Tensor, t2: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
        return m0 * cpmg_signal(t2, b1, esp, n_echoes, t1=t1, refocusing=refocusing)

    return model

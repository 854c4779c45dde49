r"""Extended phase graphs (EPG) of a CPMG multi-echo spin-echo train, in torch.

After the 90° excitation, a train of refocusing pulses (nominally 180°, every echo spacing
ESP) makes one echo per interval. When the refocusing angle is not exactly 180° (B1 below 1,
or the slice profile), each pulse also stores part of the magnetisation along z and recalls it
later: stimulated echoes add to the spin echoes, and the echo train no longer decays as
:math:`e^{-TE/T_2}`. The extended phase graph follows every coherence pathway at once.

The state is a real tensor of shape ``(3, n_states, ...)``: rows :math:`F^+_k`, :math:`F^-_k`
and :math:`Z_k` for the dephasing orders :math:`k = 0 .. n_states-1` (in units of the
dephasing of half an echo spacing), and any batch dimensions after (voxels, dictionary atoms).
Under the CPMG condition (refocusing about the axis of the magnetisation after excitation) all
states stay real if :math:`Z` is stored as :math:`-i Z` (Weigel, J. Magn. Reson. Imaging
41:266-295, 2015). One echo interval is

``relax(ESP/2) -> shift -> rotate(alpha) -> relax(ESP/2) -> shift -> echo = F+_0``.

As is usual for CPMG T2 fitting (e.g. Prasloski et al., Magn. Reson. Med. 67:1803-1814,
2012), the regrowth of :math:`Z_0` towards :math:`M_0` during the train is left out: the fresh
magnetisation is in the phase the CPMG condition does not refocus, so :math:`T_1` enters only
through the decay of the stored :math:`Z_k`.

Times are in s, angles in radians.
"""

from __future__ import annotations

import math

import torch

from .exercises import Feedback

__all__ = [
    "initial_state",
    "relax",
    "shift",
    "rotate",
    "cpmg_echo_spacing",
    "cpmg_signal",
    "check_epg_step",
]


def initial_state(n_states: int, batch_shape: tuple[int, ...] = (), **like) -> torch.Tensor:
    r"""The state right after an ideal 90° excitation: :math:`F^+_0 = F^-_0 = 1`.

    Parameters
    ----------
    n_states
        Number of dephasing orders kept, :math:`k = 0 .. n_states-1`.
    batch_shape
        Shape of the batch dimensions (voxels, atoms).
    like
        ``dtype`` and ``device`` of the new tensor.

    Returns
    -------
    torch.Tensor
        Shape ``(3, n_states, *batch_shape)``.
    """
    state = torch.zeros((3, n_states, *batch_shape), **like)
    state[0, 0] = 1.0
    state[1, 0] = 1.0
    return state


def relax(state: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor) -> torch.Tensor:
    r"""Relaxation over an interval: :math:`F^\pm_k \to E_2 F^\pm_k`, :math:`Z_k \to E_1 Z_k`.

    Parameters
    ----------
    state
        EPG state, shape ``(3, n_states, ...)``.
    e1, e2
        :math:`e^{-\tau/T_1}` and :math:`e^{-\tau/T_2}`, shape ``(...)`` (broadcast over the
        batch dimensions).

    Returns
    -------
    torch.Tensor
        The new state, same shape. (No regrowth of :math:`Z_0`: see the module docstring.)
    """
    return torch.stack([state[0] * e2, state[1] * e2, state[2] * e1])


def shift(state: torch.Tensor) -> torch.Tensor:
    r"""Dephasing by one order: :math:`F^+_k \to F^+_{k+1}`, :math:`F^-_k \to F^-_{k-1}`.

    :math:`F^+_0` takes the value of the new :math:`F^-_0` (they are complex conjugates, and
    real here); the highest order of :math:`F^+` leaves the kept range; :math:`Z` does not move.

    Parameters
    ----------
    state
        EPG state, shape ``(3, n_states, ...)``.

    Returns
    -------
    torch.Tensor
        The new state, same shape.
    """
    f_plus, f_minus, z = state[0], state[1], state[2]
    new_minus = torch.cat([f_minus[1:], torch.zeros_like(f_minus[:1])])
    new_plus = torch.cat([new_minus[:1], f_plus[:-1]])
    return torch.stack([new_plus, new_minus, z])


def rotate(state: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    r"""A refocusing pulse of flip angle :math:`\alpha` about the CPMG axis.

    .. math::

        \begin{pmatrix} F^+_k \\ F^-_k \\ Z_k \end{pmatrix} \to
        \begin{pmatrix}
            \cos^2\frac{\alpha}{2} & \sin^2\frac{\alpha}{2} & \sin\alpha \\
            \sin^2\frac{\alpha}{2} & \cos^2\frac{\alpha}{2} & -\sin\alpha \\
            -\frac{1}{2}\sin\alpha & \frac{1}{2}\sin\alpha & \cos\alpha
        \end{pmatrix}
        \begin{pmatrix} F^+_k \\ F^-_k \\ Z_k \end{pmatrix}

    Parameters
    ----------
    state
        EPG state, shape ``(3, n_states, ...)``.
    alpha
        Flip angle in radians: a number, or shape ``(...)`` (one per batch element).

    Returns
    -------
    torch.Tensor
        The new state, same shape.
    """
    alpha = torch.as_tensor(alpha, dtype=state.dtype, device=state.device)
    cos2 = torch.cos(alpha / 2) ** 2
    sin2 = 1 - cos2
    sin = torch.sin(alpha)
    f_plus, f_minus, z = state[0], state[1], state[2]
    return torch.stack(
        [
            cos2 * f_plus + sin2 * f_minus + sin * z,
            sin2 * f_plus + cos2 * f_minus - sin * z,
            0.5 * sin * (f_minus - f_plus) + torch.cos(alpha) * z,
        ]
    )


def cpmg_signal(
    t2: torch.Tensor,
    b1: torch.Tensor | float,
    esp: float,
    n_echoes: int,
    t1: torch.Tensor | float = 1.0,
    refocusing: float = math.pi,
    n_states: int | None = None,
) -> torch.Tensor:
    r"""Echo amplitudes of a CPMG train for :math:`M_0 = 1`, by the extended phase graph.

    The echo :math:`n` at :math:`TE_n = n \cdot ESP` is :math:`F^+_0` after ``n`` intervals of
    :func:`relax` (ESP/2), :func:`shift`, :func:`rotate` (:math:`B_1 \alpha`), :func:`relax`
    (ESP/2), :func:`shift`. With :math:`B_1 \alpha = 180°` it is exactly
    :math:`e^{-TE_n/T_2}`; below, stimulated echoes make the even echoes brighter than the odd
    ones and slow the apparent decay.

    Parameters
    ----------
    t2
        Transverse relaxation time in s, shape ``(...)``.
    b1
        Scale of the refocusing flip angle (1: nominal), a number or shape ``(...)``.
    esp
        Echo spacing in s (the first TE of a CPMG train).
    n_echoes
        Number of echoes.
    t1
        Longitudinal relaxation time in s (decay of the stored states), number or ``(...)``.
    refocusing
        Nominal refocusing flip angle in radians (default :math:`\pi`).
    n_states
        Dephasing orders kept; default ``n_echoes + 2``, enough for every pathway that
        returns to :math:`k = 0` by the last echo (a state of order ``k`` needs ``k`` more
        shifts to be seen, and there are ``2 (n_echoes - n)`` left after echo ``n``).

    Returns
    -------
    torch.Tensor
        Echo amplitudes, shape ``(n_echoes, ...)``, in the dtype and on the device of ``t2``.
    """
    t2 = torch.as_tensor(t2)
    if not t2.is_floating_point():
        t2 = t2.to(torch.get_default_dtype())
    like = {"dtype": t2.dtype, "device": t2.device}
    b1 = torch.as_tensor(b1, **like)
    t1 = torch.as_tensor(t1, **like)
    batch = torch.broadcast_shapes(t2.shape, b1.shape, t1.shape)
    if n_echoes < 1:
        raise ValueError(f"n_echoes must be at least 1, got {n_echoes}")
    if not esp > 0:
        raise ValueError(f"the echo spacing must be positive (s), got {esp}")
    shape = tuple(batch)
    e2 = torch.broadcast_to(torch.exp(-0.5 * esp / t2), shape).reshape(-1)
    e1 = torch.broadcast_to(torch.exp(-0.5 * esp / t1), shape).reshape(-1)
    alpha = torch.broadcast_to(b1 * refocusing, shape).reshape(-1)
    echoes = _cpmg_echoes(e1, e2, alpha, n_echoes, n_states or n_echoes + 2)
    return echoes.reshape((n_echoes, *shape))


def _cpmg_echoes(
    e1: torch.Tensor, e2: torch.Tensor, alpha: torch.Tensor, n_echoes: int, n_states: int
) -> torch.Tensor:
    r"""The loop of :func:`cpmg_signal` on flat batches ``(b,)``: relax, shift, rotate, fused.

    The same arithmetic as :func:`relax`, :func:`shift` and :func:`rotate` (a test checks
    it), written for speed: the rows are kept apart, the rotation uses
    :math:`S = (F^+ + F^-)/2`, :math:`D = (F^+ - F^-)/2`, so that
    :math:`F^\pm \to S \pm (\cos\alpha\, D + \sin\alpha\, Z)` and
    :math:`Z \to \cos\alpha\, Z - \sin\alpha\, D`, and only the orders that exist by now
    (up to 2n + 2) and can still come back to k = 0 by the last echo (up to
    2 (n_echoes - n)) are computed: about half the work.
    """
    cos, sin = torch.cos(alpha), torch.sin(alpha)
    f_plus = torch.zeros((n_states, e2.numel()), dtype=e2.dtype, device=e2.device)
    f_minus, z = torch.zeros_like(f_plus), torch.zeros_like(f_plus)
    f_plus[0], f_minus[0] = 1.0, 1.0
    echoes = []

    def relax_shift(f_plus, f_minus, z, active):
        # F+_k <- E2 F+_(k-1); F-_k <- E2 F-_(k+1); F+_0 <- F-_0; Z_k <- E1 Z_k
        new_minus = torch.zeros_like(f_minus[:active])
        new_minus[: active - 1] = f_minus[1:active] * e2
        new_plus = torch.empty_like(new_minus)
        new_plus[1:] = f_plus[: active - 1] * e2
        new_plus[0] = new_minus[0]
        return new_plus, new_minus, z[:active] * e1

    for n in range(n_echoes):
        active = min(n_states, 2 * n + 3, 2 * (n_echoes - n) + 1)
        p, m, zz = relax_shift(f_plus, f_minus, z, active)
        half_sum, half_diff = 0.5 * (p + m), 0.5 * (p - m)
        u = cos * half_diff + sin * zz
        zz = cos * zz - sin * half_diff
        p, m = half_sum + u, half_sum - u
        p, m, zz = relax_shift(p, m, zz, active)
        f_plus[:active], f_minus[:active], z[:active] = p, m, zz
        echoes.append(p[0])
    return torch.stack(echoes)


def cpmg_echo_spacing(te: torch.Tensor) -> float:
    """The echo spacing (s) of a CPMG train, checking that ``TE_n = n * ESP``.

    Raises
    ------
    ValueError
        For echo times that are not 1, 2, 3, ... times the first one (within 1%).
    """
    te = torch.as_tensor(te).to(torch.float64).flatten()
    if te.numel() < 1 or not bool((te > 0).all()):
        raise ValueError(f"echo times must be positive (s), got {te.tolist()}")
    esp = float(te[0])
    expected = esp * torch.arange(1, te.numel() + 1, dtype=torch.float64)
    if not bool(torch.allclose(te, expected, rtol=0.01, atol=0)):
        raise ValueError(
            f"the echo times {[round(1000 * t, 3) for t in te.tolist()]} ms are not a CPMG "
            "train (TE_n = n x the first TE): the EPG model needs every echo of the train, "
            "equally spaced, starting at one echo spacing"
        )
    return esp


# --- The exercise of notebook 05: write one EPG step, and a check that says why not ---------


def _random_state(n_states: int = 5, batch: int = 4, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    state = torch.rand((3, n_states, batch), generator=generator, dtype=torch.float64) - 0.5
    state[1, 0] = state[0, 0]  # F+_0 and F-_0 are conjugates, real here
    return state


def _answer(step, *args) -> torch.Tensor:
    try:
        out = step(*args)
    except Exception as error:  # the learner's code: report any failure in words
        raise AssertionError(f"your function raised {type(error).__name__}: {error}") from None
    if not isinstance(out, torch.Tensor):
        raise AssertionError(f"your function must return a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(args[0].shape):
        raise AssertionError(
            f"the state has shape {tuple(args[0].shape)} (rows F+, F-, Z; orders; batch), but "
            f"your function returned shape {tuple(out.shape)}: return the whole new state"
        )
    return out.to(torch.float64)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.allclose(a, b, rtol=1e-6, atol=1e-9))


def _check_relax(step) -> str:
    state = _random_state()
    e1 = torch.tensor([0.9, 0.8, 0.95, 0.7], dtype=torch.float64)
    e2 = torch.tensor([0.6, 0.5, 0.4, 0.3], dtype=torch.float64)
    out = _answer(step, state.clone(), e1, e2)
    expected = relax(state, e1, e2)
    if _close(out, expected):
        return "relax: F+ and F- decay with E2, Z with E1."
    if _close(out, torch.stack([state[0] * e1, state[1] * e1, state[2] * e2])):
        raise AssertionError("E1 and E2 are swapped: the transverse states F± decay with E2")
    if _close(out[:2], expected[:2]) and not _close(out[2], expected[2]):
        if _close(out[2], state[2] * e2):
            raise AssertionError("Z decays with E2 in your code; longitudinal states decay with E1")
        if _close(out[2, 1:], expected[2, 1:]):
            raise AssertionError(
                "Z_0 is wrong: in this model every Z_k, Z_0 too, just decays with E1 "
                "(no regrowth towards M0 inside the echo train)"
            )
        raise AssertionError("F± are right, but Z should become E1 * Z")
    if _close(out[2], expected[2]):
        if _close(out[:2], state[:2]):
            raise AssertionError("F+ and F- are unchanged: multiply them by E2")
        raise AssertionError("Z is right, but F+ and F- should both become E2 * F")
    if _close(out, state):
        raise AssertionError("the state is unchanged: nothing relaxed")
    raise AssertionError("not yet: F+ -> E2 F+, F- -> E2 F-, Z -> E1 Z, order by order")


def _check_rotate(step) -> str:
    state = _random_state(seed=1)
    alpha = torch.tensor([math.pi, 0.8 * math.pi, math.pi / 2, 2.0], dtype=torch.float64)
    out = _answer(step, state.clone(), alpha)
    if _close(out, rotate(state, alpha)):
        return "rotate: the CPMG refocusing matrix, applied to every order."
    if _close(out, rotate(state, alpha * math.pi / 180)) or _close(
        out, rotate(state, alpha * 180 / math.pi)
    ):
        raise AssertionError("degrees and radians are mixed up: alpha is in radians")
    if _close(out, rotate(state, math.pi - alpha)):
        raise AssertionError(
            "cos²(α/2) and sin²(α/2) are swapped: a 180° pulse must exchange F+ and F-"
        )
    if _close(out, rotate(state, -alpha)):
        raise AssertionError(
            "the signs of the sin(α) terms are flipped (a rotation the other way round): "
            "F+ gets +sin(α) Z, F- gets -sin(α) Z, Z gets sin(α)/2 (F- - F+)"
        )
    expected = rotate(state, alpha)
    wrong_rows = [
        name for i, name in enumerate(("F+", "F-", "Z")) if not _close(out[i], expected[i])
    ]
    at_180 = _answer(step, state.clone(), torch.full((4,), math.pi, dtype=torch.float64))
    hint = ""
    if not _close(at_180[:2], state[[1, 0]]):
        hint = " At α = 180° the new F+ must be the old F-, and the new F- the old F+."
    raise AssertionError(f"not yet: the rows {', '.join(wrong_rows)} are wrong.{hint}")


def check_epg_step(step, which: str | None = None) -> Feedback:
    """Check a learner's EPG step against the reference, and say what is wrong if it is.

    Parameters
    ----------
    step
        ``relax(state, e1, e2)`` or ``rotate(state, alpha)``, with ``state`` of shape
        ``(3, n_states, batch)`` (rows F+, F-, Z) and ``e1``, ``e2``, ``alpha`` of shape
        ``(batch,)``; it returns the new state.
    which
        ``"relax"`` or ``"rotate"``; None guesses from the function's number of arguments.

    Returns
    -------
    qmri_helpers.exercises.Feedback
        True with what the step does when it is right; False with the likely mistake
        (swapped E1/E2, degrees for radians, a rotation the wrong way round, ...) when not.
    """
    if which is None:
        import inspect

        n_args = len(inspect.signature(step).parameters)
        which = "relax" if n_args == 3 else "rotate"
    checks = {"relax": _check_relax, "rotate": _check_rotate}
    if which not in checks:
        raise ValueError(f"which must be 'relax' or 'rotate', got {which!r}")
    try:
        return Feedback(True, checks[which](step))
    except AssertionError as why:
        return Feedback(False, str(why))

"""Check functions for the notebooks' exercises: is the learner's answer right, and if not, why.

Each notebook pairs an exercise (a question and an empty cell) with its solution (a cell tagged
``solution``, collapsed in the site and shown in the teacher build), in the manner of the
scikit-learn MOOC's ``_ex_`` / ``_sol_`` pairs. The cell after the solution calls one function
from here on whatever the learner wrote. It returns a :class:`Feedback`, which a notebook shows
as one line: "Correct." with what the answer means, or "Not yet." with the mistake it looks
like (milliseconds for seconds, a missing normalisation, ...) and how to fix it.

The functions recompute the right answer from first principles (a closed form, a least-squares
solve), never from the package's own solver, so they hold whatever the solver does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch

__all__ = [
    "Feedback",
    "check_closed_form_m0",
    "check_decay_model",
    "check_null_point",
    "check_passing_spheres",
]


@dataclass(frozen=True)
class Feedback:
    """The verdict on one answer: right or not, and a sentence that says why.

    Attributes
    ----------
    correct
        Whether the answer is right (within the stated tolerance).
    message
        What the answer means if right; the likely mistake and a hint if not.
    """

    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        return f"{'Correct.' if self.correct else 'Not yet.'} {self.message}"

    __repr__ = __str__


def _close(value: float, target: float, rtol: float) -> bool:
    return math.isclose(value, target, rel_tol=rtol, abs_tol=1e-12)


def check_null_point(ti_null: float, t1: float = 0.8, rtol: float = 1e-3) -> Feedback:
    r"""Check the inversion time at which an IR magnitude signal of ``t1`` (s) is zero.

    The signal :math:`M_0 (1 - 2 e^{-TI/T_1})` is zero at :math:`TI = T_1 \ln 2`.

    Parameters
    ----------
    ti_null
        The learner's null point, in s.
    t1
        T1 of the vial, in s.
    rtol
        Relative tolerance of a right answer.

    Returns
    -------
    Feedback
        Right within ``rtol``, else the mistake it matches: milliseconds, T1 itself,
        :math:`T_1/\ln 2`, a base-10 logarithm or the wrong sign.
    """
    try:
        value = float(ti_null)
    except (TypeError, ValueError):
        return Feedback(False, f"give one number, the TI in seconds; got {ti_null!r}.")
    if not math.isfinite(value):
        return Feedback(False, f"the null point is a finite time; got {value}.")
    right = t1 * math.log(2)
    if _close(value, right, rtol):
        return Feedback(
            True,
            f"TI = T1 ln 2 = {right:.4f} s: there 1 - 2 exp(-TI/T1) = 0, so the magnitude "
            "image of this vial is dark.",
        )
    mistakes = [
        (right * 1000, "that is the right time in milliseconds; the package uses seconds."),
        (t1, "that is T1 itself; at TI = T1 the signal is M0 (1 - 2/e) = 0.26 M0, not zero."),
        (t1 / math.log(2), "you divided T1 by ln 2; solve 1 - 2 exp(-TI/T1) = 0 for TI again."),
        (t1 * math.log10(2), "that uses log10; the exponential needs the natural log, ln."),
        (-right, "a time after the inversion is positive: exp(-TI/T1) = 1/2 gives TI = T1 ln 2."),
    ]
    for target, why in mistakes:
        if _close(value, target, rtol):
            return Feedback(False, why)
    signal = 1 - 2 * math.exp(-value / t1)
    return Feedback(
        False,
        f"at TI = {value:g} s the signal is {signal:+.3f} M0, not 0. Set "
        "1 - 2 exp(-TI/T1) = 0 and solve for TI (T1 in seconds).",
    )


def _test_decay_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    te = torch.tensor([0.002, 0.005, 0.010, 0.020, 0.040])
    m0 = torch.tensor([[1000.0, 500.0, 200.0], [50.0, 800.0, 300.0]])
    t2star = torch.tensor([[0.030, 0.010, 0.080], [0.005, 0.045, 0.120]])
    return m0, t2star, te


def check_decay_model(decay: Callable[..., torch.Tensor]) -> Feedback:
    r"""Check a learner's mono-exponential decay ``decay(m0, t2star, te)``.

    The reference is :math:`M_0 e^{-TE/T_2^*}` of shape ``(n_echoes, ...)``, computed here for
    2x3 maps and 5 echo times (s).

    Parameters
    ----------
    decay
        The learner's function of the maps ``m0`` (a.u.) and ``t2star`` (s), both ``(...)``,
        and the echo times ``te`` (s), ``(n_echoes,)``.

    Returns
    -------
    Feedback
        Right to float32 precision, else the mistake it matches: no broadcasting, the echo
        axis last, a growing exponential, R2* in place of T2*, TE and T2* swapped.
    """
    m0, t2star, te = _test_decay_inputs()
    shape = (len(te), *m0.shape)
    right = m0 * torch.exp(-te[:, None, None] / t2star)
    try:
        answer = torch.as_tensor(decay(m0.clone(), t2star.clone(), te.clone()))
    except RuntimeError as error:
        if "size of tensor" in str(error) or "broadcast" in str(error):
            return Feedback(
                False,
                f"te {tuple(te.shape)} does not broadcast against maps {tuple(m0.shape)}: "
                "reshape it to (n_echoes, 1, 1), e.g. te.reshape(-1, *[1] * t2star.ndim).",
            )
        return Feedback(False, f"calling it raised {type(error).__name__}: {error}")
    except Exception as error:  # the learner's code: report any failure, never crash
        return Feedback(False, f"calling it raised {type(error).__name__}: {error}")
    if answer.shape != shape:
        if answer.shape == (*m0.shape, len(te)):
            return Feedback(
                False,
                f"the echo axis comes last, {tuple(answer.shape)}; the package puts it first, "
                f"{shape}, as the images are stored (TE, z, y, x).",
            )
        return Feedback(False, f"expected shape {shape} (n_echoes, *map shape), got "
                               f"{tuple(answer.shape)}.")  # fmt: skip
    answer = answer.to(right.dtype)
    if torch.allclose(answer, right, rtol=1e-5):
        return Feedback(True, "M0 exp(-TE/T2*), with TE along the first axis.")
    wrong = {
        "the signal grows: the exponent needs a minus sign, exp(-TE/T2*).": m0
        * torch.exp(te[:, None, None] / t2star),
        "that treats t2star as a rate (R2*): divide TE by T2*, exp(-TE/T2*).": m0
        * torch.exp(-te[:, None, None] * t2star),
        "TE and T2* are swapped: the exponent is -TE/T2*.": m0
        * torch.exp(-t2star / te[:, None, None]),
        "M0 is missing: the decay starts at M0, not 1.": torch.exp(-te[:, None, None] / t2star),
    }
    for why, value in wrong.items():
        if torch.allclose(answer, value, rtol=1e-5):
            return Feedback(False, why)
    worst = ((answer - right).abs() / right.abs()).max().item()
    return Feedback(False, f"the values differ from M0 exp(-TE/T2*) by up to {worst:.1%}.")


def _test_m0_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ti = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    basis = (1 - 2 * torch.exp(-ti / 0.5)).abs().double()  # |1 - 2 exp(-TI/T1)|, T1 = 0.5 s
    m0 = torch.tensor([500.0, 1000.0, 2000.0], dtype=torch.float64)
    noise = torch.tensor(
        [[3.0, -5.0, 8.0], [-2.0, 4.0, -6.0], [6.0, -3.0, 2.0], [-4.0, 7.0, -9.0],
         [1.0, -6.0, 5.0], [-7.0, 2.0, 4.0], [5.0, 1.0, -3.0]],
        dtype=torch.float64,
    )  # fmt: skip
    return basis, basis[:, None] * m0 + noise, m0


def check_closed_form_m0(best_m0: Callable[..., torch.Tensor]) -> Feedback:
    r"""Check a learner's closed-form M0, ``best_m0(signal, basis)``.

    For a fixed T1 the model is linear in M0, :math:`y \approx M_0 \varphi`, so the
    least-squares M0 of each voxel is :math:`\varphi^T y / \varphi^T \varphi`. The reference
    comes from ``torch.linalg.lstsq`` on 3 noisy voxels at 7 TIs.

    Parameters
    ----------
    best_m0
        The learner's function of ``signal`` ``(n_ti, n_voxels)`` and ``basis``
        :math:`\varphi`, ``(n_ti,)`` (the curve for M0 = 1), returning ``(n_voxels,)``.

    Returns
    -------
    Feedback
        Right to 1e-6, else the mistake it matches: no division by
        :math:`\varphi^T\varphi`, division by the sum of :math:`\varphi`, the maximum of the
        signal, the mean ratio :math:`y/\varphi`.
    """
    basis, signal, _ = _test_m0_inputs()
    right = torch.linalg.lstsq(basis[:, None], signal).solution[0]
    try:
        answer = torch.as_tensor(best_m0(signal.clone(), basis.clone())).double()
    except Exception as error:  # the learner's code: report any failure, never crash
        return Feedback(False, f"calling it raised {type(error).__name__}: {error}")
    if answer.shape != right.shape:
        return Feedback(
            False,
            f"expected one M0 per voxel, shape {tuple(right.shape)}, got {tuple(answer.shape)}; "
            "sum over the TI axis (the first).",
        )
    if torch.allclose(answer, right, rtol=1e-6):
        return Feedback(
            True,
            "M0 = (phi . y) / (phi . phi): the least-squares M0 for this T1, with no iteration.",
        )
    wrong = {
        "divide by phi . phi: the projection phi . y alone scales with the length of phi.": basis
        @ signal,
        "divide by phi . phi, the squared norm of the basis, not by the sum of phi.": (
            basis @ signal
        )
        / basis.sum(),
        "that is the largest magnitude, the dictionary start's M0; least squares uses every TI.": (
            signal.max(dim=0).values
        ),
        "the mean of y / phi gives the noisy points near the null a large weight; "
        "minimise sum (y - M0 phi)^2 instead.": (signal / basis[:, None]).mean(dim=0),
    }
    for why, value in wrong.items():
        if torch.allclose(answer, value, rtol=1e-6):
            return Feedback(False, why)
    worst = ((answer - right).abs() / right.abs()).max().item()
    return Feedback(
        False,
        f"differs from the least-squares M0 by up to {worst:.2%}: set the derivative of "
        "sum (y - M0 phi)^2 with respect to M0 to zero.",
    )


def check_passing_spheres(
    answer: Sequence[int], table: pd.DataFrame, tolerance: float = 0.05
) -> Feedback:
    """Check which spheres of a phantom-QA table pass at ``tolerance``.

    A sphere passes when it is reliable (its status is not "unreliable") and its relative
    difference from nominal, the column ``vs nominal (%)``, is at most ``tolerance`` in size.

    Parameters
    ----------
    answer
        The learner's sphere numbers (1-14), in any order.
    table
        The QA table of :func:`qmri_helpers.qa_report.sphere_table`.
    tolerance
        Largest relative difference that passes, as a fraction (0.05 is 5%).

    Returns
    -------
    Feedback
        Right if the set of spheres matches, else the mistake it matches: unreliable spheres
        counted, numbers from 0, the tolerance read as percent, or which spheres are missing
        and which should not be there.
    """
    try:
        chosen = {int(s) for s in answer}
    except (TypeError, ValueError):
        return Feedback(False, f"give a list of sphere numbers, e.g. [3, 4, 5]; got {answer!r}.")
    difference = table["vs nominal (%)"].abs().to_numpy() / 100
    sphere = table["sphere"].to_numpy()
    reliable = (table["status"] != "unreliable").to_numpy()
    right = set(sphere[reliable & (difference <= tolerance)].tolist())
    n = len(right)
    if chosen == right:
        return Feedback(
            True,
            f"{n} sphere{'s' if n != 1 else ''} within ±{tolerance * 100:g}% of nominal, "
            "none of them unreliable.",
        )
    with_unreliable = set(sphere[difference <= tolerance].tolist())
    if chosen == with_unreliable:
        extra = sorted(with_unreliable - right)
        return Feedback(
            False,
            f"spheres {extra} are unreliable: the TIs cannot resolve them, so they neither "
            "pass nor fail, whatever their difference.",
        )
    if chosen == {s - 1 for s in right}:
        return Feedback(False, "sphere numbers start at 1 (the 'sphere' column), not at 0.")
    for scale in (0.01, 100):  # the percent column compared with a fraction, or vice versa
        if chosen == set(sphere[reliable & (difference <= tolerance * scale)].tolist()):
            return Feedback(
                False,
                f"'vs nominal (%)' is in percent: ±{tolerance * 100:g}% is {tolerance * 100:g} "
                f"there, and {tolerance:g} as a fraction.",
            )
    missing, extra = sorted(right - chosen), sorted(chosen - right)
    parts = []
    if missing:
        parts.append(f"{len(missing)} passing sphere(s) missing")
    if extra:
        parts.append(f"{len(extra)} that do not pass included")
    return Feedback(
        False,
        f"{' and '.join(parts)}. Keep the reliable spheres whose |vs nominal (%)| is at most "
        f"{tolerance * 100:g}.",
    )

"""The exercises' check functions: a right answer passes, each typical mistake is named.

The right answers are written here from their closed forms (T1 ln 2, phi.y / phi.phi,
M0 exp(-TE/T2*)), independently of the check functions' own references. The last tests hold
every notebook to the exercise/solution pairing that the site relies on.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jupytext
import pandas as pd
import pytest
import torch

from qmri_helpers import exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py"))


# --- notebook 01: the null point ---------------------------------------------------------


def test_null_point_right_answer():
    feedback = exercises.check_null_point(0.8 * math.log(2))
    assert feedback and feedback.correct
    assert str(feedback).startswith("Correct.") and "0.5545 s" in str(feedback)
    assert exercises.check_null_point(1.2 * 0.693147, t1=1.2)  # within the tolerance


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (554.5177, "milliseconds"),
        (0.8, "T1 itself"),
        (0.8 / math.log(2), "divided T1 by ln 2"),
        (0.8 * math.log10(2), "log10"),
        (-0.5545177, "positive"),
        (0.3, "the signal is -0.375 M0"),
        ("half a second", "one number"),
        (float("nan"), "finite"),
    ],
)
def test_null_point_names_the_mistake(answer, says):
    feedback = exercises.check_null_point(answer)
    assert not feedback and str(feedback).startswith("Not yet.")
    assert says in feedback.message


# --- notebook 02: the decay model ----------------------------------------------------------


def test_decay_model_right_answer():
    def decay(m0, t2star, te):
        return m0 * torch.exp(-te.reshape(-1, *[1] * t2star.ndim) / t2star)

    assert exercises.check_decay_model(decay).correct


def test_decay_model_right_answer_in_float64():
    def decay(m0, t2star, te):
        return m0.double() * torch.exp(-te.double()[:, None, None] / t2star.double())

    assert exercises.check_decay_model(decay).correct


@pytest.mark.parametrize(
    ("decay", "says"),
    [
        (lambda m0, t2, te: m0 * torch.exp(-te / t2), "does not broadcast"),
        (lambda m0, t2, te: m0[..., None] * torch.exp(-te / t2[..., None]), "echo axis comes last"),
        (lambda m0, t2, te: m0 * torch.exp(te[:, None, None] / t2), "minus sign"),
        (lambda m0, t2, te: m0 * torch.exp(-te[:, None, None] * t2), "as a rate"),
        (lambda m0, t2, te: m0 * torch.exp(-t2 / te[:, None, None]), "swapped"),
        (lambda m0, t2, te: torch.exp(-te[:, None, None] / t2), "M0 is missing"),
        (lambda m0, t2, te: 1.1 * m0 * torch.exp(-te[:, None, None] / t2), "up to 10.0%"),
        (lambda m0, t2, te: m0[0], "expected shape (5, 2, 3)"),
        (lambda m0, t2: m0, "TypeError"),
    ],
)
def test_decay_model_names_the_mistake(decay, says):
    feedback = exercises.check_decay_model(decay)
    assert not feedback.correct
    assert says in feedback.message, feedback.message


# --- notebook 03: closed-form M0 -----------------------------------------------------------


def test_closed_form_m0_right_answer():
    assert exercises.check_closed_form_m0(lambda y, phi: (phi @ y) / (phi @ phi)).correct
    # The same in einsum form, in float32: right to the check's tolerance
    assert exercises.check_closed_form_m0(
        lambda y, phi: torch.einsum("t,tv->v", phi, y) / phi.pow(2).sum()
    ).correct


def test_closed_form_m0_recovers_m0_of_noiseless_data():
    # The check's test data: with the noise taken out, phi.y / phi.phi is the true M0 exactly.
    basis, signal, m0 = exercises._test_m0_inputs()
    clean = basis[:, None] * m0
    torch.testing.assert_close((basis @ clean) / (basis @ basis), m0)
    assert not torch.allclose(signal, clean)  # the check uses noisy data


@pytest.mark.parametrize(
    ("best_m0", "says"),
    [
        (lambda y, phi: phi @ y, "divide by phi . phi"),
        (lambda y, phi: (phi @ y) / phi.sum(), "not by the sum of phi"),
        (lambda y, phi: y.max(dim=0).values, "largest magnitude"),
        (lambda y, phi: (y / phi[:, None]).mean(dim=0), "near the null"),
        (lambda y, phi: (phi @ y) / (phi @ phi) + 1, "differs from the least-squares M0"),
        (lambda y, phi: y / phi[:, None], "one M0 per voxel"),
        (lambda y: y, "TypeError"),
    ],
)
def test_closed_form_m0_names_the_mistake(best_m0, says):
    feedback = exercises.check_closed_form_m0(best_m0)
    assert not feedback.correct
    assert says in feedback.message, feedback.message


# --- notebook 04: which spheres pass -------------------------------------------------------


@pytest.fixture
def qa_table() -> pd.DataFrame:
    # Spheres 1-6: differences of 2, -4, 7, 1, -12 and 3%; sphere 6 unreliable.
    return pd.DataFrame(
        {
            "sphere": [1, 2, 3, 4, 5, 6],
            "vs nominal (%)": [2.0, -4.0, 7.0, 1.0, -12.0, 3.0],
            "status": ["pass", "pass", "fail", "pass", "fail", "unreliable"],
        }
    )


def test_passing_spheres_right_answer(qa_table):
    feedback = exercises.check_passing_spheres([4, 2, 1], qa_table, tolerance=0.05)
    assert feedback.correct and "3 spheres within ±5% of nominal" in feedback.message
    strict = exercises.check_passing_spheres([4], qa_table, tolerance=0.015)
    assert strict.correct and "1 sphere within ±1.5% of nominal" in strict.message
    assert exercises.check_passing_spheres((1, 2, 3, 4), qa_table, tolerance=0.08).correct
    assert exercises.check_passing_spheres([], qa_table, tolerance=0.005).correct


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ([1, 2, 4, 6], "spheres [6] are unreliable"),
        ([0, 1, 3], "start at 1"),
        ([1, 2, 3, 4, 5], "is in percent"),  # every reliable sphere: 5 read as 500%
        ([1, 2], "1 passing sphere(s) missing"),
        ([1, 2, 4, 5], "1 that do not pass included"),
        ("all", "list of sphere numbers"),
    ],
)
def test_passing_spheres_names_the_mistake(qa_table, answer, says):
    feedback = exercises.check_passing_spheres(answer, qa_table, tolerance=0.05)
    assert not feedback.correct
    assert says in feedback.message, feedback.message


def test_passing_spheres_percent_column_against_a_fraction(qa_table):
    # |vs nominal (%)| <= 0.05 keeps none here, unlike the right answer [1, 2, 4]
    feedback = exercises.check_passing_spheres([], qa_table, tolerance=0.05)
    assert not feedback.correct and "is in percent" in feedback.message


# --- every notebook: exercise and solution in pairs ----------------------------------------


def _heading(cell, prefix: str) -> str | None:
    if cell.cell_type != "markdown":
        return None
    return next((line for line in cell.source.splitlines() if line.startswith(prefix)), None)


@pytest.mark.parametrize("script", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_pairs_each_exercise_with_a_hidden_solution_and_a_check(script):
    cells = jupytext.read(script).cells
    exercises_at = [i for i, c in enumerate(cells) if _heading(c, "### Exercise")]
    assert exercises_at, f"{script.name} has no '### Exercise' heading"
    for n, at in enumerate(exercises_at, start=1):
        assert _heading(cells[at], "### Exercise").startswith(f"### Exercise {n}"), script.name
        rest = cells[at + 1 :]
        empty = rest[0]
        assert empty.cell_type == "code" and "Write your code here" in empty.source
        assert "solution" not in empty.metadata.get("tags", [])
        heading = next(i for i, c in enumerate(rest) if _heading(c, "### Solution"))
        assert _heading(rest[heading], "### Solution") == f"### Solution for Exercise {n}"
        solution = rest[heading + 1]
        assert solution.cell_type == "code"
        assert set(solution.metadata.get("tags", [])) >= {"solution", "hide-input"}
        assert solution.metadata.get("jupyter", {}).get("source_hidden") is True  # JupyterLab
        check = next(c for c in rest[heading + 2 :] if c.cell_type == "code")
        # a check function of the package: qh.exercises.check_..., or one beside its topic
        assert re.search(r"\bqh\.\w+\.check_\w+\(", check.source), (
            f"{script.name}: exercise {n} unchecked"
        )

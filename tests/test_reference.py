"""Reference values of the system phantom, against the tables in nist-system-phantom.md."""

from __future__ import annotations

import numpy as np
import pytest

from qmri_helpers import reference

# Copied here by hand from ../shared/reference/nist-system-phantom.md (version 2, plate 5, 3 T).
V2_20C = (1883.97, 1330.16, 987.27, 690.08, 484.97, 341.58, 240.86, 174.95, 121.08, 85.75,
          60.21, 42.89, 30.40, 21.44)  # fmt: skip
V2_18C = (1830.34, 1317.71, 963.56, 686.88, 482.91, 341.53, 241.84, 175.94, 121.79, 86.41,
          60.70, 43.24, 30.65, 21.62)  # fmt: skip
V2_22C = (1937.34, 1355.29, 1000.81, 695.01, 486.92, 342.58, 240.75, 174.59, 120.80, 85.03,
          59.97, 42.72, 30.27, 21.28)  # fmt: skip
V1_3T = (1989, 1454, 984.1, 706, 496.7, 351.5, 247.13, 175.3, 125.9, 89.0, 62.7, 44.53, 30.84,
         21.719)  # fmt: skip


@pytest.mark.parametrize("temperature, expected", [(20, V2_20C), (18, V2_18C), (22, V2_22C)])
def test_version2_plate5_3t_gives_the_tabulated_values(temperature, expected):
    ref = reference.reference_t1(5, 3.0, serial=50, temperature_c=temperature)
    assert ref.version == 2 and ref.plate == 5 and ref.field_strength == 3.0
    np.testing.assert_allclose(np.asarray(ref) * 1000, expected, rtol=1e-9)
    assert ref.assumptions == ""
    assert ref.label == f"plate 5, version 2, {temperature} °C, 3 T"


def test_between_the_tabulated_temperatures_the_values_lie_between_them():
    t19 = reference.reference_t1(5, 3.0, serial=43, temperature_c=19).ms
    low, high = np.minimum(V2_18C, V2_20C), np.maximum(V2_18C, V2_20C)
    assert np.all((t19 >= low - 0.5) & (t19 <= high + 0.5))
    # sphere 1 rises monotonically with temperature: 18 < 19 < 20 °C
    assert V2_18C[0] < t19[0] < V2_20C[0]


def test_version1_follows_from_a_low_serial_and_is_scaled_by_the_v1_v2_ratio():
    at20 = reference.reference_t1(5, 3.0, serial=42, temperature_c=20)
    assert at20.version == 1
    np.testing.assert_allclose(at20.ms, V1_3T, rtol=1e-9)
    at18 = reference.reference_t1(5, 3.0, serial=42, temperature_c=18)
    np.testing.assert_allclose(at18.ms, np.array(V2_18C) * np.array(V1_3T) / V2_20C, rtol=1e-9)
    # the versions differ by up to 9% (sphere 2), the reason the version matters
    assert np.max(np.abs(np.array(V1_3T) / V2_20C - 1)) == pytest.approx(0.0931, abs=1e-3)


def test_defaults_are_version1_at_20c_and_say_so():
    ref = reference.reference_t1(5, 1.5)
    np.testing.assert_allclose(np.asarray(ref), np.array(reference.NOMINAL_T1_MS[1.5][:14]) / 1000)
    assert ref.version == 1 and ref.temperature_c == 20
    assert "version 1 assumed" in ref.assumptions and "20 °C assumed" in ref.assumptions
    assert ref.label == "plate 5, version 1 (assumed), 20 °C (assumed), 1.5 T"


def test_plate4_and_t2_tables_and_what_they_cannot_correct():
    t1 = reference.reference_t1(4, 1.5, serial=10, temperature_c=20)
    assert t1.ms[0] == 2376 and t1.ms[13] == 83.3 and t1.assumptions == ""
    warm = reference.reference_t1(4, 1.5, serial=10, temperature_c=22)
    np.testing.assert_array_equal(warm.ms, t1.ms)
    assert "plate 4: the version-1 20 °C values" in warm.assumptions
    t2 = reference.reference_t2(4, 3.0)
    assert t2.quantity == "T2" and t2.ms[13] == pytest.approx(5.592)
    assert reference.reference_t2(5, 1.5, serial=10, temperature_c=20).ms[0] == 1669.0
    # both plates fall with the sphere number, what the orientation check relies on
    for table in (reference.T1_V1_MS, reference.T2_V1_MS):
        for values in table.values():
            assert np.all(np.diff(values) < 0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: reference.reference_t1(6, 3.0), "plate must be 4"),
        (lambda: reference.reference_t1(5, 7.0), "no reference values for 7.0 T"),
        (lambda: reference.reference_t1(5, None), "field strength is unknown"),
        (lambda: reference.reference_t1(5, 3.0, serial=50, temperature_c=30), "16-26 °C"),
    ],
)
def test_bad_requests_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()

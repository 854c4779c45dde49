"""Reference values of the ISMRM/NIST (CaliberMRI) system phantom.

The manufacturer's T1 and T2 of the spheres of plate 5 (NiCl2, the "T1 array") and plate 4
(MnCl2, the "T2 array") at 1.5 and 3 T, phantom version 1 (serial numbers below 0043), from
hazen's ``relaxometry_params.py``; the version-2 plate-5 T1 at 3 T against temperature, from the
RRSG-qMRSG 2020 T1 challenge's analysis; and hazen's own fitted T1 of its test scans. All are
listed, with their sources, in ``../shared/reference/nist-system-phantom.md``. The tables are in
ms, as published; the functions return seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.interpolate import interp1d

__all__ = [
    "PLATES",
    "FILL_T1_MS",
    "FILL_T2_MS",
    "T1_V1_MS",
    "T2_V1_MS",
    "PLATE5_T1_V2_3T_MS",
    "V2_FIRST_SERIAL",
    "NOMINAL_T1_MS",
    "HAZEN_FITTED_T1_MS",
    "Reference",
    "reference_t1",
    "reference_t2",
    "plate5_t1_3t_temperature",
    "nominal_t1",
]

#: The plates with relaxation arrays: 5 (NiCl2, T1 array) and 4 (MnCl2, T2 array).
PLATES = (4, 5)
#: T1 and T2 (ms) of the water fill ("sphere 15"), as in hazen's tables.
FILL_T1_MS, FILL_T2_MS = 2700.0, 2400.0
#: Serial numbers from this one up are phantom version 2.
V2_FIRST_SERIAL = 43

#: Version-1 T1 (ms) of spheres 1-14, by (plate, field strength in T).
T1_V1_MS: dict[tuple[int, float], tuple[float, ...]] = {
    (5, 1.5): (2033, 1489, 1012, 730.8, 514.1, 367.9, 260.1, 184.6, 132.7, 92.7, 65.4, 46.32,
               32.45, 22.859),
    (5, 3.0): (1989, 1454, 984.1, 706, 496.7, 351.5, 247.13, 175.3, 125.9, 89.0, 62.7, 44.53,
               30.84, 21.719),
    (4, 1.5): (2376, 2183, 1870, 1539, 1237, 1030, 752.2, 550.2, 413.4, 292.9, 194.9, 160.2,
               106.4, 83.3),
    (4, 3.0): (2480, 2173, 1907, 1604, 1332, 1044, 801.7, 608.6, 458.4, 336.5, 244.2, 176.6,
               126.9, 90.9),
}  # fmt: skip
#: Version-1 T2 (ms) of spheres 1-14, by (plate, field strength in T).
T2_V1_MS: dict[tuple[int, float], tuple[float, ...]] = {
    (5, 1.5): (1669.0, 1244.0, 859.3, 628.5, 446.3, 321.2, 227.7, 161.9, 117.1, 81.9, 57.7,
               41.0, 28.7, 20.2),
    (5, 3.0): (1465, 1076, 717.9, 510.1, 359.6, 255.5, 180.8, 127.3, 90.3, 64.3, 45.7, 31.86,
               22.38, 15.83),
    (4, 1.5): (939.4, 594.3, 416.5, 267.0, 184.9, 140.6, 91.76, 64.84, 45.28, 30.62, 19.76,
               15.99, 10.47, 8.15),
    (4, 3.0): (581.3, 403.5, 278.1, 190.94, 133.27, 96.89, 64.07, 46.42, 31.97, 22.56, 15.813,
               11.237, 7.911, 5.592),
}  # fmt: skip
#: Version-2 T1 (ms) of plate 5 at 3 T, spheres 1-14, by temperature (deg C): CaliberMRI's
#: values as quoted by the RRSG-qMRSG 2020 T1 challenge (``rrsg2020/analysis``, ``src/nist.py``).
PLATE5_T1_V2_3T_MS: dict[float, tuple[float, ...]] = {
    16.0: (1766.68, 1274.07, 950.71, 675.07, 483.91, 343.00, 243.77, 177.68, 122.99, 87.47,
           61.49, 43.79, 31.05, 21.94),
    18.0: (1830.34, 1317.71, 963.56, 686.88, 482.91, 341.53, 241.84, 175.94, 121.79, 86.41,
           60.70, 43.24, 30.65, 21.62),
    20.0: (1883.97, 1330.16, 987.27, 690.08, 484.97, 341.58, 240.86, 174.95, 121.08, 85.75,
           60.21, 42.89, 30.40, 21.44),
    22.0: (1937.34, 1355.29, 1000.81, 695.01, 486.92, 342.58, 240.75, 174.59, 120.80, 85.03,
           59.97, 42.72, 30.27, 21.28),
    24.0: (1987.50, 1367.79, 1015.70, 701.06, 490.24, 344.23, 241.31, 174.78, 120.90, 85.01,
           60.00, 42.70, 30.25, 21.26),
    26.0: (2066.95, 1395.94, 1030.78, 709.48, 494.55, 346.67, 242.45, 175.48, 121.34, 85.28,
           60.17, 42.80, 30.31, 21.31),
}  # fmt: skip

#: Manufacturer nominal T1 (ms) of plate 5, spheres 1-14 and 15 (the water fill), by field (T).
NOMINAL_T1_MS: dict[float, tuple[float, ...]] = {
    1.5: (2033, 1489, 1012, 730.8, 514.1, 367.9, 260.1, 184.6, 132.7, 92.7, 65.4, 46.32, 32.45,
          22.859, 2700),
    3.0: (1989, 1454, 984.1, 706, 496.7, 351.5, 247.13, 175.3, 125.9, 89.0, 62.7, 44.53, 30.84,
          21.719, 2700),
}  # fmt: skip
#: hazen's fitted T1 (ms) of plate 5 per site, spheres 1-15, from hazen's tests.
HAZEN_FITTED_T1_MS: dict[str, tuple[float, ...]] = {
    "site1": (1862.6, 1435.8, 999.9, 740.7, 498.2, 351.6, 255.2, 178.0, 131.7, 93.3, 66.6, 45.1,
              32.5, 22.4, 2632),
    "site2": (1880.5, 1432.3, 1012.0, 742.5, 504.0, 354.4, 256.3, 178.9, 131.9, 93.8, 67.9, 45.8,
              33.4, 23.6, 2700),
    "site4": (1856.54, 1414.10, 973.43, 706.07, 500.16, 354.23, 251.70, 175.92, 129.89, 91.89,
              65.44, 45.51, 32.39, 23.12, 2587),
}  # fmt: skip


def nominal_t1(field_strength: float | None) -> tuple[float, ...]:
    """Nominal T1 (s) of spheres 1-15 for the nearest tabulated field (1.5 or 3 T)."""
    if field_strength is None:
        raise ValueError("the field strength is unknown: pass 1.5 or 3.0 (T)")
    nearest = min(NOMINAL_T1_MS, key=lambda b: abs(b - field_strength))
    if abs(nearest - field_strength) > 0.3:
        raise ValueError(
            f"no nominal T1 values for {field_strength} T; tables exist for 1.5 and 3.0 T"
        )
    return tuple(v / 1000 for v in NOMINAL_T1_MS[nearest])


@dataclass(frozen=True)
class Reference:
    """Reference values of one plate's spheres, and what was assumed to choose them.

    Behaves as the sequence of the 14 values in s (``np.asarray(reference)`` works).

    Attributes
    ----------
    quantity
        "T1" or "T2".
    plate
        4 or 5.
    field_strength
        The tabulated field (T) whose values these are: 1.5 or 3.0.
    version
        Phantom version, 1 (serial numbers below 0043) or 2.
    temperature_c
        The phantom temperature (deg C) the values hold at.
    values
        Spheres 1-14, in s.
    fill
        The water fill ("sphere 15"), in s.
    assumptions
        What was assumed rather than given, and how the values were derived, in words;
        "" where everything was given and tabulated.
    version_assumed, temperature_assumed
        True where the version (no serial number) or the temperature was not given.
    """

    quantity: str
    plate: int
    field_strength: float
    version: int
    temperature_c: float
    values: tuple[float, ...]
    fill: float
    assumptions: str = ""
    version_assumed: bool = False
    temperature_assumed: bool = False

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index):
        return self.values[index]

    def __iter__(self):
        return iter(self.values)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return np.asarray(self.values, dtype=dtype)

    @property
    def ms(self) -> np.ndarray:
        """Spheres 1-14 in ms, ``(14,)``."""
        return np.asarray(self.values) * 1000

    @property
    def label(self) -> str:
        """E.g. ``"plate 5, version 1 (assumed), 20 °C (assumed), 1.5 T"``."""
        version = f"version {self.version}" + (" (assumed)" if self.version_assumed else "")
        temperature = f"{self.temperature_c:g} °C" + (
            " (assumed)" if self.temperature_assumed else ""
        )
        return f"plate {self.plate}, {version}, {temperature}, {self.field_strength:g} T"


def _tabulated_field(field_strength: float | None) -> float:
    if field_strength is None:
        raise ValueError("the field strength is unknown: pass 1.5 or 3.0 (T)")
    nearest = min((1.5, 3.0), key=lambda b: abs(b - field_strength))
    if abs(nearest - field_strength) > 0.3:
        raise ValueError(
            f"no reference values for {field_strength} T; tables exist for 1.5 and 3.0 T"
        )
    return nearest


def _check_plate(plate: int) -> int:
    if plate not in PLATES:
        raise ValueError(f"plate must be 4 (T2 array) or 5 (T1 array), got {plate!r}")
    return int(plate)


def _assumptions(
    serial: int | None, temperature_c: float | None
) -> tuple[int, float, list[str], bool]:
    """Version, temperature (°C), the notes on what was assumed, and whether 20 °C was."""
    version, said = _version(serial)
    notes = [said] if said else []
    if temperature_c is None:
        notes.append("20 °C assumed (no temperature given)")
        return version, 20.0, notes, True
    return version, float(temperature_c), notes, False


def _version(serial: int | None) -> tuple[int, str]:
    if serial is None:
        return 1, "version 1 assumed (no serial number given)"
    if int(serial) < 1:
        raise ValueError(f"the serial number must be a positive integer, got {serial!r}")
    return (2 if int(serial) >= V2_FIRST_SERIAL else 1), ""


def plate5_t1_3t_temperature(temperature_c: float) -> np.ndarray:
    r"""Version-2 plate-5 T1 (ms) at 3 T at ``temperature_c``, interpolated in temperature.

    As in the RRSG-qMRSG 2020 T1 challenge's analysis: a quadratic spline through the
    tabulated values (:data:`PLATE5_T1_V2_3T_MS`, 16-26 °C) in :math:`\log T_1` against
    :math:`\log` temperature, so that the tabulated temperatures return the tabulated values.

    Raises
    ------
    ValueError
        Outside 16-26 °C, where there is no table to interpolate.
    """
    temperatures = np.array(sorted(PLATE5_T1_V2_3T_MS))
    if not temperatures[0] <= temperature_c <= temperatures[-1]:
        raise ValueError(
            f"no reference values at {temperature_c:g} °C: the version-2 table spans "
            f"{temperatures[0]:g}-{temperatures[-1]:g} °C"
        )
    table = np.array([PLATE5_T1_V2_3T_MS[t] for t in temperatures])  # (6, 14)
    spline = interp1d(np.log(temperatures), np.log(table), kind="quadratic", axis=0)
    return np.exp(spline(np.log(temperature_c)))


def reference_t1(
    plate: int,
    field_strength: float | None,
    serial: int | None = None,
    temperature_c: float | None = None,
) -> Reference:
    """Reference T1 of the spheres of ``plate`` for a field, phantom version and temperature.

    - Version 1 or 2 follows from the serial number (2 from 0043 on); without one, version 1
      is assumed and ``assumptions`` says so.
    - Without a temperature, 20 °C is assumed and said.
    - Plate 5 at 3 T: the version-2 values are interpolated in temperature
      (:func:`plate5_t1_3t_temperature`); version 1 is that curve scaled, sphere by sphere,
      by the ratio of the version-1 to the version-2 values at 20 °C (as the RRSG-qMRSG
      challenge does).
    - Plate 5 at 1.5 T: only version 1 at 20 °C is published. Another temperature or
      version 2 scales it by the same relative change as at 3 T; ``assumptions`` says so.
    - Plate 4: only version 1 at 20 °C is published; these values are returned for any
      version and temperature, and ``assumptions`` says so.

    Parameters
    ----------
    plate
        4 or 5.
    field_strength
        B0 in T; the nearest table (1.5 or 3 T, within 0.3 T) is used.
    serial
        The phantom's serial number.
    temperature_c
        The phantom's temperature in °C.

    Returns
    -------
    Reference
        14 values in s, with the assumptions made.
    """
    plate, field = _check_plate(plate), _tabulated_field(field_strength)
    version, temperature_c, notes, assumed_temperature = _assumptions(serial, temperature_c)
    values = np.asarray(T1_V1_MS[plate, field], float)
    if plate == 5:
        v2_20 = np.asarray(PLATE5_T1_V2_3T_MS[20.0])
        curve = plate5_t1_3t_temperature(temperature_c)  # version 2, 3 T
        if field == 3.0:
            values = curve if version == 2 else curve * values / v2_20
        else:
            # version 2: the 3 T ratio of version 2 to 1; either: the 3 T temperature change
            values = values * curve / (np.asarray(T1_V1_MS[5, 3.0]) if version == 2 else v2_20)
            if version == 2 or temperature_c != 20.0:
                notes.append(
                    "1.5 T: the version-1 20 °C values scaled by the change at 3 T "
                    "(no published 1.5 T table for this version and temperature)"
                )
    elif version == 2 or temperature_c != 20.0:
        notes.append("plate 4: the version-1 20 °C values (no other table is published)")
    return Reference(
        "T1", plate, field, version, temperature_c, tuple(values / 1000), FILL_T1_MS / 1000,
        "; ".join(notes), serial is None, assumed_temperature,
    )  # fmt: skip


def reference_t2(
    plate: int,
    field_strength: float | None,
    serial: int | None = None,
    temperature_c: float | None = None,
) -> Reference:
    """Reference T2 of the spheres of ``plate`` (4 or 5) for a field (1.5 or 3 T).

    Only the version-1 values at 20 °C are published (hazen's tables); they are returned for
    any version and temperature, and ``assumptions`` says what was assumed or not corrected.
    Parameters as for :func:`reference_t1`.
    """
    plate, field = _check_plate(plate), _tabulated_field(field_strength)
    version, temperature_c, notes, assumed_temperature = _assumptions(serial, temperature_c)
    if version == 2 or temperature_c != 20.0:
        notes.append("T2: the version-1 20 °C values (no other table is published)")
    values = np.asarray(T2_V1_MS[plate, field], float) / 1000
    return Reference(
        "T2", plate, field, version, temperature_c, tuple(values), FILL_T2_MS / 1000,
        "; ".join(notes), serial is None, assumed_temperature,
    )  # fmt: skip

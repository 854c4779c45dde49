"""How long a learner waits: every notebook run top to bottom, offline, on a fresh cache.

Each notebook is executed in a new kernel, as "Run All" would, with no network
(``QMRI_DATA=sample``: the embedded phantom) and an empty data cache, so the time includes
writing the phantom's DICOM files. Prints one table; ``--readme`` also rewrites the README's
section between ``<!-- runtime:start -->`` and ``<!-- runtime:end -->``.

    python benchmarks/notebook_runtime.py [--readme]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import jupytext
import torch
from nbclient import NotebookClient
from readme_section import replace_section

ROOT = Path(__file__).resolve().parents[1]


def run(script: Path) -> float:
    """Seconds to execute one notebook in a fresh kernel."""
    nb = jupytext.read(script)
    start = time.perf_counter()
    NotebookClient(
        nb, timeout=1800, kernel_name="python3",
        resources={"metadata": {"path": str(script.parent)}},
    ).execute()  # fmt: skip
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readme", action="store_true", help="rewrite the README section")
    args = parser.parse_args()
    os.environ["QMRI_DATA"] = "sample"
    os.environ["QMRI_DATA_DIR"] = tempfile.mkdtemp(prefix="qmri-cache-")
    rows = []
    for script in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        seconds = run(script)
        rows.append((script.stem, seconds))
        print(f"done: {script.stem} {seconds:.1f} s", flush=True)
    total = sum(s for _, s in rows)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU used, "
        f"torch {torch.__version__}, {time.strftime('%Y-%m-%d')}"
    )
    lines = ["| notebook | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.0f} |" for name, seconds in rows]
    lines.append(f"| **all, top to bottom** | **{total:.0f}** ({total / 60:.1f} min) |")
    text = "\n".join(lines) + f"\n\nMeasured on: {machine}; offline, fresh cache.\n"
    print(text)
    if args.readme:
        replace_section("runtime", text)


if __name__ == "__main__":
    main()

"""Time the EPG fit of T2 and B1 (``qmri_helpers.fitting.fit_epg``) on a real 32-echo slice.

The slice is hazen's Philips 3 T multi-echo spin echo of the system phantom (192x192 pixels,
32 echoes, from ``../shared/data``); without it, the synthetic spin-echo plate of the same
size. Every voxel is fitted (no mask), then only the voxels with signal. Torch is limited to
``--threads`` CPU threads (2 by default, the target machine), or runs on ``--device``.

    python benchmarks/epg_speed.py              # print the table
    python benchmarks/epg_speed.py --readme     # also rewrite the README's epg-speed section
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time

import torch
from readme_section import replace_section

import qmri_helpers as qh


def load_slice() -> tuple[torch.Tensor, torch.Tensor, str]:
    shared = qh.data.shared_data_dir()
    folder = (
        shared / "hazen-system-phantom-relaxometry/T2/site5_philips_3T/plate5" if shared else None
    )
    if folder is not None and folder.is_dir():
        images, header = qh.dicom.load_series(folder)
        return images[:, :1], header.te, "hazen Philips 3 T slice"
    folder = tempfile.mkdtemp()
    qh.phantom.write_spin_echo_phantom(folder)
    images, header = qh.dicom.load_series(folder)
    return images[:, :1], header.te, "synthetic spin-echo plate (no ../shared/data)"


def time_fit(data, te, mask, device, repeats: int) -> tuple[float, float, int]:
    data = data.to(device)
    qh.fitting.fit_epg(data, te, mask=mask)  # warm-up (allocator, threads)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fit = qh.fitting.fit_epg(data, te, mask=mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times), int(fit.valid.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--readme", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data, te, source = load_slice()
    where = f"{device.type}" + (f", {args.threads} threads" if device.type == "cpu" else "")
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    lines = [
        f"EPG fit of T2 and B1, {source}: {tuple(data.shape)} (TE, z, y, x), on {where}; "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "",
        "| voxels fitted | median time (s) | best (s) | valid voxels |",
        "|---|---|---|---|",
    ]
    mask = qh.fitting.signal_mask(data)
    for label, m in (("all 192x192", None), (f"signal mask ({int(mask.sum())})", mask)):
        median, best, valid = time_fit(data, te, m, device, args.repeats)
        lines.append(f"| {label} | {median:.2f} | {best:.2f} | {valid} |")
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines += [
        "",
        f"Measured on {datetime.date.today()}, {args.repeats} runs after a warm-up; load average "
        f"{load} (1, 5, 15 min) while it ran: other jobs on the same cores slow the median.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.readme:
        replace_section("epg-speed", text)


if __name__ == "__main__":
    main()

"""Benchmark records: every run of a `bench/*.py` script writes one JSON file with what ran (the
commit, whether the tree had uncommitted changes, the command line), where (CPU model and
instruction-set flags, cores, memory, GPU, torch and Python versions), when (UTC) and how busy
the machine was (load averages), and the figures it printed, so that a figure quoted in the
docs points at the run that produced it:

    bench/results/<machine family>/<script>-<UTC time>.json

The machine family (`amd-zen-5`, `intel-amx`, a GPU's name, ...) groups runs whose figures can be
compared; figures from different families cannot. `--no-record` skips the file, `--record-dir`
writes it elsewhere, `--label` notes what the run measured (say, the peer server behind `--url`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = RESULTS.parents[1]

# The instruction sets the kernels choose between (see docs/kernels.md).
ISA_FLAGS = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8",
)  # fmt: skip

# AMD family 25 (0x19) is Zen 3 or Zen 4 depending on the model number.
ZEN4_MODELS = (range(0x10, 0x20), range(0x60, 0x80), range(0xA0, 0xB0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The record's command-line options, shared by every bench script."""
    group = parser.add_argument_group("record")
    group.add_argument(
        "--no-record",
        dest="record",
        action="store_false",
        help="do not write this run's JSON record under bench/results/",
    )
    group.add_argument("--record-dir", type=Path, default=RESULTS, help="default: bench/results")
    group.add_argument("--label", help="what this run measured, kept in the record")


def write(args: argparse.Namespace, script: str, figures: dict[str, Any]) -> Path | None:
    """Write the record of this run (unless `--no-record`) and say where, on stderr."""
    if not args.record:
        return None
    now = datetime.now(timezone.utc)
    host = machine()
    record = {
        "script": Path(script).name,
        "command": shlex.join(["python", os.path.relpath(script, ROOT), *sys.argv[1:]]),
        "label": args.label,
        "date": now.isoformat(timespec="seconds"),
        **git_state(),
        "machine": host,
        "load_average": load_average(),
        "versions": versions(),
        "figures": figures,
    }
    folder = Path(args.record_dir) / slug(host["family"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{Path(script).stem}-{now:%Y%m%dT%H%M%SZ}.json"
    path.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    print(f"record: {path}", file=sys.stderr)
    return path


def machine() -> dict[str, Any]:
    """CPU model, instruction sets, cores and memory; the GPU when torch sees one."""
    cpu = cpuinfo()
    flags = set(cpu.get("flags", "").split())
    gpu = gpu_name()
    vendor = cpu.get("vendor_id", platform.machine())
    family, model = int(cpu.get("cpu family", -1)), int(cpu.get("model", -1))
    return {
        "family": gpu or cpu_family(vendor, family, model, flags),
        "cpu": cpu.get("model name", platform.processor() or platform.machine()),
        "vendor": vendor,
        "cpu_family": family,
        "cpu_model": model,
        "isa": [f for f in ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "gpu": gpu,
    }


def cpu_family(vendor: str, family: int, model: int, flags: set[str]) -> str:
    """A name for CPUs whose figures compare: the AMD Zen generation, or Intel by its widest
    vector instructions."""
    if vendor == "AuthenticAMD":
        if family == 0x1A:
            return "AMD Zen 5"
        if family == 0x19:
            return "AMD Zen 4" if any(model in r for r in ZEN4_MODELS) else "AMD Zen 3"
        return f"AMD family {family}"
    if vendor == "GenuineIntel":
        if "amx_bf16" in flags:
            return "Intel AMX"
        return "Intel AVX-512" if "avx512f" in flags else "Intel AVX2"
    return f"{vendor} {platform.machine()}"


def cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty elsewhere than Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    first = text.split("\n\n", 1)[0]
    return {
        key.strip(): value.strip()
        for key, _, value in (line.partition(":") for line in first.splitlines())
    }


def memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return round(kib / 2**20, 1)


def gpu_name() -> str | None:
    """The CUDA device's name when the script already imported torch and a GPU is there."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return str(torch.cuda.get_device_name())


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages at the end of the run: above the core count, other
    processes shared the machine with the benchmark."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for package in ("torch", "transformers", "triton"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def git_state() -> dict[str, Any]:
    """The commit checked out and whether the tree differs from it (None outside a checkout)."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _plain(value: Any) -> Any:
    """JSON for the odd figure: torch dtypes and devices, paths."""
    return str(value)

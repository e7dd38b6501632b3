"""The machine and software a run measures: device, its short kind name, cache size, versions."""

from __future__ import annotations

import datetime
import importlib
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

# CPUs report their last-level cache in sysfs, but a 2-core slice of a shared 100+ MB L3 behaves as
# a smaller cache; this cap keeps the CPU rotation affordable and still far above the L2.
CPU_CACHE_CAP_BYTES = 32 << 20
DEFAULT_CACHE_BYTES = 64 << 20


class SetupError(Exception):
    """The run cannot start as asked (bad device, unknown workload, gradfuse missing): exit status 2."""


def pick_device(requested: str | None) -> torch.device:
    """``requested`` ("cpu", "cuda", "cuda:1"), else cuda when available, else cpu."""
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as e:
            raise SetupError(f"--device {requested}: {e}") from None
        if device.type not in ("cpu", "cuda"):
            raise SetupError(f"--device must be cpu or cuda, not {requested}")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SetupError(f"--device {requested} but torch sees no CUDA device")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_kind(device: torch.device) -> str:
    """A short file-name-safe name: "nvidia-h200", "cpu-intel-xeon", "cpu-amd-epyc-7b13"."""
    if device.type == "cuda":
        return _slug(device_name(device))
    model = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|\bProcessor\b|\d+-Core|@.*$", " ", cpu_model())
    return "cpu-" + (_slug(model) or "unknown")


def _sysfs_cache_bytes() -> int | None:
    """Size of the highest-level data/unified cache of CPU 0, from sysfs."""
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        value = int(size[:-1]) * units[size[-1]] if size[-1] in units else int(size)
        if best is None or level > best[0]:
            best = (level, value)
    return best[1] if best else None


def cache_bytes(device: torch.device) -> int:
    """The cache the rotation of gradient sets must defeat: the GPU's L2, or the CPU's last level."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or DEFAULT_CACHE_BYTES)
    size = _sysfs_cache_bytes() or DEFAULT_CACHE_BYTES
    return min(size, CPU_CACHE_CAP_BYTES)


def _cpu_times() -> tuple[int, int, int]:
    """(all jiffies, idle jiffies, online CPUs) from /proc/stat."""
    lines = Path("/proc/stat").read_text().splitlines()
    values = [int(v) for v in lines[0].split()[1:9]]  # user nice system idle iowait irq softirq steal
    cpus = sum(1 for line in lines if re.match(r"cpu\d", line))
    return sum(values), values[3] + values[4], cpus


def busy_cores(sample_s: float = 0.3) -> tuple[float, int] | None:
    """(cores other processes kept busy over ``sample_s``, online CPUs), or None where unknown.
    This process sleeps meanwhile, so what is counted is the rest of the machine."""
    try:
        total0, idle0, cpus = _cpu_times()
        time.sleep(sample_s)
        total1, idle1, _ = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    total = total1 - total0
    return (cpus * (total - (idle1 - idle0)) / total, cpus) if total > 0 else None


def free_threads(current: int) -> tuple[int, str | None]:
    """torch CPU threads to use from now on: ``current``, or fewer when other processes keep cores
    busy (threads that share a core with other work wait on each other at every parallel region:
    calls of milliseconds then take hundreds). Returns the count and, when lowered, why."""
    sample = busy_cores()
    if sample is None:
        return current, None
    busy, cpus = sample
    threads = max(1, min(current, math.floor(cpus - busy + 0.5)))
    if threads == current:
        return current, None
    return threads, (
        f"{busy:.1f} of {cpus} cores busy with other processes: {threads} torch thread{'s' * (threads != 1)} "
        f"instead of {current}, so that no thread waits for a shared core (--threads N fixes the count)"
    )


def module_version(name: str) -> str | None:
    try:
        return getattr(importlib.import_module(name), "__version__", "unknown")
    except Exception:  # missing or broken: the version is simply not known
        return None


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def command_line(argv: list[str] | None = None) -> str:
    """The command as typed: ``python -m benchmarks ARGS``."""
    args = sys.argv[1:] if argv is None else argv
    return shlex.join(["python", "-m", "benchmarks", *args])


def describe(device: torch.device, argv: list[str] | None = None) -> dict:
    """Everything needed to reproduce and compare a run."""
    info = {
        "device": device_name(device),
        "device_kind": device_kind(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": module_version("triton"),
        "gradfuse": module_version("gradfuse"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(argv),
        "git_commit": git_commit(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(cuda=torch.version.cuda, gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count)
    if os.environ.get("TRITON_INTERPRET") == "1":
        info["triton_interpret"] = True
    return info

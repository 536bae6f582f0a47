"""The machine and software a measurement comes from."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

__all__ = ["cpu_count", "machine_description", "package_versions"]

_PACKAGES = ("jax", "jaxlib", "flax", "equinox", "dm-haiku", "optax", "torch", "numpy")


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, which containers restrict)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def package_versions() -> dict[str, str | None]:
    """Installed versions of the benchmarked packages (None when one is missing), without importing them."""
    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_description() -> dict[str, Any]:
    """The machine and software the numbers come from: CPU, cores, memory, versions, JAX backend."""
    import jax

    devices = jax.devices()
    return {
        "cpu_model": _cpu_model(),
        "cores": cpu_count(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "jax_backend": jax.default_backend(),
        "jax_devices": [f"{d.platform}:{d.device_kind}" for d in devices],
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }

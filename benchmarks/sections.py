"""BENCHMARKS.md is shared by several benchmarks: each owns the text between its own two markers."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def write_section(markers: tuple[str, str], section: str, path: str = BENCHMARKS_MD) -> None:
    """Replace the text between `markers` (inclusive) with `section`, or append it."""
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else "# Benchmarks\n"
    start, end = markers
    if start in text and end in text:
        text = text[:text.index(start)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def machine_info(versions: bool = False) -> dict:
    """This host: CPU model, cores, memory, OS and Python; with `versions`, torch, TorchServe, numpy and Java too.
    The one description of the machine every benchmark writes into its results."""
    import psutil

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "os": platform.platform(), "python": sys.version.split()[0]}
    if versions:
        for package in ("torch", "ts", "numpy"):
            try:
                module = __import__(package)
                info["torchserve" if package == "ts" else package] = getattr(module, "__version__", "?")
            except ImportError:
                pass
        info["java"] = _java_version()
    return info


def machine() -> str:
    """CPU model, cores and memory of this host, for the header of a result."""
    info = machine_info()
    return f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB RAM"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30).stderr
        return out.strip().splitlines()[0] if out.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"

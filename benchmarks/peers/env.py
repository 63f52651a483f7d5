"""benchmarks/.venv: the peers' own environment (FastAPI, uvicorn, LitServe, torch), made when missing.

It is rebuilt when benchmarks/requirements.txt changes (a stamp holds the file's SHA-256). The
product's environment never gets these packages.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = os.path.join(BENCH_DIR, ".venv")
REQUIREMENTS = os.path.join(BENCH_DIR, "requirements.txt")
STAMP = os.path.join(VENV, ".bench-installed")


def python() -> str:
    return os.path.join(VENV, "bin", "python")


def _digest() -> str:
    with open(REQUIREMENTS, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def ensure() -> str:
    """The peers' Python, after creating benchmarks/.venv and installing the pins when needed."""
    digest = _digest()
    if os.path.exists(STAMP) and os.path.exists(python()):
        with open(STAMP, encoding="utf-8") as f:
            if f.read().strip() == digest:
                return python()
    if os.path.exists(VENV) and not os.path.exists(python()):
        shutil.rmtree(VENV)
    base = getattr(sys, "_base_executable", sys.executable)
    if not os.path.exists(python()):
        subprocess.run([base, "-m", "venv", VENV], check=True)
    subprocess.run([python(), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", REQUIREMENTS],
                   check=True)
    with open(STAMP, "w", encoding="utf-8") as f:
        f.write(digest + "\n")
    return python()

"""AOTInductor: an ExportedProgram compiled ahead of time into a `.pt2` package, with a compile cache.

Compiling takes tens of seconds (C++ codegen + g++), so packages are cached by what determines them: the
serialized program (graph + weights), the torch version, the CPU's instruction-set flags, the thread count the
kernels are generated for, and the inductor config. An unchanged model rebuilds by copying the cached file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from typing import Any, Optional

import torch
from torch.export import ExportedProgram

from archiver.errors import BuildError

__all__ = ["CompileFailed", "compile_aoti", "cache_key", "program_digest", "is_quantized", "DEFAULT_FREEZING"]

# Freezing (weights folded into constants, conv/linear weights pre-packed for oneDNN) measured on the digits CNN,
# 1 thread, AOTInductor: batch 32 about the same (min 521 vs 440 us), batch 1 5x slower (240 vs 44 us). On the
# Linear-heavy digits MLP at batch 32 it helps (35 vs 49 ms). Off by default (batch 1 is the common serving case);
# int8 pt2e programs need it on (the qlinear/qconv int8 kernels are chosen by freezing passes).
DEFAULT_FREEZING = False


THREADS_METADATA = "tspack.threads"  # these two names must match handlers/runtimes/aoti.py
AXES_METADATA = "tspack.input_axes"
# Bump when what compile_aoti does changes (v2: compiled under no_grad, so that freezing applies).
CACHE_FORMAT = 2


class CompileFailed(BuildError):
    """AOTInductor could not compile or package the program."""


def _cpu_flags() -> str:
    """The CPU's instruction-set flags: inductor picks AVX2/AVX-512/AMX kernels from them at compile time."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


# What torch.export.save writes that is not the program: a random serialization id and, in each node's metadata,
# provenance (object ids and addresses, stack traces with source paths and lines). Without dropping them the same
# model hashes differently in every process and the cache never hits.
_VOLATILE_ENTRY = "serialization_id"
_VOLATILE_META = frozenset({"stack_trace", "nn_module_stack", "from_node", "torch_fn", "source_fn_stack"})


def _without_provenance(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_provenance(v) for k, v in value.items() if k not in _VOLATILE_META}
    if isinstance(value, list):
        return [_without_provenance(v) for v in value]
    return value


def _program_bytes(program: ExportedProgram) -> bytes:
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return buffer.getvalue()


def program_digest(program: ExportedProgram) -> str:
    """SHA-256 of the serialized program (graph, signature, weights), without what differs between processes."""
    digest = hashlib.sha256()
    with zipfile.ZipFile(io.BytesIO(_program_bytes(program))) as archive:
        for name in sorted(archive.namelist()):
            if name.endswith(_VOLATILE_ENTRY):
                continue
            data = archive.read(name)
            if name.endswith(".json"):
                data = json.dumps(_without_provenance(json.loads(data)), sort_keys=True).encode()
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


def cache_key(program: ExportedProgram, inductor_configs: dict[str, Any]) -> str:
    """SHA-256 over everything that changes the compiled package."""
    digest = hashlib.sha256(program_digest(program).encode())
    context = {
        "format": CACHE_FORMAT, "torch": torch.__version__, "python": sys.version_info[:2], "cpu": _cpu_flags(),
        "inductor": inductor_configs,  # includes cpp.threads: CPU kernels are generated for a thread count
    }
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def input_axes(program: ExportedProgram) -> str:
    """The program's input shapes as JSON for the runtime's guard: per input, each axis an int (static) or a symbol
    (same symbol = same size, e.g. the batch), and each symbol's [min, max] (max None when unbounded).

    Compiled kernels check none of this: rows that differ between inputs, or a static axis of another size, are
    read out of bounds (an int32 id tensor is read as int64).
    """
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    shapes = []
    for spec in program.graph_signature.input_specs:
        if spec.kind.name == "USER_INPUT":
            value = placeholders[spec.arg.name].meta["val"]
            shapes.append([int(d) if isinstance(d, int) else str(d) for d in value.shape])
    ranges = {str(symbol): [_bound(r.lower), _bound(r.upper)] for symbol, r in program.range_constraints.items()}
    return json.dumps({"inputs": shapes, "ranges": ranges})


def _bound(value: Any) -> Optional[int]:
    """A range bound as an int; None for torch's unbounded int_oo (which int() cannot convert)."""
    try:
        return int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None


def is_quantized(program: ExportedProgram) -> bool:
    """True for a pt2e-quantized program (quantize/dequantize nodes), whose int8 kernels only freezing selects."""
    return any(node.op == "call_function" and "quantized_decomposed" in str(node.target)
               for node in program.graph.nodes)


def compile_aoti(program: ExportedProgram, path: str, cache_dir: Optional[str] = None,
                 freezing: Optional[bool] = None, inductor_configs: Optional[dict[str, Any]] = None,
                 threads: Optional[int] = None) -> tuple[bool, float]:
    """Compile `program` into an AOTInductor package at `path`, or copy it from the cache.

    Args:
        program: an ExportedProgram (from export_program), on the device the package will run on.
        path: the `.pt2` file to write.
        cache_dir: where compiled packages are kept by cache_key; None compiles every time.
        freezing: torch._inductor.config.freezing (constant-folds weights). None: on for pt2e int8 programs, which
            need it, else DEFAULT_FREEZING.
        inductor_configs: more inductor settings, e.g. {"max_autotune": True}; part of the cache key.
        threads: the intra-op threads the serving worker will have. Inductor writes the thread count into its CPU
            kernels (`omp parallel num_threads(N)`; with 1 it emits no parallel loops at all), so compile for the
            worker, not for the build machine. None: torch.get_num_threads() now.
    Returns:
        (True when copied from the cache, seconds spent).
    Raises:
        CompileFailed: inductor or the C++ compiler failed (message: the first line and what to check).
    """
    start = time.perf_counter()
    threads = threads or torch.get_num_threads()
    if freezing is None:
        freezing = is_quantized(program) or DEFAULT_FREEZING
    # The thread count and input axes go into the package's metadata, for the runtime's warning and input guard.
    metadata = {THREADS_METADATA: str(threads), AXES_METADATA: input_axes(program)}
    configs = {"freezing": freezing, "cpp.threads": threads, "aot_inductor.metadata": metadata,
               **(inductor_configs or {})}
    entry = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        entry = os.path.join(cache_dir, cache_key(program, configs) + ".pt2")
        if os.path.isfile(entry):
            shutil.copyfile(entry, path)
            return True, time.perf_counter() - start
    # Compile into a temporary file next to the target, so that a failed or killed compile leaves no half package
    # where a later build (or the cache) would take it for a good one.
    target_dir = os.path.dirname(os.path.abspath(entry or path))
    fd, scratch = tempfile.mkstemp(suffix=".pt2", dir=target_dir)
    os.close(fd)
    try:
        # Inductor applies freezing only when grad is off (compile_fx checks torch.is_grad_enabled()): with grad on,
        # freezing=True silently compiles unfrozen, and int8 pt2e programs keep fp32 GEMMs on dequantized weights.
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(program, package_path=scratch, inductor_configs=configs)
        if entry:
            os.replace(scratch, entry)
            shutil.copyfile(entry, path)
        else:
            os.replace(scratch, path)
    except Exception as exc:  # inductor lowering, codegen and g++ all fail with different types
        text = str(exc).strip()
        first = text.splitlines()[0] if text else ""
        raise CompileFailed(f"format 'aoti': AOTInductor failed: {type(exc).__name__}: {first[:400]}; check that a "
                            "C++ compiler works (g++ --version), or build format onnx or torchscript") from exc
    finally:
        if os.path.exists(scratch):
            os.remove(scratch)
    return False, time.perf_counter() - start

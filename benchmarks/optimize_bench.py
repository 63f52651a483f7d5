"""`make bench-optimize`: what int8, ONNX Runtime and AOTInductor buy, measured in-process on this CPU (issues 3, 12).

Builds real artifacts with `archiver.build.build` (the library), loads each archive with the runtime the server
uses (`handlers.runtimes.load_runtime`), and times them in-process with the same thread count for the systems
compared. Systems compared are timed in interleaved rounds (A, B, A, B ..., order reversed every round) and each
ratio is the median of the per-round ratios (benchmarks/interleave.py); the host's load average is recorded
next to every figure. Models:
- a Linear-heavy residual MLP over the digits (archiver/zoo/digits_mlp.py, 17M parameters), trained briefly;
- the digits CNN (archiver/zoo/digits_cnn.py), trained briefly;
- ResNet-18 (archiver/zoo/resnet.py) with seeded random weights.
Comparisons (issue 12): aoti vs TorchScript on the CNN (batch 32 and 1, one thread) and ResNet-18 (batch 8, two
threads; also compiled with inductor freezing by calling compile_aoti directly); int8 paths on the MLP (pt2e +
AOTInductor vs torch.ao quantize_dynamic vs fp32, batch 32, one thread); build time of every artifact with a
fresh compile cache and again with it warm.
Writes benchmarks/results/optimize.json, optimize.png and the optimize section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from archiver.build import build
from archiver.package.archive import read_manifest
from archiver.spec import DeploySpec
from archiver.zoo.digits_training import accuracy, load_digits_split, train
from benchmarks.interleave import Quiet, System, batch_of, interleave, load_average
from benchmarks.sections import machine, write_section
from handlers.device import Placement
from handlers.runtimes import load_runtime
from handlers.spec import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORK = os.path.join(ROOT, "benchmarks", "work", "optimize")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
ZOO = os.path.join(ROOT, "archiver", "zoo")
THREADS = 2
MARKERS = ("<!-- bench:optimize:start -->", "<!-- bench:optimize:end -->")
FROZEN = "resnet-aoti-frozen"  # compiled here with compile_aoti(freezing=True), not by the build
# Models that have aoti artifacts: rebuilt a second time to time the warm compile cache.
AOTI_MODELS = ("cnn", "cnn-1t", "mlp-1t", "resnet")


def trained(name: str, cls: type, epochs: int, lr: float, data: tuple) -> tuple[str, float]:
    """Train once and cache the state_dict under benchmarks/work (reruns reuse it)."""
    path = os.path.join(WORK, f"{name}.pt")
    x_train, x_test, y_train, y_test = data
    model = cls()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        torch.manual_seed(0)
        train(model, x_train, y_train, epochs=epochs, lr=lr)
        torch.save(model.state_dict(), path)
    return path, accuracy(model.eval(), x_test, y_test)


def seeded_resnet() -> str:
    """ResNet-18 with seeded random weights (as `make bench`'s heavy model), saved once."""
    from archiver.zoo.resnet import ResNet18

    path = os.path.join(WORK, "resnet18.pt")
    if not os.path.exists(path):
        torch.manual_seed(0)
        torch.save(ResNet18().eval().state_dict(), path)
    return path


def spec(mlp: str, cnn: str, resnet: str) -> DeploySpec:
    samples = {"file": os.path.join(WORK, "heldout.npz")}
    calibration = os.path.join(WORK, "train.npz")
    common = {"version": "1.0", "input": {"shape": [1, 8, 8]}, "samples": samples,
              "output": {"kind": "classification", "top_k": 1}}
    two, one = {"intra_op_threads": THREADS}, {"intra_op_threads": 1}
    mlp_source = {"model_class": f"{ZOO}/digits_mlp.py:DigitsMLP", "weights": mlp}
    cnn_source = {"model_class": f"{ZOO}/digits_cnn.py:DigitsCNN", "weights": cnn}
    return parse(DeploySpec, {"model_store": os.path.join(WORK, "store"), "models": [
        {**common, "name": "mlp", "source": mlp_source, "serving": two, "artifacts": [
            {"format": "torchscript"},
            {"format": "torchscript", "id": "int8", "quantize": {"mode": "dynamic", "min_top1_agreement": 0.99}},
            {"format": "onnx", "id": "onnx"},
            {"format": "onnx", "id": "ort-int8", "quantize": {"mode": "dynamic", "min_top1_agreement": 0.99}},
            {"format": "onnx", "id": "ort-int8-static", "quantize": {
                "mode": "static", "calibration_file": calibration, "min_top1_agreement": 0.95,
                "max_accuracy_drop": 2.0}}]},
        {**common, "name": "cnn", "source": cnn_source, "serving": two, "artifacts": [
            {"format": "torchscript"},
            {"format": "onnx", "id": "onnx"},
            {"format": "onnx", "id": "ort-int8-static", "quantize": {
                "mode": "static", "calibration_file": calibration, "max_accuracy_drop": 0.5}},
            {"format": "aoti", "id": "aoti"}]},
        # aoti packages are compiled for the worker's thread count: one-thread copies for the one-thread rows.
        {**common, "name": "cnn-1t", "source": cnn_source, "serving": one, "artifacts": [
            {"format": "aoti", "id": "aoti"}]},
        {**common, "name": "mlp-1t", "source": mlp_source, "serving": one, "artifacts": [
            {"format": "aoti", "id": "aoti"},
            {"format": "aoti", "id": "aoti-int8", "quantize": {
                "mode": "static", "calibration_file": calibration, "min_top1_agreement": 0.99}}]},
        {"name": "resnet", "version": "1.0", "source": {"model_class": f"{ZOO}/resnet.py:ResNet18", "weights": resnet},
         "input": {"shape": [3, 224, 224]}, "samples": {"count": 8},
         "output": {"kind": "classification", "top_k": 5}, "serving": two, "artifacts": [
             {"format": "torchscript"},
             {"format": "aoti", "id": "aoti"}]},
    ]})


@dataclass(frozen=True)
class Group:
    """Systems timed against each other in interleaved rounds, at one batch size and thread count."""

    key: str
    title: str
    threads: int
    batch: int
    inputs: str  # "digits" | "images"
    systems: tuple[str, ...]  # archive names; "eager:<model>"; FROZEN
    baseline: str


GROUPS = (
    Group("mlp-b32-2t", "MLP, batch 32, 2 threads (issue 3)", THREADS, 32, "digits",
          ("eager:mlp", "mlp", "mlp-int8", "mlp-onnx", "mlp-ort-int8", "mlp-ort-int8-static"), "eager:mlp"),
    Group("cnn-b32-2t", "CNN, batch 32, 2 threads (issue 3)", THREADS, 32, "digits",
          ("eager:cnn", "cnn", "cnn-onnx", "cnn-ort-int8-static", "cnn-aoti"), "cnn"),
    Group("cnn-b32-1t", "CNN, batch 32, 1 thread", 1, 32, "digits", ("cnn", "cnn-1t-aoti"), "cnn"),
    Group("cnn-b1-1t", "CNN, batch 1, 1 thread", 1, 1, "digits", ("cnn", "cnn-1t-aoti"), "cnn"),
    Group("resnet-b8-2t", "ResNet-18, batch 8, 2 threads", THREADS, 8, "images",
          ("resnet", "resnet-aoti", FROZEN), "resnet"),
    Group("mlp-b32-1t", "MLP int8 paths, batch 32, 1 thread", 1, 32, "digits",
          ("mlp", "mlp-1t-aoti", "mlp-int8", "mlp-1t-aoti-int8"), "mlp"),
)


def eager_runner(model_class: str, weights: str):
    from archiver.optimize.export import import_object

    model = import_object(model_class)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()

    def run(inputs: dict[str, np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(inputs["input"])).numpy()

    return run


def unpacked(archive: str, name: str) -> str:
    folder = os.path.join(WORK, "unpacked", name)
    shutil.rmtree(folder, ignore_errors=True)
    with zipfile.ZipFile(archive) as z:
        z.extractall(folder)
    return folder


def frozen_resnet(weights: str, archive: str, cache_dir: str) -> tuple[str, dict]:
    """ResNet-18 exported as the build does, compiled with freezing=True for 2 threads, twice (fresh cache, then
    warm); the package sits in a copy of the resnet-aoti archive's folder. Returns (package path, figures)."""
    from archiver.optimize.aoti import compile_aoti
    from archiver.optimize.export_program import export_program
    from archiver.optimize.formats import quiet_torch
    from archiver.optimize.named_io import NamedIO
    from archiver.zoo.resnet import ResNet18

    folder = unpacked(archive, FROZEN)
    path = os.path.join(folder, "model.frozen.pt2")
    model = ResNet18()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    example = {"input": torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 224, 224), np.float32))}
    builds = []
    for _ in range(2):
        started = time.perf_counter()
        with quiet_torch():
            named = NamedIO(model, ["input"]).eval()
            program, _ = export_program(named, example)
            cached, _ = compile_aoti(program, path, cache_dir, freezing=True, threads=THREADS)
        builds.append({"build_s": round(time.perf_counter() - started, 2), "cache_hit": cached})
    with torch.inference_mode():
        reference = model(example["input"]).numpy()
    return path, {"builds": builds, "reference": reference, "example": example["input"].numpy()}


def loader(entries: dict, weights: dict, frozen: dict):
    """name -> a function(threads) returning the system's run callable."""
    def load(name: str, threads: int):
        if name.startswith("eager:"):
            model = name.split(":", 1)[1]
            cls = {"mlp": "digits_mlp.py:DigitsMLP", "cnn": "digits_cnn.py:DigitsCNN"}[model]
            return eager_runner(f"{ZOO}/{cls}", weights[model])
        placement = Placement("cpu", None, threads)
        if name == FROZEN:
            from handlers.runtimes.aoti import AotiRuntime
            from handlers.spec import ArtifactManifest

            folder = os.path.dirname(frozen["path"])
            return AotiRuntime(ArtifactManifest.load(folder), frozen["path"], placement).run
        entry = entries[name]
        return load_runtime(read_manifest(entry.archive), unpacked(entry.archive, name), placement).run

    return load


def measure_group(group: Group, load, inputs: dict, rounds: int, seconds: float, quiet: Quiet, bar) -> dict:
    def threads() -> None:
        torch.set_num_threads(group.threads)

    rows = batch_of(inputs[group.inputs], group.batch)
    systems = [System(name, load(name, group.threads), rows, threads) for name in group.systems]
    bar.set_postfix_str(f"{group.key}: waiting for load < {quiet.max_load:g}")
    load_before = quiet.wait(lambda text: bar.set_postfix_str(text))
    bar.set_postfix_str(group.key)
    interleave(systems, rounds, seconds / rounds, warmup=3 if group.inputs == "images" else 10,
               progress=lambda: bar.update(1))
    return {"title": group.title, "threads": group.threads, "batch": group.batch, "baseline": group.baseline,
            "load_before": load_before, "load_after": load_average(), "rounds": rounds,
            "turn_s": seconds / rounds, "systems": {s.label: s.turns_ms for s in systems}}


def ms(groups: dict, group: str, system: str) -> float:
    return float(np.median(groups[group]["systems"][system]))


def speedup(groups: dict, group: str, faster: str, baseline: str) -> float:
    """Median over rounds of baseline ms / faster ms."""
    turns = groups[group]["systems"]
    return float(np.median(np.asarray(turns[baseline]) / np.asarray(turns[faster])))


def rows_of(entries: list, groups: dict) -> list[dict]:
    rows = []
    for entry in entries:
        measured = [g for g in ("mlp-b32-2t", "cnn-b32-2t") if entry.name in groups.get(g, {}).get("systems", {})]
        rows.append({"artifact": entry.name, "model": entry.model, "runtime": entry.runtime,
                     "size_bytes": entry.size_bytes, "archive_bytes": os.path.getsize(entry.archive),
                     "top1_agreement": entry.top1_agreement, "max_abs_error": entry.max_abs_error,
                     "accuracy": entry.accuracy, "reference_accuracy": entry.reference_accuracy,
                     "samples_per_s_b32": 32e3 / ms(groups, measured[0], entry.name) if measured else None})
    return rows


def ratios(rows: list[dict], groups: dict) -> dict:
    """The headline figures; a figure whose artifacts failed to build is None."""
    out = {}
    for key, figure in _figures(rows, groups).items():
        try:
            out[key] = figure()
        except (KeyError, ValueError, TypeError):
            out[key] = None
    return out


def _figures(rows: list[dict], groups: dict) -> dict:
    by = {r["artifact"]: r for r in rows}
    int8 = [r for r in rows if r["model"] == "mlp" and "int8" in r["runtime"]]
    mlp, cnn = "mlp-b32-2t", "cnn-b32-2t"

    def best() -> dict:
        return max(int8, key=lambda r: r["samples_per_s_b32"])

    def pair(group: str, faster: str, baseline: str):
        return lambda: speedup(groups, group, faster, baseline)

    return {
        "torch_int8_over_fp32_eager": pair(mlp, "mlp-int8", "eager:mlp"),
        "best_int8_over_fp32_eager": lambda: speedup(groups, mlp, best()["artifact"], "eager:mlp"),
        "best_int8_artifact": lambda: best()["artifact"],
        # the .mar archives (model file + handlers + manifest), as the target reads
        "best_int8_archive_over_fp32": lambda: best()["archive_bytes"] / by["mlp"]["archive_bytes"],
        "best_int8_size_over_fp32": lambda: best()["size_bytes"] / by["mlp"]["size_bytes"],
        "torch_int8_size_over_fp32": lambda: by["mlp-int8"]["size_bytes"] / by["mlp"]["size_bytes"],
        "int8_min_top1_agreement": lambda: min(r["top1_agreement"] for r in int8),
        "cnn_static_int8_accuracy_drop_points": lambda: 100 * (by["cnn-ort-int8-static"]["reference_accuracy"]
                                                               - by["cnn-ort-int8-static"]["accuracy"]),
        "cnn_ort_over_torchscript_b32": pair(cnn, "cnn-onnx", "cnn"),
        # issue 12
        "cnn_aoti_over_torchscript_b32_1t": pair("cnn-b32-1t", "cnn-1t-aoti", "cnn"),
        "cnn_aoti_over_torchscript_b1_1t": pair("cnn-b1-1t", "cnn-1t-aoti", "cnn"),
        "cnn_aoti_over_torchscript_b32_2t": pair(cnn, "cnn-aoti", "cnn"),
        "resnet_aoti_over_torchscript_b8_2t": pair("resnet-b8-2t", "resnet-aoti", "resnet"),
        "resnet_aoti_frozen_over_torchscript_b8_2t": pair("resnet-b8-2t", FROZEN, "resnet"),
        "mlp_pt2e_int8_over_torch_ao_int8_b32_1t": pair("mlp-b32-1t", "mlp-1t-aoti-int8", "mlp-int8"),
        "mlp_pt2e_int8_over_fp32_torchscript_b32_1t": pair("mlp-b32-1t", "mlp-1t-aoti-int8", "mlp"),
        "mlp_torch_ao_int8_over_fp32_torchscript_b32_1t": pair("mlp-b32-1t", "mlp-int8", "mlp"),
        "mlp_aoti_fp32_over_torchscript_b32_1t": pair("mlp-b32-1t", "mlp-1t-aoti", "mlp"),
    }


# key: (op, target); op None = reported, no target
TARGETS = {
    "torch_int8_over_fp32_eager": (">=", 2.0), "best_int8_over_fp32_eager": (">=", 3.0),
    "best_int8_archive_over_fp32": ("<=", 0.30), "int8_min_top1_agreement": (">=", 0.99),
    "cnn_static_int8_accuracy_drop_points": ("<=", 0.5), "cnn_ort_over_torchscript_b32": (">=", 1.3),
    "cnn_aoti_over_torchscript_b32_1t": (">=", 1.5), "cnn_aoti_over_torchscript_b1_1t": (None, None),
    "cnn_aoti_over_torchscript_b32_2t": (None, None),
    "resnet_aoti_over_torchscript_b8_2t": (">=", 1.25), "resnet_aoti_frozen_over_torchscript_b8_2t": (None, None),
    "mlp_pt2e_int8_over_torch_ao_int8_b32_1t": (">=", 1.0),
    "mlp_pt2e_int8_over_fp32_torchscript_b32_1t": (None, None),
    "mlp_torch_ao_int8_over_fp32_torchscript_b32_1t": (None, None),
    "mlp_aoti_fp32_over_torchscript_b32_1t": (None, None),
}


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _load(triple) -> str:
    return " / ".join(f"{v:.2f}" for v in triple)


def targets_table(r: dict) -> list[str]:
    lines = ["| figure | measured | target | met |", "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        value = r[key]
        if value is None:
            lines.append(f"| {key} | not measured (build failed) | {op or 'reported'} {target or ''} | – |")
            continue
        shown = f"{value:.1%}" if "agreement" in key else f"{value:.2f}"
        if op is None:
            lines.append(f"| {key} | {shown} | reported | – |")
            continue
        met = value >= target if op == ">=" else value <= target
        lines.append(f"| {key} | {shown} | {op} {target:g} | {'yes' if met else 'NO'} |")
    return lines


def groups_table(groups: dict) -> list[str]:
    lines = ["| comparison | system | ms per batch (median of rounds) | samples/s | speed vs baseline "
             "(median of per-round ratios) | load avg before (1/5/15 min) | after |", "|---|---|---|---|---|---|---|"]
    for key, group in groups.items():
        for index, system in enumerate(group["systems"]):
            value = ms(groups, key, system)
            ratio = "baseline" if system == group["baseline"] else \
                f"{speedup(groups, key, system, group['baseline']):.2f}x"
            first = index == 0
            title = f"{group['title']}: {group['rounds']} rounds x {group['turn_s']:.2g} s" + (
                f", remeasured {group['remeasured']}" if group.get("remeasured") else "")
            title, before, after = (title, _load(group["load_before"]), _load(group["load_after"])) \
                if first else ("", "", "")
            lines.append(f"| {title} | {system} | {value:.3f} | {group['batch'] * 1e3 / value:,.0f} | {ratio} | "
                         f"{before} | {after} |")
    return lines


def earlier_timings(groups: dict) -> list[str]:
    """A sentence per comparison timed more than once: the ratios of the timings the table no longer shows."""
    lines = []
    for key, group in groups.items():
        earlier = group.get("earlier_timings") or []
        if not earlier:
            continue
        shown = []
        for timing in earlier:
            one = {key: timing}
            ratios_text = ", ".join(f"{name} {speedup(one, key, name, timing['baseline']):.2f}x"
                                    for name in timing["systems"] if name != timing["baseline"])
            shown.append(f"{timing['rounds']} rounds x {timing['turn_s']:.2g} s, load {_load(timing['load_before'])}"
                         f" -> {_load(timing['load_after'])}: {ratios_text}")
        lines += ["", f"Earlier timings of {group['title']} (vs {group['baseline']}): " + "; ".join(shown) + "."]
    return lines


def builds_table(builds: list[dict]) -> list[str]:
    lines = ["| artifact | format | build_s, fresh cache | build_s, warm cache | compile |", "|---|---|---|---|---|"]
    for b in builds:
        warm = "–" if b["warm_s"] is None else f"{b['warm_s']:.2f}"
        lines.append(f"| {b['artifact']} | {b['format']} | {b['cold_s']:.2f} | {warm} | {b['compile'] or '–'} |")
    return lines


def int8_text(result: dict) -> list[str]:
    r, groups = result["ratios"], result["groups"]
    pt2e, torch_ao = ms(groups, "mlp-b32-1t", "mlp-1t-aoti-int8"), ms(groups, "mlp-b32-1t", "mlp-int8")
    fp32, aoti = ms(groups, "mlp-b32-1t", "mlp"), ms(groups, "mlp-b32-1t", "mlp-1t-aoti")
    faster = r["mlp_pt2e_int8_over_torch_ao_int8_b32_1t"]
    verdict = (f"pt2e + AOTInductor runs at {faster:.2f}x the deprecated path's speed: the supported path loses "
               "nothing"
               if faster >= 1.0 else
               f"The deprecated torch.ao path is still {1 / faster:.2f}x faster than pt2e here; it stays available "
               "(format torchscript) while it measures faster, and pt2e + AOTInductor is the supported path")
    notes = "; ".join(result.get("int8_notes", [])) or "–"
    return [
        f"**int8 paths on the Linear-heavy MLP** (batch 32, 1 thread): the build picks the path from the artifact's "
        f"format. `format: aoti` + `quantize: {{mode: static}}` is pt2e static int8 (torchao's X86InductorQuantizer, "
        f"calibrated on the training digits) compiled by AOTInductor with freezing on (compile_aoti turns it on for "
        f"quantized programs: inductor's freezing passes pick the int8 GEMM kernels): {pt2e:.2f} ms per batch. "
        f"`format: torchscript` + `quantize: {{mode: dynamic}}` is torch.ao `quantize_dynamic` (deprecated "
        f"upstream): {torch_ao:.2f} ms. fp32: TorchScript {fp32:.2f} ms, aoti {aoti:.2f} ms. {verdict}. "
        f"Build notes of the int8 artifacts: {notes}.",
    ]


def _command(command: str) -> str:
    return command if "`" in command else f"`{command}`"


def markdown(result: dict) -> str:
    r = result["ratios"]
    lines = [MARKERS[0], "## Optimization benchmark (in-process)", "",
             f"Machine: {result['machine']}. Date: {result['date']}. Command: {_command(result['command'])} (the "
             f"full run: {result['seconds']:.0f} s; waiting for the load average to fall, all timings: "
             f"{result.get('waited_for_load_s', 0):.0f} s). Threads: as each comparison states, equal for the "
             "systems compared (torch intra-op, ORT intra-op; aoti packages compiled for that count). Timing: "
             "systems compared are run in interleaved rounds (A, B, A, B ..., order reversed every round); ratios are "
             "medians of the per-round ratios. Load average (1/5/15 min) before the builds: "
             f"{_load(result['load']['before_build'])}; the host's 2 cores are shared with other work, so ratios "
             "are the figures to read, absolute speeds vary with the load.", ""]
    lines += targets_table(r)
    lines += ["", f"Best int8 artifact (2 threads): `{r['best_int8_artifact']}`.", ""]
    lines += groups_table(result["groups"])
    lines += earlier_timings(result["groups"])
    if "mlp-b32-1t" in result["groups"]:
        lines += [""] + int8_text(result)
    frozen = result["frozen"]
    if frozen:
        lines += ["", f"`{FROZEN}`: the same ResNet-18 program compiled by calling "
              "`archiver.optimize.aoti.compile_aoti(..., freezing=True)` (the build leaves freezing off for fp32: "
              "archiver/optimize/aoti.py notes it made the digits CNN about 5x slower at batch 1, not re-measured "
              f"here); max abs error vs eager "
              f"{frozen['max_abs_error']:.2e}; export + compile {frozen['builds'][0]['build_s']:.1f} s with a fresh "
              f"cache, {frozen['builds'][1]['build_s']:.1f} s warm."]
    lines += ["", "Build time of each artifact (`build_s` of the build report: export + compile, without validation "
              "and packaging), first with an empty compile cache (a fresh `TSPACK_CACHE_DIR`), then rebuilt with it "
              "warm (only the models that have `aoti` artifacts are rebuilt; the other formats have no cache). "
              f"Load average around the builds: {_load(result['load']['before_build'])} before, "
              f"{_load(result['load']['after_build'])} after.", ""]
    lines += builds_table(result["builds"])
    lines += ["", "| artifact | runtime | model file | .mar | samples/s @b32, 2 threads | top-1 agreement | "
              "accuracy (eager) |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        speed = "–" if row["samples_per_s_b32"] is None else f"{row['samples_per_s_b32']:,.0f}"
        acc = "–" if row["accuracy"] is None else f"{_pct(row['accuracy'])} ({_pct(row['reference_accuracy'])})"
        lines.append(f"| {row['artifact']} | {row['runtime']} | {row['size_bytes'] / 1e6:.2f} MB | "
                     f"{row['archive_bytes'] / 1e6:.2f} MB | {speed} | {_pct(row['top1_agreement'])} | {acc} |")
    if result["failed"]:
        lines += ["", "Failed builds: " + "; ".join(f"`{k}`: {e}" for k, e in result["failed"])]
    lines.append(MARKERS[1])
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = result["groups"]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    for ax, key in zip(axes[0], ("mlp-b32-2t", "cnn-b32-2t")):
        names = list(groups[key]["systems"])
        values = [32e3 / ms(groups, key, n) for n in names]
        colours = ["#999" if n.startswith("eager") else "#e07b39" if "int8" in n else
                   "#2a9d5c" if "aoti" in n else "#3b7dd8" for n in names]
        bars = ax.barh(names, values, color=colours)
        ax.bar_label(bars, fmt="%.0f", padding=3, fontsize=8)
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1000:.0f}k")
        ax.set_title(groups[key]["title"] + ": samples/s")
        ax.set_xlabel("samples / s (higher is better)")
    r = result["ratios"]
    keys = [k for k in TARGETS if k.startswith(("cnn_aoti", "resnet_", "mlp_")) and r[k] is not None]
    ax = axes[1][0]
    bars = ax.barh(keys, [r[k] for k in keys],
                   color=["#2a9d5c" if TARGETS[k][0] is None or r[k] >= TARGETS[k][1] else "#d64545" for k in keys])
    ax.bar_label(bars, fmt="%.2fx", padding=3, fontsize=8)
    for index, key in enumerate(keys):
        if TARGETS[key][0]:
            ax.plot([TARGETS[key][1]] * 2, [index - 0.4, index + 0.4], color="black", linewidth=2)
    ax.axvline(1.0, color="#666", linestyle=":")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title("issue 12: speed ratios (median of interleaved rounds; black: target)")
    ax.set_xlabel("x (higher is better)")
    ax = axes[1][1]
    builds = [b for b in result["builds"] if b["format"] == "aoti"]
    y = np.arange(len(builds))
    ax.barh(y + 0.2, [b["cold_s"] for b in builds], 0.4, label="fresh compile cache", color="#e07b39")
    ax.barh(y - 0.2, [b["warm_s"] or 0 for b in builds], 0.4, label="warm compile cache", color="#2a9d5c")
    ax.set_yticks(y, [b["artifact"] for b in builds], fontsize=8)
    ax.set_title("aoti build time (export + compile)")
    ax.set_xlabel("seconds (lower is better)")
    ax.legend()
    fig.suptitle(f"make bench-optimize, {result['date']}, "
                 f"load avg before builds {_load(result['load']['before_build'])}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def build_times(cold: list, warm: list) -> list[dict]:
    again = {e.name: e for e in warm}
    out = []
    for entry in cold:
        compile_note = next((n for n in entry.notes if n.startswith("aoti:")), None)
        rebuilt = again.get(entry.name)
        out.append({"artifact": entry.name, "format": entry.format, "cold_s": entry.build_s,
                    "warm_s": rebuilt.build_s if rebuilt is not None and entry.format == "aoti" else None,
                    "compile": compile_note + (" / rebuilt: " + next(
                        (n for n in rebuilt.notes if n.startswith("aoti:")), "?") if rebuilt else "")
                    if compile_note else None})
    return out


def prepare_data() -> tuple[dict, dict]:
    data = load_digits_split()
    np.savez(os.path.join(WORK, "heldout.npz"), x=data[1], y=data[3])
    np.savez(os.path.join(WORK, "train.npz"), x=data[0], y=data[2])
    from archiver.zoo.digits_cnn import DigitsCNN
    from archiver.zoo.digits_mlp import DigitsMLP

    mlp, m_acc = trained("mlp", DigitsMLP, epochs=5, lr=5e-4, data=data)
    cnn, c_acc = trained("cnn", DigitsCNN, epochs=15, lr=2e-3, data=data)
    print(f"trained: mlp {m_acc:.1%}, cnn {c_acc:.1%} held-out accuracy", flush=True)
    images = np.random.default_rng(1).standard_normal((8, 3, 224, 224), np.float32)
    return ({"mlp": mlp, "cnn": cnn, "resnet": seeded_resnet()},
            {"digits": {"input": data[1][:64]}, "images": {"input": images}})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per system (split into rounds)")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved rounds per comparison")
    parser.add_argument("--max-load", type=float, default=3.0, help="wait for the 1-min load average to fall under")
    parser.add_argument("--max-wait", type=float, default=600.0, help="seconds of waiting for load, whole run")
    parser.add_argument("--from-json", action="store_true",
                        help="only render optimize.png and BENCHMARKS.md again from benchmarks/results/optimize.json")
    parser.add_argument("--remeasure", nargs="+", choices=[g.key for g in GROUPS], metavar="GROUP",
                        help="time these comparisons again on the archives of the last run (no rebuild) and update "
                             f"benchmarks/results/optimize.json; groups: {', '.join(g.key for g in GROUPS)}")
    args = parser.parse_args()
    if args.from_json:
        with open(os.path.join(RESULTS, "optimize.json"), encoding="utf-8") as f:
            return render(json.load(f))
    if args.remeasure:
        return remeasure(args)
    from tqdm import tqdm

    started = time.time()
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    torch.set_num_threads(THREADS)
    weights, inputs = prepare_data()
    quiet = Quiet(args.max_load, args.max_wait)
    load = {"before_build": load_average()}  # the wait budget is kept for the timed comparisons
    cache = tempfile.mkdtemp(prefix="tspack-bench-aoti-cache-")
    os.environ["TSPACK_CACHE_DIR"] = cache  # a fresh compile cache: the first build compiles every aoti artifact
    try:
        the_spec = spec(weights["mlp"], weights["cnn"], weights["resnet"])
        cold = build(the_spec, progress=True)
        warm = build(the_spec, progress=True, only=list(AOTI_MODELS))
        entries = {e.name: e for e in warm.entries if e.passed}
        entries.update({e.name: e for e in cold.entries if e.passed and e.name not in entries})
        frozen = {}
        if "resnet-aoti" in entries:
            frozen_path, frozen = frozen_resnet(weights["resnet"], entries["resnet-aoti"].archive,
                                                os.path.join(cache, "freezing"))
            frozen["path"] = frozen_path
        load["after_build"] = load_average()
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    failed = [(e.key, e.error) for e in cold.entries + warm.entries if not e.passed]
    load_system = loader(entries, weights, frozen)
    groups = {}
    runnable = [g for g in GROUPS
                if all(s in entries or s.startswith("eager:") or (s == FROZEN and frozen) for s in g.systems)]
    bar = tqdm(total=sum(len(g.systems) * args.rounds for g in runnable), desc="timing", unit="turn")
    for group in runnable:
        groups[group.key] = measure_group(group, load_system, inputs, args.rounds, args.seconds, quiet, bar)
    bar.close()
    torch.set_num_threads(THREADS)
    if frozen:
        frozen_run = load_system(FROZEN, THREADS)
        answer = next(iter(frozen_run({"input": frozen["example"]}).values()))
        frozen["max_abs_error"] = float(np.abs(answer - frozen["reference"]).max())
    ordered = [entries[e.name] for e in cold.entries if e.name in entries]
    rows = rows_of(ordered, groups)
    out = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "command": "make bench-optimize", "rounds": args.rounds, "load": load, "waited_for_load_s": quiet.waited_s,
           "eager": {m: 32e3 / ms(groups, g, f"eager:{m}") for m, g in (("mlp", "mlp-b32-2t"), ("cnn", "cnn-b32-2t"))},
           "rows": rows, "failed": failed, "groups": groups, "builds": build_times(cold.entries, warm.entries),
           "frozen": {k: frozen[k] for k in ("builds", "max_abs_error") if k in frozen},
           "int8_notes": [f"{e.name}: {n}" for e in ordered if e.name in ("mlp-int8", "mlp-1t-aoti-int8")
                          for n in e.notes]}
    out["ratios"] = ratios(rows, groups)
    out["seconds"] = time.time() - started
    with open(os.path.join(RESULTS, "optimize.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    return render(out)


def remeasure(args: argparse.Namespace) -> int:
    """Time some comparisons again with the archives the last full run built, and merge them into its results."""
    from types import SimpleNamespace

    from tqdm import tqdm

    path = os.path.join(RESULTS, "optimize.json")
    with open(path, encoding="utf-8") as f:
        out = json.load(f)
    store = os.path.join(WORK, "store")
    entries = {name.removesuffix("_v1.0.mar"): SimpleNamespace(archive=os.path.join(store, name))
               for name in os.listdir(store) if name.endswith("_v1.0.mar")}
    weights, inputs = prepare_data()
    groups = [g for g in GROUPS if g.key in args.remeasure]
    frozen = {}
    if any(FROZEN in g.systems for g in groups):
        cache = tempfile.mkdtemp(prefix="tspack-bench-aoti-cache-")
        try:
            frozen_path, frozen = frozen_resnet(weights["resnet"], entries["resnet-aoti"].archive, cache)
            frozen["path"] = frozen_path
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    load_system = loader(entries, weights, frozen)
    quiet = Quiet(args.max_load, args.max_wait)
    bar = tqdm(total=sum(len(g.systems) * args.rounds for g in groups), desc="timing", unit="turn")
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    for group in groups:
        before = dict(out["groups"].get(group.key, {}))
        earlier = before.pop("earlier_timings", []) + ([before] if before else [])
        out["groups"][group.key] = {**measure_group(group, load_system, inputs, args.rounds, args.seconds, quiet, bar),
                                    "remeasured": when, "earlier_timings": earlier}
    bar.close()
    for row in out["rows"]:
        measured = [g for g in ("mlp-b32-2t", "cnn-b32-2t") if row["artifact"] in out["groups"][g]["systems"]]
        row["samples_per_s_b32"] = 32e3 / ms(out["groups"], measured[0], row["artifact"]) if measured else None
    out["ratios"] = ratios(out["rows"], out["groups"])
    out["waited_for_load_s"] = out.get("waited_for_load_s", 0) + quiet.waited_s
    out["command"] += f"; then `{' '.join(['python -m benchmarks.optimize_bench', *sys.argv[1:]])}` ({when})"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    return render(out)


def render(out: dict) -> int:
    plot(out, os.path.join(RESULTS, "optimize.png"))
    write_section(MARKERS, markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

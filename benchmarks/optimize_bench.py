"""`make bench-optimize`: what int8 and ONNX Runtime buy, measured in-process on this CPU (issue 3).

Builds real artifacts with `tspack build` (the library), loads each with the runtime the server uses,
and measures throughput at batch 32 with the same thread count for every runtime. Models:
- a Linear-heavy residual MLP over the digits (archiver/zoo/digits_mlp.py, 17M parameters), trained briefly;
- the digits CNN (archiver/zoo/digits_cnn.py).
Writes benchmarks/results/optimize.json, optimize.png and the optimize section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from archiver.build import build  # noqa: E402
from archiver.package import read_manifest  # noqa: E402
from archiver.spec import DeploySpec  # noqa: E402
from archiver.zoo.digits_training import accuracy, load_digits_split, train  # noqa: E402
from benchmarks.sections import machine, write_section  # noqa: E402
from handlers.device import Placement  # noqa: E402
from handlers.runtimes import load_runtime  # noqa: E402
from handlers.spec import parse  # noqa: E402

WORK = os.path.join(ROOT, "benchmarks", "work", "optimize")
RESULTS = os.path.join(ROOT, "benchmarks", "results")
ZOO = os.path.join(ROOT, "archiver", "zoo")
THREADS = 2
MARKERS = ("<!-- bench:optimize:start -->", "<!-- bench:optimize:end -->")


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


def spec(mlp: str, cnn: str) -> DeploySpec:
    samples = {"file": os.path.join(WORK, "heldout.npz")}
    calibration = os.path.join(WORK, "train.npz")
    common = {"version": "1.0", "input": {"shape": [1, 8, 8]}, "samples": samples,
              "output": {"kind": "classification", "top_k": 1}}
    return parse(DeploySpec, {"model_store": os.path.join(WORK, "store"), "models": [
        {**common, "name": "mlp", "source": {"model_class": f"{ZOO}/digits_mlp.py:DigitsMLP", "weights": mlp},
         "artifacts": [
             {"format": "torchscript"},
             {"format": "torchscript", "id": "int8", "quantize": {"mode": "dynamic", "min_top1_agreement": 0.99}},
             {"format": "onnx", "id": "onnx"},
             {"format": "onnx", "id": "ort-int8", "quantize": {"mode": "dynamic", "min_top1_agreement": 0.99}},
             {"format": "onnx", "id": "ort-int8-static", "quantize": {
                 "mode": "static", "calibration_file": calibration, "min_top1_agreement": 0.95,
                 "max_accuracy_drop": 2.0}}]},
        {**common, "name": "cnn", "source": {"model_class": f"{ZOO}/digits_cnn.py:DigitsCNN", "weights": cnn},
         "artifacts": [
             {"format": "torchscript"},
             {"format": "onnx", "id": "onnx"},
             {"format": "onnx", "id": "ort-int8-static", "quantize": {
                 "mode": "static", "calibration_file": calibration, "max_accuracy_drop": 0.5}}]},
    ]})


def throughput(run, inputs: np.ndarray, batch: int = 32, seconds: float = 3.0) -> float:
    """Samples per second of `run` on batches of `batch` rows, after a warm-up."""
    rows = np.concatenate([inputs] * (batch // len(inputs) + 1))[:batch]
    for _ in range(10):
        run(rows)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run(rows)
        calls += 1
    return calls * batch / (time.perf_counter() - started)


def eager_runner(model_class: str, weights: str):
    from archiver.export import import_object

    model = import_object(model_class)()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(batch)).numpy()

    return run


def measure(entries: list, inputs: np.ndarray, seconds: float) -> list[dict]:
    rows = []
    for entry in entries:
        folder = os.path.join(WORK, "unpacked", entry.name)
        import zipfile

        with zipfile.ZipFile(entry.archive) as z:
            z.extractall(folder)
        runtime = load_runtime(read_manifest(entry.archive), folder, Placement("cpu", None, THREADS))
        rows.append({"artifact": entry.name, "model": entry.model, "runtime": entry.runtime,
                     "size_bytes": entry.size_bytes, "archive_bytes": os.path.getsize(entry.archive),
                     "top1_agreement": entry.top1_agreement,
                     "accuracy": entry.accuracy, "reference_accuracy": entry.reference_accuracy,
                     "samples_per_s_b32": throughput(runtime.run, inputs, 32, seconds)})
    return rows


def ratios(rows: list[dict], eager: dict) -> dict:
    by = {r["artifact"]: r for r in rows}
    t_eager = eager["mlp"]
    int8 = [r for r in rows if r["model"] == "mlp" and "int8" in r["runtime"]]
    best = max(int8, key=lambda r: r["samples_per_s_b32"])
    fp32_size = by["mlp"]["size_bytes"]
    return {
        "torch_int8_over_fp32_eager": by["mlp-int8"]["samples_per_s_b32"] / t_eager,
        "best_int8_over_fp32_eager": best["samples_per_s_b32"] / t_eager,
        "best_int8_artifact": best["artifact"],
        # the .mar archives (model file + handlers + manifest), as the target reads
        "best_int8_archive_over_fp32": best["archive_bytes"] / by["mlp"]["archive_bytes"],
        "best_int8_size_over_fp32": best["size_bytes"] / fp32_size,
        "torch_int8_size_over_fp32": by["mlp-int8"]["size_bytes"] / fp32_size,
        "int8_min_top1_agreement": min(r["top1_agreement"] for r in int8),
        "cnn_static_int8_accuracy_drop_points": 100 * (by["cnn-ort-int8-static"]["reference_accuracy"]
                                                       - by["cnn-ort-int8-static"]["accuracy"]),
        "cnn_ort_over_torchscript_b32": by["cnn-onnx"]["samples_per_s_b32"] / by["cnn"]["samples_per_s_b32"],
    }


TARGETS = {
    "torch_int8_over_fp32_eager": (">=", 2.0), "best_int8_over_fp32_eager": (">=", 3.0),
    "best_int8_archive_over_fp32": ("<=", 0.30), "int8_min_top1_agreement": (">=", 0.99),
    "cnn_static_int8_accuracy_drop_points": ("<=", 0.5), "cnn_ort_over_torchscript_b32": (">=", 1.3),
}


def markdown(result: dict) -> str:
    r = result["ratios"]
    lines = [MARKERS[0], "## Optimization benchmark (in-process, batch 32)", "",
             f"Machine: {result['machine']}. Date: {result['date']}. Command: `make bench-optimize` "
             f"({result['seconds']:.0f} s). Threads: {THREADS} for every runtime (torch intra-op, ORT intra-op).", "",
             "| figure | measured | target | met |", "|---|---|---|---|"]
    for key, (op, target) in TARGETS.items():
        value = r[key]
        met = value >= target if op == ">=" else value <= target
        shown = f"{value:.1%}" if "agreement" in key else f"{value:.2f}"
        lines.append(f"| {key} | {shown} | {op} {target:g} | {'yes' if met else 'NO'} |")
    lines += ["", f"Best int8 artifact: `{r['best_int8_artifact']}`. Eager fp32 MLP: "
              f"{result['eager']['mlp']:.0f} samples/s; eager fp32 CNN: {result['eager']['cnn']:.0f}.", "",
              "| artifact | runtime | model file | .mar | samples/s @b32 | top-1 agreement | accuracy (eager) |",
              "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['artifact']} | {row['runtime']} | {row['size_bytes'] / 1e6:.2f} MB | "
                     f"{row['archive_bytes'] / 1e6:.2f} MB | "
                     f"{row['samples_per_s_b32']:,.0f} | {row['top1_agreement']:.1%} | "
                     f"{row['accuracy']:.1%} ({row['reference_accuracy']:.1%}) |")
    lines.append(MARKERS[1])
    return "\n".join(lines)



def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, model in zip(axes, ("mlp", "cnn")):
        rows = [r for r in result["rows"] if r["model"] == model]
        labels = ["eager fp32"] + [r["artifact"].replace(f"{model}-", "") if r["artifact"] != model else "torchscript"
                                   for r in rows]
        values = [result["eager"][model]] + [r["samples_per_s_b32"] for r in rows]
        bars = ax.barh(labels, values, color=["#999"] + ["#3b7dd8" if "int8" not in r["runtime"] else "#e07b39"
                                                          for r in rows])
        ax.bar_label(bars, fmt="%.0f", padding=3, fontsize=8)
        ax.set_title(f"{model}: samples/s at batch 32 ({THREADS} threads)")
        ax.set_xlabel("samples / s (higher is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="timing window per runtime")
    args = parser.parse_args()
    started = time.time()
    os.makedirs(WORK, exist_ok=True)
    os.makedirs(RESULTS, exist_ok=True)
    torch.set_num_threads(THREADS)
    data = load_digits_split()
    np.savez(os.path.join(WORK, "heldout.npz"), x=data[1], y=data[3])
    np.savez(os.path.join(WORK, "train.npz"), x=data[0], y=data[2])
    from archiver.zoo.digits_cnn import DigitsCNN
    from archiver.zoo.digits_mlp import DigitsMLP

    mlp, m_acc = trained("mlp", DigitsMLP, epochs=5, lr=5e-4, data=data)
    cnn, c_acc = trained("cnn", DigitsCNN, epochs=15, lr=2e-3, data=data)
    print(f"trained: mlp {m_acc:.1%}, cnn {c_acc:.1%} held-out accuracy", flush=True)
    result = build(spec(mlp, cnn), progress=True)
    failed = [(e.key, e.error) for e in result.failed]
    inputs = data[1][:64]
    torch.set_num_threads(THREADS)
    eager = {"mlp": throughput(eager_runner(f"{ZOO}/digits_mlp.py:DigitsMLP", mlp), inputs, 32, args.seconds),
             "cnn": throughput(eager_runner(f"{ZOO}/digits_cnn.py:DigitsCNN", cnn), inputs, 32, args.seconds)}
    rows = measure([e for e in result.entries if e.passed], inputs, args.seconds)
    out = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(),
           "eager": eager, "rows": rows, "failed": failed, "seconds": time.time() - started}
    out["ratios"] = ratios(rows, eager)
    with open(os.path.join(RESULTS, "optimize.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
    plot(out, os.path.join(RESULTS, "optimize.png"))
    write_section(MARKERS, markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

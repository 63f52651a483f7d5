"""Each exporter and optimizer on small real models, validated the way `tspack build` validates them."""

from __future__ import annotations

import os
import textwrap
import zipfile

import numpy as np
import pytest
import torch

from archiver.build import build
from archiver.errors import BuildError
from archiver.package.archive import read_manifest
from archiver.spec import DeploySpec
from handlers.errors import SpecError
from handlers.spec import parse
from tests import support

ZOO = os.path.join(support.REPO, "archiver", "zoo")


def build_digits(tmp_path, trained, artifacts: list[dict]) -> dict:
    model = support.digits_model("digits", "1.0", trained["weights"], trained["heldout"], artifacts=artifacts)
    spec = parse(DeploySpec, {"model_store": str(tmp_path / "store"), "models": [model]})
    return {e.artifact_id: e for e in build(spec, progress=False).entries}


def test_onnx_export_is_checked_and_matches_eager_at_batch_1_and_n(tmp_path, trained):
    entries = build_digits(tmp_path, trained, [{"format": "onnx"}, {"format": "onnx", "id": "opt",
                                                                      "optimize_graph": True}])
    for entry in entries.values():
        assert entry.passed, entry.error
        assert entry.runtime == "onnxruntime" and entry.max_abs_error < 1e-4 and entry.top1_agreement == 1.0
    import onnx

    with zipfile.ZipFile(entries["main"].archive) as z:
        graph = onnx.load_from_string(z.read("model.onnx")).graph
    assert graph.input[0].name == "input" and graph.output[0].name == "output"
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert "ort-graph-optimized" in entries["opt"].optimizations


TENSOR_INT8 = ("ort-static", "ort-dynamic", "torch-dynamic", "torch-static", "qat", "pt2e")


def test_int8_variants_are_judged_by_task_metrics(int8_store, trained):
    entries = {key: int8_store["entries"][key] for key in TENSOR_INT8}
    for name, entry in entries.items():
        support.int8_archive(int8_store, name)
        assert entry.top1_agreement >= 0.98 and entry.reference_accuracy > 0.9
        assert 100 * (entry.reference_accuracy - entry.accuracy) <= 1.0
        manifest = read_manifest(entry.archive)
        assert manifest.runtime.quantization in ("static-int8", "dynamic-int8", "qat-int8")
        assert manifest.validation["accuracy"] == entry.accuracy
    assert entries["ort-static"].runtime == "onnxruntime-int8"
    assert entries["torch-dynamic"].runtime == "torchscript-int8"
    assert entries["ort-static"].size_bytes < 0.4 * os.path.getsize(trained["weights"])
    assert any("deprecated" in note for note in entries["torch-static"].notes)
    assert entries["pt2e"].runtime == "aoti" and "int8-static-pt2e" in entries["pt2e"].optimizations
    assert not any("deprecated" in note for note in entries["pt2e"].notes)


def test_quantized_artifact_failing_its_accuracy_budget_is_not_packaged(tmp_path, trained):
    """Calibrated on values ~1000x the real range, every input pixel quantizes to zero: the int8 model answers
    one class for every sample, so it certainly misses a zero-point accuracy budget."""
    wrong_range = tmp_path / "wrong_range.npz"
    np.savez(wrong_range, x=np.full((16, 1, 8, 8), 1000.0, np.float32))
    entries = build_digits(tmp_path, trained, [{"format": "onnx", "id": "strict", "quantize": {
        "mode": "static", "calibration_file": str(wrong_range), "min_top1_agreement": 1.0,
        "max_accuracy_drop": 0.0}}])
    entry = entries["strict"]
    assert not entry.passed and entry.archive is None
    assert "validation failed" in entry.error and "top-1 agreement" in entry.error, entry.error
    assert entry.top1_agreement < 0.5
    assert not os.path.exists(tmp_path / "store" / "digits-strict_v1.0.mar")


def test_pruning_reaches_the_sparsity_and_reports_accuracy(tmp_path, trained):
    entries = build_digits(tmp_path, trained, [
        {"format": "torchscript", "id": "l1", "prune": {"method": "l1_unstructured", "amount": 0.3}},
        {"format": "torchscript", "id": "global", "prune": {"method": "global_unstructured", "amount": 0.6,
                                                            "iterations": 2, "finetune": trained["finetune"]}},
    ])
    assert entries["l1"].passed and entries["l1"].sparsity == pytest.approx(0.3, abs=0.01)
    assert entries["global"].passed and entries["global"].sparsity == pytest.approx(0.6, abs=0.01)
    assert entries["global"].accuracy >= entries["global"].reference_accuracy - 0.02
    from archiver.optimize.prune import sparsity

    loaded = torch.jit.load(os.path.join(support.extract(entries["global"].archive, str(tmp_path / "x")), "model.pt"))
    assert sum(int((p == 0).sum()) for p in loaded.parameters()) > 0.5 * sum(p.numel() for p in loaded.parameters()
                                                                             if p.dim() > 1)
    assert sparsity(trained["model"]) < 0.01  # the original was not touched


def test_fp16_without_a_gpu_is_built_but_never_claimed_validated(tmp_path, trained):
    entry = build_digits(tmp_path, trained, [{"format": "torchscript", "id": "half", "precision": "fp16"}])["half"]
    assert entry.passed and entry.validated is False
    assert entry.max_abs_error is None and entry.latency_ms_b1 is None
    manifest = read_manifest(entry.archive)
    assert manifest.validation["validated"] is False and manifest.runtime.precision == "fp16"
    from archiver.package.report import format_table

    assert "BUILT-UNVALIDATED" in format_table([entry])


def test_lstm_exports_to_torchscript_onnx_and_int8_with_a_free_sequence_axis(tmp_path):
    from archiver.zoo.sequence_lstm import SequenceLSTM

    torch.manual_seed(0)
    weights = tmp_path / "lstm.pt"
    torch.save(SequenceLSTM().state_dict(), weights)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "seq.npz", x=rng.standard_normal((24, 12, 8)).astype(np.float32))
    model = {"name": "seq", "version": "1.0", "source": {"model_class": f"{ZOO}/sequence_lstm.py:SequenceLSTM",
                                                          "weights": str(weights)},
             "input": {"shape": [-1, 8]}, "samples": {"file": str(tmp_path / "seq.npz")},
             "artifacts": [{"format": "torchscript"}, {"format": "onnx", "id": "onnx"},
                           {"format": "torchscript", "id": "int8", "quantize": {"mode": "dynamic"}},
                           # random weights leave near-ties between classes: int8 flips some of them
                           {"format": "onnx", "id": "ort-int8", "quantize": {"mode": "dynamic",
                                                                              "min_top1_agreement": 0.8}}]}
    entries = build(parse(DeploySpec, {"model_store": str(tmp_path / "store"), "models": [model]}),
                    progress=False).entries
    assert [e.passed for e in entries] == [True] * 4, [e.error for e in entries]
    from handlers.device import Placement
    from handlers.runtimes import load_runtime

    onnx_dir = support.extract(entries[1].archive, str(tmp_path / "onnx"))
    runtime = load_runtime(read_manifest(entries[1].archive), onnx_dir, Placement("cpu", None, 1))
    assert runtime.run({"input": rng.standard_normal((3, 20, 8)).astype(np.float32)})["output"].shape == (3, 4)


def test_custom_op_symbolic_hook_is_registered_before_export(tmp_path, trained):
    hook = tmp_path / "symbolics.py"
    hook.write_text(textwrap.dedent('''
        import torch
        CALLS = []

        def relu_symbolic(g, x):
            CALLS.append(1)
            return g.op("Relu", x)

        def register(opset):
            torch.onnx.register_custom_op_symbolic("aten::relu", relu_symbolic, opset)
    '''))
    entries = build_digits(tmp_path, trained, [{"format": "onnx", "custom_ops": str(hook)}])
    assert entries["main"].passed
    import sys

    hook_module = next(m for name, m in sys.modules.items() if name.startswith("tspack_src_symbolics_"))
    assert hook_module.CALLS, "the registered symbolic was not used by the exporter"


def test_distillation_gives_a_quarter_size_student_with_95_percent_of_the_teacher(trained):
    from archiver.optimize.distill import distill
    from archiver.zoo.digits_student import DigitsStudent
    from archiver.zoo.digits_training import accuracy

    torch.manual_seed(0)
    student = distill(trained["model"], DigitsStudent(), trained["x_train"], trained["y_train"], epochs=40)
    teacher_params = sum(p.numel() for p in trained["model"].parameters())
    student_params = sum(p.numel() for p in student.parameters())
    teacher_acc = accuracy(trained["model"], trained["x_test"], trained["y_test"])
    student_acc = accuracy(student, trained["x_test"], trained["y_test"])
    assert student_params <= teacher_params / 4
    assert student_acc >= 0.95 * teacher_acc, (student_acc, teacher_acc)


def test_distillation_loss_matches_its_definition():
    from archiver.optimize.distill import distillation_loss

    student, teacher = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([[1.0, 1.0, 0.0]])
    labels = torch.tensor([0])
    t = 3.0
    soft = torch.sum(torch.softmax(teacher / t, -1) * (torch.log_softmax(teacher / t, -1)
                                                        - torch.log_softmax(student / t, -1)))
    hard = torch.nn.functional.cross_entropy(student, labels)
    expected = 0.5 * t * t * soft + 0.5 * hard
    assert distillation_loss(student, teacher, labels, alpha=0.5, temperature=t).item() == pytest.approx(
        expected.item(), rel=1e-5)


@pytest.mark.parametrize("artifact,message", [
    ({"format": "onnx", "quantize": {"mode": "static", "calibration_file": "WRONG"}},
     "quantize.calibration_file: calibration data has shape (450, 64), expected (N, 1, 8, 8)"),
    ({"format": "onnx", "quantise": {"mode": "dynamic"}}, "unknown key 'quantise'"),
    ({"format": "onnx", "quantize": {"mode": "int4"}}, "quantize.mode: 'int4' is not allowed"),
    ({"format": "torchscript", "prune": {"method": "l1_unstructured", "amount": 1.5}},
     "prune.amount: must be between 0 and 1"),
    ({"format": "torchscript", "quantize": {"mode": "qat"}}, "quantize.finetune: mode 'qat' needs a fine-tune"),
    ({"format": "onnx", "quantize": {"mode": "static", "calibration_file": "/nope.npz"}},
     "quantize.calibration_file: file not found"),
])
def test_bad_optimization_specs_are_refused_naming_the_key(tmp_path, trained, artifact, message):
    if artifact.get("quantize", {}).get("calibration_file") == "WRONG":
        flat = tmp_path / "flat.npz"
        np.savez(flat, x=trained["x_test"].reshape(len(trained["x_test"]), -1))
        artifact["quantize"]["calibration_file"] = str(flat)
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build_digits(tmp_path, trained, [artifact])
    assert not (tmp_path / "store").exists() or not any(
        f.endswith(".mar") for f in os.listdir(tmp_path / "store"))


def test_dynamic_int8_refusals_are_clear():
    from torch import nn

    from archiver.optimize.quantize import quantize_dynamic_torch

    with pytest.raises(BuildError, match="TransformerEncoderLayer.*use format: onnx"):
        quantize_dynamic_torch(nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)))
    with pytest.raises(BuildError, match="needs Linear, LSTM or GRU"):
        quantize_dynamic_torch(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_torch_dynamic_int8_quantizes_gru_and_linear_and_traces():
    from torch import nn

    from archiver.optimize.export import to_torchscript
    from archiver.optimize.quantize import quantize_dynamic_torch

    class GRUNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(8, 32, batch_first=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x):
            out, _ = self.gru(x)
            return self.head(out[:, -1])

    torch.manual_seed(0)
    model = GRUNet().eval()
    quantized = quantize_dynamic_torch(model)
    assert isinstance(quantized.gru, torch.ao.nn.quantized.dynamic.GRU)
    assert isinstance(quantized.head, torch.ao.nn.quantized.dynamic.Linear)
    x = torch.randn(16, 12, 8)
    with torch.no_grad():
        assert 0 < float((quantized(x) - model(x)).abs().max()) < 0.05
        traced = to_torchscript(quantized, x[:1], "trace")
        assert torch.equal(traced(x), quantized(x))
        assert traced(torch.randn(3, 20, 8)).shape == (3, 4)  # other batch and sequence lengths


def test_fp16_is_held_to_an_fp16_tolerance_not_the_fp32_one(trained):
    """On a GPU host the fp16 artifact is validated; its criteria must fit half precision (checked on CPU)."""
    from archiver.build import FP16_TOLERANCE, _criteria
    from archiver.optimize.validate import compare
    from archiver.spec import ArtifactSpec, ModelSpec

    model = parse(ModelSpec, support.digits_model("digits", "1.0", trained["weights"], trained["heldout"]))
    fp16, fp32 = parse(ArtifactSpec, {"format": "torchscript", "precision": "fp16"}), parse(ArtifactSpec, {})
    criteria = _criteria(model, fp16)
    assert criteria.tolerance == FP16_TOLERANCE and criteria.min_top1_agreement == 0.99
    eager = trained["model"].eval()
    half = type(eager)()
    half.load_state_dict(eager.state_dict())
    half = half.half().eval()
    inputs = np.load(trained["heldout"])["x"][:64]

    def run(net, dtype):
        def call(named):
            with torch.no_grad():
                return {"output": net(torch.from_numpy(named["input"]).to(dtype)).float().numpy()}
        return call

    named = {"input": inputs}
    figures = compare(run(eager, torch.float32), run(half, torch.float16), named, criteria)
    assert figures.passed, figures.failures
    assert 1e-4 < figures.max_abs_error < FP16_TOLERANCE  # fp32's tolerance would have failed this artifact
    assert not compare(run(eager, torch.float32), run(half, torch.float16), named, _criteria(model, fp32)).passed

"""torch.export at the core: NamedIO, export_program, AOTInductor (compile cache + runtime), dynamo ONNX, pt2e int8.

One tiny two-input model (float features + int64 ids with a free sequence axis) is compiled once per session:
AOTInductor compiles take tens of seconds, every other test reuses it or only exports.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import OrderedDict
from typing import NamedTuple, Optional

import numpy as np
import pytest
import torch
from torch import nn

from archiver.optimize.aoti import compile_aoti, is_quantized, program_digest
from archiver.optimize.export_program import DataDependentControlFlow, export_program
from archiver.optimize.named_io import NamedIO, OutputError, flatten_output
from handlers.device import placement_for
from handlers.errors import RowCountMismatch, ShapeMismatch
from handlers.integrity import sha256_of as sha256_file
from handlers.spec import ArtifactManifest, InputSpec, RuntimeSpec
from tests import support

VOCAB, WIDTH, CLASSES = 20, 4, 3
FREE = {"ids": {1: "seq"}}


class TwoInputs(nn.Module):
    """features (B, 4) float32 + ids (B, L) int64 -> a dict of two outputs of different shapes."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, features: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        pooled = self.embed(ids).mean(1) + features
        return {"logits": self.head(pooled), "pooled": pooled}


class Pair(NamedTuple):
    scores: torch.Tensor
    doubled: torch.Tensor


class TupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x.sum(-1), x * 2


class NamedTupleOut(nn.Module):
    def forward(self, x: torch.Tensor) -> Pair:
        return Pair(x.sum(-1), x * 2)


class ModelOutputLike(OrderedDict):
    """What Hugging Face's ModelOutput is: an OrderedDict whose unset fields are None."""


class Branches(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # the data-dependent branch torch.export must refuse
            return x * 2
        return x - 1


def two_inputs_example(rows: int = 3, length: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"features": torch.randn(rows, WIDTH, generator=generator),
            "ids": torch.randint(0, VOCAB, (rows, length), generator=generator)}


@pytest.fixture(scope="module")
def two_inputs():
    torch.manual_seed(0)
    named = NamedIO(TwoInputs().eval(), ["features", "ids"])
    example = two_inputs_example()
    named.discover(example)
    program, notes = export_program(named, example, FREE)
    return {"named": named, "program": program, "notes": notes, "example": example}


@pytest.fixture(scope="module")
def compiled(two_inputs, tmp_path_factory):
    """The two-input model compiled once (1 thread: the test workers have one), with a compile cache."""
    root = tmp_path_factory.mktemp("aoti")
    path = str(root / "model.pt2")
    cached, seconds = compile_aoti(two_inputs["program"], path, str(root / "cache"), threads=1)
    return {"path": path, "cache": str(root / "cache"), "root": root, "cached": cached, "seconds": seconds}


def eager(named: NamedIO, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = named(*(torch.from_numpy(inputs[n]) for n in named.input_names))
    return {name: value.numpy() for name, value in zip(named.output_names, out)}


# --- NamedIO: calling convention and output names ---

def test_named_io_calls_by_keyword_in_any_spec_order():
    model = TwoInputs().eval()
    example = two_inputs_example()
    named = NamedIO(model, ["ids", "features"])  # not the model's parameter order
    assert named.by_keyword
    assert named.discover(example) == ("logits", "pooled")
    with torch.no_grad():
        logits, pooled = named(example["ids"], example["features"])
        assert torch.equal(logits, model(**example)["logits"])


def test_output_names_of_each_container():
    x = torch.ones(2, 3)
    assert flatten_output(x)[0] == ("output",)
    assert flatten_output(x, ["probs"])[0] == ("probs",)
    assert flatten_output((x, x))[0] == ("output_0", "output_1")
    assert flatten_output([x, x], ["a", "b"])[0] == ("a", "b")
    assert flatten_output(Pair(x, x))[0] == ("scores", "doubled")
    hf = ModelOutputLike(loss=None, logits=x, hidden=x)
    assert flatten_output(hf)[0] == ("logits", "hidden")  # None fields skipped
    assert flatten_output(hf, ["hidden"])[0] == ("hidden",)  # spec names select and order
    with pytest.raises(OutputError, match="returns 2 values; the spec names 3"):
        flatten_output((x, x), ["a", "b", "c"])
    with pytest.raises(OutputError, match="no 'probs'; it returns logits, hidden"):
        flatten_output(hf, ["probs"])
    with pytest.raises(OutputError, match="'nested' is a tuple, not a tensor"):
        flatten_output({"nested": (x, x)})


# --- export_program ---

def test_two_inputs_of_different_shapes_and_dtypes_export_with_shared_batch_and_free_axis(two_inputs):
    program = two_inputs["program"]
    placeholders = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(placeholders) == 2
    module = program.module()
    for rows, length in ((1, 2), (5, 31)):
        example = two_inputs_example(rows, length, seed=rows)
        with torch.no_grad():
            got = module(example["features"], example["ids"])
            want = two_inputs["named"](example["features"], example["ids"])
        assert [tuple(t.shape) for t in got] == [(rows, CLASSES), (rows, WIDTH)]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_unnamed_free_axes_the_model_ties_are_unified_with_a_note():
    class Masked(nn.Module):
        def forward(self, input_ids, attention_mask):
            return (input_ids * attention_mask).sum(1)

    example = {"input_ids": torch.randint(0, 9, (2, 5)), "attention_mask": torch.ones(2, 5, dtype=torch.int64)}
    program, notes = export_program(Masked(), example, {"input_ids": [1], "attention_mask": [1]})
    assert any("suggested fixes" in n for n in notes)
    ids, mask = torch.randint(0, 9, (3, 11)), torch.ones(3, 11, dtype=torch.int64)
    torch.testing.assert_close(program.module()(ids, mask)[0], (ids * mask).sum(1))


@pytest.mark.parametrize(("model", "names", "want"), [
    (TupleOut(), None, ("output_0", "output_1")),
    (TupleOut(), ["total", "doubled"], ("total", "doubled")),
    (NamedTupleOut(), None, ("scores", "doubled")),
])
def test_tuple_and_namedtuple_outputs_export_flat_and_named(model, names, want):
    program, _ = export_program(model, {"x": torch.randn(2, 3)}, output_names=names)
    assert program.named_io_output_names == want
    x = torch.randn(4, 3)
    total, doubled = program.module()(x)
    torch.testing.assert_close(total, x.sum(-1))
    torch.testing.assert_close(doubled, x * 2)


def test_batch_one_example_still_exports_a_dynamic_batch():
    program, _ = export_program(TupleOut(), {"x": torch.randn(1, 3)})
    assert program.module()(torch.randn(6, 3))[0].shape == (6,)


def test_free_axis_example_of_size_one_is_refused():
    with pytest.raises(Exception, match="free axis 1 has size 1; use >= 2"):
        export_program(TwoInputs(), two_inputs_example(length=1), FREE)


def test_strict_failure_falls_back_to_non_strict_with_a_note():
    class GraphBreak(nn.Module):
        def forward(self, x):
            torch._dynamo.graph_break()  # strict export (Dynamo) refuses it; plain Python (non-strict) ignores it
            return x + 1

    program, notes = export_program(GraphBreak(), {"x": torch.randn(2, 3)})
    assert len(notes) == 1 and notes[0].startswith("strict torch.export failed (") and "strict=False" in notes[0]
    torch.testing.assert_close(program.module()(torch.zeros(3, 3))[0], torch.ones(3, 3))


@pytest.mark.parametrize("strict", [None, False])
def test_data_dependent_control_flow_is_refused_with_file_line_and_fix(strict):
    with pytest.raises(DataDependentControlFlow) as info:
        export_program(Branches(), {"x": torch.randn(2, 3)}, strict=strict)
    message = str(info.value)
    assert "\n" not in message
    assert f"{os.path.basename(__file__)}:" in message and "if x.sum() > 0:" in message
    assert "torch.cond" in message and "method: script" in message


def test_program_digest_is_the_same_in_another_process(two_inputs):
    """torch.export.save writes object ids and a random id: the cache key must not see them."""
    code = (f"import sys, torch; sys.path[:0] = [{support.REPO!r}, {os.path.dirname(__file__)!r}]\n"
            "from test_program_export import TwoInputs, two_inputs_example, FREE\n"
            "from archiver.optimize.named_io import NamedIO\n"
            "from archiver.optimize.export_program import export_program\n"
            "from archiver.optimize.aoti import program_digest\n"
            "torch.manual_seed(0)\n"
            "named = NamedIO(TwoInputs().eval(), ['features', 'ids'])\n"
            "print(program_digest(export_program(named, two_inputs_example(), FREE)[0]))\n"
            )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert out.stdout.strip().splitlines()[-1] == program_digest(two_inputs["program"])


# --- AOTInductor: compile cache and runtime ---

def test_second_compile_of_an_unchanged_model_is_a_cache_hit(two_inputs, compiled):
    assert compiled["cached"] is False
    # A fresh export of the same model (new objects, same graph and weights) must hit too.
    torch.manual_seed(0)
    named = NamedIO(TwoInputs().eval(), ["features", "ids"])
    program, _ = export_program(named, two_inputs_example(), FREE)
    again = str(compiled["root"] / "again.pt2")
    start = time.perf_counter()
    cached, seconds = compile_aoti(program, again, compiled["cache"], threads=1)
    assert cached is True
    assert time.perf_counter() - start < 10 and seconds < compiled["seconds"] / 2
    assert sha256_file(again) == sha256_file(compiled["path"])
    assert len(os.listdir(compiled["cache"])) == 1


def test_changed_weights_miss_the_cache(two_inputs, compiled):
    from archiver.optimize.aoti import cache_key

    torch.manual_seed(1)
    other = NamedIO(TwoInputs().eval(), ["features", "ids"])
    program, _ = export_program(other, two_inputs_example(), FREE)
    configs = {"freezing": True, "cpp.threads": 1}
    assert cache_key(program, configs) != cache_key(two_inputs["program"], configs)


def aoti_manifest(path: str, names: tuple[str, ...], outputs: tuple[str, ...],
                  threads: Optional[int] = None) -> ArtifactManifest:
    inputs = (InputSpec(shape=(WIDTH,), dtype="float32", name=names[0]), InputSpec(shape=(-1,), dtype="int64",
                                                                                      name=names[1]))
    runtime = RuntimeSpec(format="aoti", file=os.path.basename(path), sha256=sha256_file(path),
                          intra_op_threads=threads)
    return ArtifactManifest(name="two", version="1.0", frontend="tensor", runtime=runtime, inputs=inputs,
                            outputs=outputs)


@pytest.fixture
def restore_threads():
    """The runtime sets torch's intra-op threads for its worker: give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_aoti_runtime_matches_eager_at_two_batches_and_two_lengths(two_inputs, compiled, tmp_path, restore_threads):
    from ts.context import Context

    from handlers.runtimes.aoti import AotiRuntime

    named = two_inputs["named"]
    manifest = aoti_manifest(compiled["path"], named.input_names, named.output_names)
    context = Context("two", str(tmp_path), {"model": {"modelName": "two"}}, 8, None, "0.12.0",
                      model_yaml_config={"handler": {"intra_op_threads": 1}})
    runtime = AotiRuntime(manifest, compiled["path"], placement_for(context))
    assert runtime.describe()["outputs"] == ["logits", "pooled"]
    assert runtime.describe()["compiled_threads"] == 1  # compile_aoti(threads=1) recorded it in the package
    for rows in (1, 6):
        for length in (2, 17):
            example = two_inputs_example(rows, length, seed=rows * length)
            inputs = {name: tensor.numpy() for name, tensor in example.items()}
            got = runtime.run(inputs)
            want = eager(named, inputs)
            assert list(got) == ["logits", "pooled"]
            for name in want:
                assert got[name].shape == want[name].shape
                np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5)
    # Compiled kernels do not check static axes: the runtime refuses another size rather than read past the end.
    bad = {"features": np.zeros((2, WIDTH + 1), np.float32), "ids": np.zeros((2, 3), np.int64)}
    with pytest.raises(ShapeMismatch, match="input 'features': expected rows of shape \\[4\\]"):
        runtime.run(bad)
    uneven = {"features": np.zeros((2, WIDTH), np.float32), "ids": np.zeros((3, 5), np.int64)}
    with pytest.raises(RowCountMismatch, match="input 'ids': axis 0 has 3 but input 'features' axis 0 has 2"):
        runtime.run(uneven)


# --- ONNX through torch.export ---

def test_dynamo_onnx_round_trip_at_two_lengths(two_inputs, tmp_path):
    import onnxruntime as ort

    from archiver.optimize.onnx_dynamo import to_onnx_dynamo

    named = two_inputs["named"]
    path = str(tmp_path / "model.onnx")
    notes = to_onnx_dynamo(two_inputs["program"], two_inputs["example"], path, named.input_names,
                           named.output_names, opset=17)
    assert not any("legacy" in n for n in notes)
    assert any("raised to 18" in n for n in notes)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features", "ids"]
    assert [o.name for o in session.get_outputs()] == ["logits", "pooled"]
    for rows, length in ((1, 3), (4, 29)):
        inputs = {n: t.numpy() for n, t in two_inputs_example(rows, length, seed=length).items()}
        got = session.run(None, inputs)
        for value, (name, want) in zip(got, eager(named, inputs).items()):
            np.testing.assert_allclose(value, want, atol=1e-5, rtol=1e-5, err_msg=name)


# --- int8: pt2e static ---

def test_pt2e_static_int8_program_stays_close_to_eager():
    from archiver.optimize.pt2e import quantize_pt2e_static, torchao_available

    if not torchao_available():
        pytest.skip("torchao is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    named = NamedIO(model, ["x"])
    calibration = [{"x": torch.randn(8, 16)} for _ in range(4)]
    program, notes = quantize_pt2e_static(named, {"x": torch.randn(4, 16)}, calibration)
    assert "calibrated on 4 batches" in notes[0]
    assert is_quantized(program)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("quantize_per_tensor" in t for t in targets)
    x = torch.randn(5, 16)
    with torch.no_grad():
        got, want = program.module()(x)[0], model(x)
    assert got.shape == (5, 4)
    assert float((got - want).abs().max()) < 0.1


def test_aoti_runtime_warns_when_the_worker_has_other_threads_than_the_kernels(two_inputs, compiled, caplog,
                                                                               restore_threads):
    from handlers.device import Placement
    from handlers.runtimes.aoti import AotiRuntime

    named = two_inputs["named"]
    manifest = aoti_manifest(compiled["path"], named.input_names, named.output_names)
    with caplog.at_level("WARNING", logger="handlers.runtimes.aoti"):
        AotiRuntime(manifest, compiled["path"], Placement(device="cpu", gpu_id=None, threads=2))
    assert "compiled for 1 threads and this worker has 2; rebuild with runtime.intra_op_threads: 2" in caplog.text


def test_torchao_dynamic_int8_exports_and_stays_close_to_eager():
    from archiver.optimize.pt2e import torchao_available
    from archiver.optimize.torchao_int8 import quantize_torchao

    if not torchao_available():
        pytest.skip("torchao is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    quantized = quantize_torchao(model, "dynamic")
    assert type(model[0].weight) is nn.Parameter  # the original stays fp32
    program, _ = export_program(quantized, {"x": torch.randn(4, 64)})
    x = torch.randn(3, 64)
    with torch.no_grad():
        got, want = program.module()(x)[0], model(x)
    assert float((got - want).abs().max()) < 0.1


def test_pt2e_int8_package_runs_int8_kernels(tmp_path):
    """Freezing picks oneDNN's int8 linear; without it (or with grad on while compiling, which silently skips
    freezing) the package dequantizes the weights and runs fp32 GEMMs, 5x slower on the digits MLP."""
    import zipfile

    from torch._inductor import aoti_load_package

    from archiver.optimize.pt2e import quantize_pt2e_static, torchao_available

    if not torchao_available():
        pytest.skip("torchao is not installed")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    named = NamedIO(model, ["x"])
    program, _ = quantize_pt2e_static(named, {"x": torch.randn(4, 16)}, [{"x": torch.randn(8, 16)}])
    path = str(tmp_path / "int8.pt2")
    compile_aoti(program, path, None, threads=1)  # freezing=None: on, because the program is quantized
    with zipfile.ZipFile(path) as package:
        wrapper = next(package.read(n).decode() for n in package.namelist() if n.endswith("wrapper.cpp"))
    assert "qlinear_pointwise" in wrapper
    x = torch.randn(3, 16)
    with torch.no_grad():
        got, want = aoti_load_package(path)(x)[0], model(x)
    assert float((got - want).abs().max()) < 0.1

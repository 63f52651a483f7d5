"""GPU placement: model-config device settings, refusals, and TorchServe's worker-to-GPU logic reproduced."""

from __future__ import annotations

import zipfile

import pytest
import yaml

from archiver.deploy.placement import Deployed, assign, device_config, placement_table
from archiver.spec import ServingSpec
from handlers.errors import SpecError
from handlers.spec import parse
from tests import support


def serving(**kwargs) -> ServingSpec:
    return parse(ServingSpec, kwargs)


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
def test_all_gpus_with_workers_per_gpu(gpus):
    config = device_config(serving(devices="all", workers_per_gpu=2), gpus)
    assert config == {"deviceType": "gpu", "deviceIds": list(range(gpus)), "minWorkers": 2 * gpus,
                      "maxWorkers": 2 * gpus}
    placement = assign([Deployed("m", config["minWorkers"], "gpu", tuple(config["deviceIds"]))], gpus)
    assert sorted(placement["m"]) == sorted(list(range(gpus)) * 2)


@pytest.mark.parametrize("gpus,expected", [(1, [0, 0, 0]), (2, [1, 0, 1]), (4, [1, 2, 3]), (8, [1, 2, 3])])
def test_without_device_ids_torchserve_round_robins_from_gpu_one(gpus, expected):
    """WorkLoadManager's shared counter: ++prev % number_of_gpu, starting at 0."""
    assert assign([Deployed("m", 3, "gpu")], gpus)["m"] == expected


def test_the_shared_counter_spans_models_but_device_ids_do_not():
    placement = assign([Deployed("a", 2), Deployed("pinned", 3, "gpu", (3, 1)), Deployed("b", 2),
                        Deployed("c", 1, "cpu")], 4)
    assert placement == {"a": [1, 2], "pinned": [3, 1, 3], "b": [3, 0], "c": [None]}
    table = placement_table(placement, 4)
    assert table.splitlines()[0].split() == ["model", "gpu0", "gpu1", "gpu2", "gpu3", "cpu"]
    assert table.splitlines()[3].split() == ["pinned", "-", "1", "-", "2", "-"]


def test_out_of_range_ids_are_dropped_like_torchserve_does():
    assert assign([Deployed("m", 2, "gpu", (0, 5))], 2)["m"] == [1, 0]


def test_no_gpu_on_the_host_means_cpu_workers():
    assert assign([Deployed("m", 2, "gpu", (0, 1))], 0)["m"] == [None, None]


@pytest.mark.parametrize("kwargs,gpus,message", [
    ({"devices": [0, 3]}, 2, "GPU 3 does not exist on a target host with 2 GPU"),
    ({"devices": [0]}, 0, "lists GPU 0, but the target host has 0 GPUs"),
    ({"devices": "all", "cpu_fallback": False}, 0, "needs GPUs, but the target host has none"),
])
def test_impossible_placements_are_refused(kwargs, gpus, message):
    with pytest.raises(SpecError, match=message):
        device_config(serving(**kwargs), gpus)


def test_cpu_fallback_for_all_gpus_on_a_cpu_host():
    assert device_config(serving(devices="all", workers=3), 0) == {"deviceType": "gpu", "minWorkers": 3,
                                                                  "maxWorkers": 3}


@pytest.mark.parametrize("kwargs,message", [
    ({"workers": -2}, "serving.workers: must be >= 1, got -2"),
    ({"batch_size": 1, "max_batch_delay_ms": 5}, "serving.max_batch_delay_ms: 5 ms of batch delay without batching"),
    ({"batch_size": 8, "max_batch_delay_ms": 0}, "serving.max_batch_delay_ms: must be >= 1 with batching"),
    ({"devices": [1, 1]}, "serving.devices: a list of distinct GPU ids"),
    ({"devices": "gpus"}, "devices: 'gpus' is not allowed; expected 'cpu', 'all' or a list"),
    ({"workers_per_gpu": 0}, "serving.workers_per_gpu: must be >= 1"),
])
def test_bad_serving_values_name_the_key(kwargs, message):
    with pytest.raises(SpecError, match=message):
        serving(**kwargs)


def test_build_and_config_for_a_multi_gpu_host(tmp_path, digits_store):
    """Build for a 4-GPU host on this CPU machine; config for 4 GPUs prints the placement, for 2 refuses."""
    store = str(tmp_path / "store")
    from archiver.build import build
    from archiver.spec import DeploySpec

    model = support.digits_model("digits", "1.0", digits_store["weights"]["1.0"], digits_store["samples"],
                                 serving={"devices": [2, 3], "workers_per_gpu": 2, "batch_size": 4})
    result = build(parse(DeploySpec, {"model_store": store, "models": [model], "gpus": 4}), progress=False)
    assert not result.failed
    with zipfile.ZipFile(result.entries[0].archive) as z:
        config = yaml.safe_load(z.read("model-config.yaml"))
    assert (config["deviceType"], config["deviceIds"], config["minWorkers"]) == ("gpu", [2, 3], 4)
    config = ("config", "--model-store", store, "--load", "digits_v1.0.mar")
    four = support.tspack(*config, "--gpus", "4", "--out", str(tmp_path / "c4.properties"))
    assert four.returncode == 0, four.stderr
    assert "number_of_gpu=4" in (tmp_path / "c4.properties").read_text()
    row = [line for line in four.stdout.splitlines() if line.startswith("digits ") and "gpu" not in line][-1]
    assert row.split() == ["digits", "-", "-", "2", "2", "-"]
    two = support.tspack(*config, "--gpus", "2", "--out", str(tmp_path / "c2.properties"))
    assert two.returncode == 2 and "places workers on GPUs [2, 3], but this host has 2" in two.stderr
    with pytest.raises(SpecError, match=r"models.digits.serving.devices: GPU 2 does not exist"):
        build(parse(DeploySpec, {"model_store": str(tmp_path / "s2"), "models": [model], "gpus": 2}), progress=False)


# The handler side of placement. No GPU here, so CUDA's presence is faked at the one place each runtime asks;
# what is checked is the device and provider options a worker would use for the gpu_id TorchServe gives it.
@pytest.mark.parametrize("gpu_id", [0, 1, 3, 7])
def test_torch_worker_goes_to_the_gpu_torchserve_assigned(digits_dir, monkeypatch, gpu_id):
    import handlers.device as device

    monkeypatch.setattr(device, "_cuda_available", lambda: True)
    placement = device.placement_for(support.make_context(digits_dir, gpu=gpu_id))
    assert (placement.device, placement.gpu_id, placement.is_cuda) == (f"cuda:{gpu_id}", gpu_id, True)


def test_torch_worker_stays_on_cpu_without_a_gpu_id_or_without_cuda(digits_dir, monkeypatch):
    import handlers.device as device

    monkeypatch.setattr(device, "_cuda_available", lambda: True)
    assert device.placement_for(support.make_context(digits_dir)).device == "cpu"
    monkeypatch.setattr(device, "_cuda_available", lambda: False)
    placement = device.placement_for(support.make_context(digits_dir, gpu=2))
    assert (placement.device, placement.gpu_id) == ("cpu", 2)


def test_gpu_only_archive_refuses_a_cpu_worker(digits_dir):
    from handlers.device import placement_for
    from handlers.errors import ModelLoadError

    context = support.make_context(digits_dir)
    context.model_yaml_config["handler"] = {"cpu_fallback": False}
    with pytest.raises(ModelLoadError, match="requires a GPU"):
        placement_for(context)


def test_onnx_runtime_uses_the_cuda_provider_on_the_assigned_gpu(monkeypatch):
    import onnxruntime

    from handlers.runtimes.onnx import providers_for

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert providers_for(5) == [("CUDAExecutionProvider", {"device_id": 5}), "CPUExecutionProvider"]
    assert providers_for(None) == ["CPUExecutionProvider"]
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers_for(5) == ["CPUExecutionProvider"]

"""Worker placement on a multi-GPU host, with TorchServe's own frontend deciding.

No GPU is here, so TorchServe is told there are 1, 2, 4 or 8 (CUDA_VISIBLE_DEVICES=0,...,n-1, which its GPU
detection reads before nvidia-smi). Workers then receive GPU ids; the handlers, finding no CUDA in
this torch build, log the id they were given and run on the CPU. The ids the workers report must be
the ones `archiver.deploy.placement.assign` predicts from the same archives.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from archiver.build import build
from archiver.deploy.placement import assign
from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from archiver.spec import DeploySpec
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration

PLACEMENT_LINE = re.compile(r"W-\d+-(?P<model>[\w.-]+?)_(?P<version>[\d.]+)-stdout MODEL_LOG - "
                            r"tspack placement: gpu_id=(?P<gpu>\w+)")


# gpus -> ({model: serving settings}, the placement TorchServe must make)
LAYOUTS = {
    1: ({"pinned": {"devices": [0], "workers_per_gpu": 2}, "cpuonly": {"devices": "cpu", "workers": 1}},
        {"pinned": [0, 0], "cpuonly": [None]}),
    2: ({"pinned": {"devices": [1], "workers_per_gpu": 1}, "spread": {"devices": "all", "workers_per_gpu": 1}},
        {"pinned": [1], "spread": [0, 1]}),
    4: ({"pinned": {"devices": [1, 3], "workers_per_gpu": 1}, "spread": {"devices": "all", "workers_per_gpu": 1},
         "cpuonly": {"devices": "cpu", "workers": 1}},
        {"pinned": [1, 3], "spread": [0, 1, 2, 3], "cpuonly": [None]}),
    8: ({"pinned": {"devices": [5, 7], "workers_per_gpu": 1}, "spread": {"devices": "all", "workers_per_gpu": 1}},
        {"pinned": [5, 7], "spread": list(range(8))}),
}


def reported_placement(log_dir: str) -> dict[str, list]:
    reported = defaultdict(list)
    with open(f"{log_dir}/model_log.log", encoding="utf-8") as f:
        for match in PLACEMENT_LINE.finditer(f.read()):
            gpu = match.group("gpu")
            reported[match.group("model")].append(None if gpu == "None" else int(gpu))
    return {m: sorted(g, key=str) for m, g in reported.items()}


@pytest.mark.parametrize("gpus", sorted(LAYOUTS))
def test_workers_land_on_the_gpus_the_config_promises(digits_store, tmp_path, gpus):
    layout, promised = LAYOUTS[gpus]
    store = str(tmp_path / "store")
    weights, samples = digits_store["weights"]["1.0"], digits_store["samples"]
    models = [support.digits_model(name, "1.0", weights, samples, serving=serving) for name, serving in layout.items()]
    result = build(parse(DeploySpec, {"model_store": store, "models": models, "gpus": gpus}), progress=False)
    assert not result.failed, [e.error for e in result.failed]
    entries = [entry_from_archive(f"{name}_v1.0.mar", store, gpus=gpus) for name in layout]
    expected = assign([e.deployed for e in entries], gpus)
    assert expected == promised, "the pack's copy of TorchServe's rule"
    devices = ",".join(str(i) for i in range(gpus))
    handle = support.start_server(str(tmp_path), store, entries, number_of_gpu=gpus,
                                  env={"CUDA_VISIBLE_DEVICES": devices, "TSPACK_INTRA_OP_THREADS": "1"})
    try:
        workers = sum(len(v) for v in expected.values())
        reported = support.wait_until(lambda: (lambda r: r if sum(map(len, r.values())) >= workers else None)(
            reported_placement(handle.log_dir)), timeout_s=60) or reported_placement(handle.log_dir)
        assert reported == {m: sorted(g, key=str) for m, g in expected.items()}
        client = handle.client()
        for name in layout:  # a worker handed a GPU id still serves, on the CPU here
            assert client.predict(name, {"data": [[[0.0] * 8] * 8]}).status_code == 200
    finally:
        stop(handle.run_dir)

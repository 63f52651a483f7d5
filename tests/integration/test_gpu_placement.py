"""Worker placement on a multi-GPU host, with TorchServe's own frontend deciding.

No GPU is here, so TorchServe is told there are four (CUDA_VISIBLE_DEVICES=0,1,2,3, which its GPU
detection reads before nvidia-smi). Workers then receive GPU ids; the handlers, finding no CUDA in
this torch build, log the id they were given and run on the CPU. The ids the workers report must be
the ones `archiver.placement.assign` predicts from the same archives.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import pytest

from archiver.build import build
from archiver.cli import entry_from_archive
from archiver.placement import assign
from archiver.server import stop
from archiver.spec import DeploySpec
from handlers.spec import parse
from tests import support

pytestmark = pytest.mark.integration

PLACEMENT_LINE = re.compile(r"W-\d+-(?P<model>[\w.-]+?)_(?P<version>[\d.]+)-stdout MODEL_LOG - "
                            r"tspack placement: gpu_id=(?P<gpu>\w+)")


def test_workers_land_on_the_gpus_the_config_promises(digits_store, tmp_path):
    store = str(tmp_path / "store")
    weights, samples = digits_store["weights"]["1.0"], digits_store["samples"]
    models = [
        support.digits_model("pinned", "1.0", weights, samples, serving={"devices": [1, 3], "workers_per_gpu": 1}),
        support.digits_model("spread", "1.0", weights, samples, serving={"devices": "all", "workers_per_gpu": 1}),
        support.digits_model("cpuonly", "1.0", weights, samples, serving={"devices": "cpu", "workers": 1}),
    ]
    result = build(parse(DeploySpec, {"model_store": store, "models": models, "gpus": 4}), progress=False)
    assert not result.failed, [e.error for e in result.failed]
    entries = [entry_from_archive(f"{name}_v1.0.mar", store, gpus=4) for name in ("pinned", "spread", "cpuonly")]
    expected = assign([e.deployed for e in entries], 4)
    handle = support.start_server(str(tmp_path), store, entries, number_of_gpu=4,
                                  env={"CUDA_VISIBLE_DEVICES": "0,1,2,3", "TSPACK_INTRA_OP_THREADS": "1"})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            reported = defaultdict(list)
            with open(f"{handle.log_dir}/model_log.log", encoding="utf-8") as f:
                for match in PLACEMENT_LINE.finditer(f.read()):
                    gpu = match.group("gpu")
                    reported[match.group("model")].append(None if gpu == "None" else int(gpu))
            if sum(len(v) for v in reported.values()) >= sum(len(v) for v in expected.values()):
                break
            time.sleep(0.5)
        assert {m: sorted(g, key=str) for m, g in reported.items()} == \
            {m: sorted(g, key=str) for m, g in expected.items()}
        assert expected == {"pinned": [1, 3], "spread": [0, 1, 2, 3], "cpuonly": [None]}
        client = handle.client()
        for name in ("pinned", "spread", "cpuonly"):  # a worker handed a GPU id still serves, on the CPU here
            assert client.predict(name, {"data": [[[0.0] * 8] * 8]}).status_code == 200
    finally:
        stop(handle.run_dir)

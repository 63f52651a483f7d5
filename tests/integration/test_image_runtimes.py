"""Image, ONNX and int8 archives in a real TorchServe answer like the in-process eager model."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from archiver.deploy.properties import entry_from_archive
from archiver.operate.server import stop
from handlers.frontends.image import preprocess
from handlers.spec import ImageSpec
from tests import support

pytestmark = pytest.mark.integration

ARCHIVES = {  # archives of the session's int8_store (tests/conftest.py): serving batch 4, delay 300 ms
    "digits-image": "torchscript",
    "digits-image-onnx": "onnxruntime",
    "digits-image-int8": "onnxruntime-int8",
    "digits-torch-dynamic": "torchscript-int8",
}


@pytest.fixture(scope="module")
def server(int8_store, tmp_path_factory):
    store = int8_store["store"]
    for name in ARCHIVES:
        support.int8_archive(int8_store, name.removeprefix("digits-"))
    entries = [entry_from_archive(f"{name}_v1.0.mar", store) for name in ARCHIVES]
    handle = support.start_server(str(tmp_path_factory.mktemp("image-runtimes")), store, entries)
    yield handle
    stop(handle.run_dir)


@pytest.fixture(scope="module")
def held_out(trained):
    x = trained["x_test"][:40]
    pngs = [support.digit_png(row) for row in x]
    pixels = np.stack([preprocess(png, ImageSpec(**support.IMAGE_SPEC)) for png in pngs])
    return {"x": x, "pngs": pngs, "pixels": pixels,
            "eager": support.softmax(support.eager_outputs(trained["weights"], pixels))}


def test_each_runtime_reports_itself(server):
    client = server.client()
    for name, runtime in ARCHIVES.items():
        described = client.describe(name, "1.0", customized=True)[0]["customizedMetadata"]
        assert described["runtime"]["runtime"] == runtime
        if "int8" in runtime:
            assert described["runtime"]["quantization"] in ("static-int8", "dynamic-int8")
        assert described["validation"]["passed"] is True


def predict_all(client, name: str, **requests) -> list:
    """Four at a time, so TorchServe batches fill at once instead of waiting out the batch delay."""
    from concurrent.futures import ThreadPoolExecutor

    key, items = next(iter(requests.items()))
    with ThreadPoolExecutor(max_workers=4) as pool:
        if key == "pngs":
            return list(pool.map(lambda png: client.predict(name, data=png, content_type="image/png"), items))
        return list(pool.map(lambda row: client.predict(name, {"data": row.tolist()}), items))


@pytest.mark.parametrize("name", ["digits-image", "digits-image-onnx"])
def test_fp32_image_runtimes_agree_with_eager(server, held_out, name):
    client = server.client()
    for response, expected in zip(predict_all(client, name, pngs=held_out["pngs"]), held_out["eager"]):
        assert response.status_code == 200, response.text
        top = response.json()["predictions"][0]
        assert top["index"] == int(expected.argmax())
        assert top["probability"] == pytest.approx(float(expected.max()), abs=1e-4)


def test_int8_runtimes_keep_top1_agreement(server, held_out):
    client = server.client()
    image_int8 = [r.json() for r in predict_all(client, "digits-image-int8", pngs=held_out["pngs"])]
    tensor_int8 = [r.json() for r in predict_all(client, "digits-torch-dynamic", rows=held_out["pixels"])]
    expected = held_out["eager"].argmax(1)
    for answers in (image_int8, tensor_int8):
        agreement = np.mean([a["predictions"][0]["index"] == e for a, e in zip(answers, expected)])
        assert agreement >= 0.95


def test_multipart_upload_like_curl_dash_f(server, held_out):
    response = server.client().predict("digits-image-onnx", files={"data": ("digit.png", held_out["pngs"][0],
                                                                            "image/png")})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["index"] == int(held_out["eager"][0].argmax())


def test_one_corrupt_image_among_three_good_in_one_batch(server, held_out):
    client = server.client()
    bodies = [held_out["pngs"][1], held_out["pngs"][2][:40], held_out["pngs"][3], held_out["pngs"][4]]
    results: list = [None] * 4
    barrier = threading.Barrier(4)
    histogram = {part: (f"tspack_batch_size_{part}", {"ModelName": "digits-image-onnx"}) for part in ("count", "sum")}
    before = support.settled_metrics(client)

    def send(i: int) -> None:
        barrier.wait()
        results[i] = client.predict("digits-image-onnx", data=bodies[i], content_type="image/png")

    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [200, 422, 200, 200]
    assert results[1].json()["type"] == "undecodable_image"
    for i, r in zip((1, 3, 4), (results[0], results[2], results[3])):
        assert r.json()["predictions"][0]["index"] == int(held_out["eager"][i].argmax())
    # the batch-size histogram proves the four requests reached the handler as one TorchServe batch
    deltas = support.wait_for_deltas(client, before, histogram, lambda d: d["count"] >= 1)
    assert deltas == {"count": 1, "sum": 4}, deltas

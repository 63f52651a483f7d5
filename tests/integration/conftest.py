"""Fixtures shared by the Open Inference Protocol tests (test_oip.py: TorchServe's own routes; test_oip_gateway.py:
the tspack gateway). A module using them defines `server` (a started ServerHandle) and `oip_url` (the endpoint its
OIP calls go to), so each module says which endpoint it tests."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def key(server) -> str:
    """The server's inference token."""
    with open(server.key_file, encoding="utf-8") as f:
        return json.load(f)["inference"]["key"]


@pytest.fixture
def auth(key) -> dict:
    """A fresh dict per test: tritonclient's infer() writes its Inference-Header-Content-Length into `headers`."""
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def triton(oip_url):
    """tritonclient's HTTP client on the module's OIP endpoint."""
    # Imported here: tritonclient is optional, and this conftest serves every integration module.
    from tritonclient.http import InferenceServerClient

    client = InferenceServerClient(oip_url.removeprefix("http://"))
    yield client
    client.close()

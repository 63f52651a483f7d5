"""Function nodes of the A/B workflow (`.war`): `route` picks the variant, `merge` keeps its answer.

TorchServe's DAG executor sends every request to every model node, so `route` wraps each request in a
routing envelope naming the chosen variant; the base handler of every other node answers at once
without inference, and `merge` returns the chosen node's answer. The workflow archiver copies flat
files only, so the archive carries the `handlers` package as a zip that this module puts on sys.path.

Known limits of TorchServe 0.12's workflow executor, not of this module: the HTTP status is always 200
(errors arrive as JSON bodies with a "status" field), and a fast node's answer can be lost (see
BENCHMARKS.md for the stall rate and the mitigation the generated spec applies).
"""

import json
import os
import sys

HANDLERS_ZIP = "tspack_handlers.zip"
_zip = os.path.join(os.path.dirname(os.path.abspath(__file__)), HANDLERS_ZIP)
if os.path.exists(_zip) and _zip not in sys.path:
    sys.path.insert(0, _zip)

from handlers.errors import PayloadTooLarge, TspackError, error_response  # noqa: E402
from handlers.request import requests_from_batch  # noqa: E402
from handlers.routing import ROUTER_MANIFEST_FILE, SKIPPED, RouterManifest, json_body, wrap, wrap_error  # noqa: E402

_policy = {}


def _load_policy(context):
    if "policy" not in _policy:
        path = os.path.join(context.system_properties["model_dir"], ROUTER_MANIFEST_FILE)
        with open(path, encoding="utf-8") as f:
            manifest = RouterManifest.from_json(json.load(f))
        _policy["policy"], _policy["max_body_bytes"] = manifest.policy, manifest.max_body_bytes
    return _policy["policy"]


def route(data, context):
    """Wrap each request with the variant it goes to (sticky by key, else weighted at random)."""
    if data is None:  # TorchServe's first call, at load
        _load_policy(context)
        return None
    policy = _load_policy(context)
    limit = _policy["max_body_bytes"]
    envelopes = []
    for request in requests_from_batch(data, context):
        try:
            size = len(request.payload) if isinstance(request.payload, (bytes, bytearray, str)) else 0
            if limit is not None and size > limit:
                # the base64 envelope must fit TorchServe's max_response_size, or the frontend drops this worker
                raise PayloadTooLarge(f"body has {size} bytes; this workflow accepts at most {limit}")
            key = policy.key_of(request, json_body(request) if policy.sticky_field else None)
            envelopes.append(wrap(policy.choose(key).name, request, key))
        except TspackError as exc:
            envelopes.append(wrap_error(error_response(exc)[2]))
    return envelopes


def merge(data, context):
    """Keep the answer of the node that ran; the other nodes answered {"tspack_skipped": true}."""
    if data is None:
        return None
    merged = []
    for row in data:
        chosen = None
        for value in row.values():
            text = value.decode("utf-8", "replace") if isinstance(value, (bytes, bytearray)) else str(value)
            try:
                answer = json.loads(text)
            except ValueError:
                answer = {"error": text[:200], "type": "invalid_node_answer", "status": 500}
            if answer != SKIPPED:
                chosen = answer if chosen is None or "error" in chosen else chosen
        merged.append(json.dumps(chosen if chosen is not None else {"error": "no variant answered",
                                                                    "type": "routing_error", "status": 500}))
    return merged

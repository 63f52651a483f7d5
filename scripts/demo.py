"""`make demo`: train, build, serve, version and query the digits model, the way a user would.

Every step runs the same `tspack` command or `curl` a user would type, and prints it first.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
STORE = "model_store"
WORK = os.path.join(STORE, "work")
SENTIMENT = os.path.join(WORK, "sentiment")
CONFIG = os.path.join(STORE, "config.properties")
RUN_DIR = os.path.join(".tspack", "server")
KEY_FILE = os.path.join(RUN_DIR, "key_file.json")
INFERENCE = "http://127.0.0.1:8080"
OIP_GATEWAY = "http://127.0.0.1:8083"  # the default of tspack config --oip-port


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def run(*cmd: str, capture: bool = False) -> str:
    shown = " ".join(shlex.quote(c) for c in cmd).replace(BIN + "/", "")
    print(f"$ {shown}", flush=True)
    result = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=capture)
    if result.returncode != 0:
        if capture:
            sys.stdout.write(result.stdout + result.stderr)
        sys.exit(f"demo: step failed (exit {result.returncode}): {shown}")
    return result.stdout if capture else ""


def tspack(*args: str, capture: bool = False) -> str:
    return run(os.path.join(BIN, "tspack"), *args, capture=capture)


def inference_key() -> str:
    with open(os.path.join(ROOT, KEY_FILE), encoding="utf-8") as f:
        return json.load(f)["inference"]["key"]


def curl_predict(path: str, body_file: str, key: str) -> dict:
    cmd = ["curl", "-s", f"{INFERENCE}/predictions/{path}", "-H", f"Authorization: Bearer {key}",
           "-H", "Content-Type: application/json", "--data-binary", f"@{body_file}"]
    print(f'$ curl -s {INFERENCE}/predictions/{path} -H "Authorization: Bearer $KEY" '
          f'-H "Content-Type: application/json" --data-binary @{body_file}', flush=True)
    out = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=True).stdout
    return json.loads(out)



def oip_with_tritonclient(key: str) -> None:
    """What a KServe/Triton client does: check readiness, read the model's metadata, infer with binary tensors."""
    import tritonclient.http as oip

    gateway = OIP_GATEWAY.split("//", 1)[1]
    print(f'  tritonclient.http.InferenceServerClient("{gateway}"), headers {{"Authorization": "Bearer $KEY"}}')
    client = oip.InferenceServerClient(gateway)
    headers = {"Authorization": f"Bearer {key}"}
    print(f"  server live: {client.is_server_live()}, ready: {client.is_server_ready()}; "
          f"digits 1.0 ready: {client.is_model_ready('digits', '1.0')}")
    meta = client.get_model_metadata("digits", headers=headers)
    spec_in, spec_out = meta["inputs"][0], meta["outputs"][0]
    print(f"  metadata: versions {meta['versions']}, platform {meta['platform']}, input {spec_in['name']} "
          f"{spec_in['datatype']} {spec_in['shape']}, output {spec_out['name']} {spec_out['datatype']} "
          f"{spec_out['shape']}")
    with open(os.path.join(WORK, "heldout_0.json"), encoding="utf-8") as f:
        x = np.asarray(json.load(f)["data"], dtype=np.float32)[None]
    tensor = oip.InferInput(spec_in["name"], list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    for version in ("1.0", "2.0"):
        result = client.infer("digits", [tensor], model_version=version, headers=headers)
        scores = result.as_numpy(spec_out["name"])
        print(f"  -> infer digits {version} (binary): {spec_out['name']} shape {list(scores.shape)}, "
              f"top class {int(np.argmax(scores[0]))}")

def served_accuracy(version: str, x: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of one served version on the held-out set, one HTTP request per image."""
    sys.path.insert(0, ROOT)
    from archiver.operate.server import ServerHandle

    client = ServerHandle.load(os.path.join(ROOT, RUN_DIR)).client()

    def predict(i: int) -> int:
        response = client.predict("digits", {"data": x[i].tolist()}, version=version)
        response.raise_for_status()
        return response.json()["predictions"][0]["index"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        predicted = list(pool.map(predict, range(len(x))))
    return float(np.mean(np.array(predicted) == y))


def served_latency(model: str, x: np.ndarray, count: int = 300) -> tuple[float, float]:
    """p50 and p90 (ms) of `count` sequential requests from one client: what a lone caller waits."""
    import time

    from archiver.operate.server import ServerHandle

    client = ServerHandle.load(os.path.join(ROOT, RUN_DIR)).client()
    times = []
    for i in range(count + 20):
        started = time.perf_counter()
        client.predict(model, {"data": x[i % len(x)].tolist()}).raise_for_status()
        if i >= 20:  # the first requests warm the connection and the worker
            times.append((time.perf_counter() - started) * 1000.0)
    return float(np.percentile(times, 50)), float(np.percentile(times, 90))


def curl_text(model: str, sentence: str, key: str) -> dict:
    cmd = ["curl", "-s", f"{INFERENCE}/predictions/{model}", "-H", f"Authorization: Bearer {key}",
           "-H", "Content-Type: text/plain", "--data-binary", sentence]
    print(f'$ curl -s {INFERENCE}/predictions/{model} -H "Authorization: Bearer $KEY" -H "Content-Type: text/plain" '
          f'--data-binary {shlex.quote(sentence)}', flush=True)
    return json.loads(subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=True).stdout)


def served_text_accuracy(chunk: int = 64) -> float:
    """Held-out texts sent {"texts": [...]} `chunk` at a time; the top label against the true one."""
    from archiver.operate.server import ServerHandle

    client = ServerHandle.load(os.path.join(ROOT, RUN_DIR)).client()
    with open(os.path.join(SENTIMENT, "heldout.json"), encoding="utf-8") as f:
        held_out = json.load(f)
    texts, labels = held_out["texts"], held_out["labels"]
    right = 0
    for start in range(0, len(texts), chunk):
        response = client.predict("sentiment", {"texts": texts[start:start + chunk]})
        response.raise_for_status()
        predicted = [row["predictions"][0]["label"] for row in response.json()["results"]]
        right += sum(p == t for p, t in zip(predicted, labels[start:start + chunk]))
    return right / len(texts)


def curl_image(model: str, png: str, key: str, multipart: bool) -> dict:
    """POST a PNG with curl: as a multipart form field (curl -F) or as the raw body."""
    body = ["-F", f"data=@{png}"] if multipart else ["-H", "Content-Type: image/png", "--data-binary", f"@{png}"]
    cmd = ["curl", "-s", f"{INFERENCE}/predictions/{model}", "-H", f"Authorization: Bearer {key}", *body]
    shown = " ".join(shlex.quote(c) for c in cmd).replace(shlex.quote(f"Authorization: Bearer {key}"),
                                                         '"Authorization: Bearer $KEY"')
    print(f"$ {shown}", flush=True)
    return json.loads(subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=True).stdout)


def curl_ab(path: str, user: str, body_file: str, key: str, show: bool) -> dict:
    name = "digits-ab"
    cmd = ["curl", "-s", f"{INFERENCE}/{path}/{name}", "-H", f"Authorization: Bearer {key}", "-H",
           f"X-Request-Key: {user}", "-H", "Content-Type: application/json", "--data-binary", f"@{body_file}"]
    if show:
        print(f'$ curl -s {INFERENCE}/{path}/{name} -H "Authorization: Bearer $KEY" -H "X-Request-Key: {user}" '
              f'-H "Content-Type: application/json" --data-binary @{body_file}', flush=True)
    return json.loads(subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, check=True).stdout)


def demo_users() -> list[str]:
    """Three users of whom at least one lands on each arm (the split is by SHA-256 of the key and the salt)."""
    sys.path.insert(0, ROOT)
    from handlers.routing import RoutingPolicy, Variant

    policy = RoutingPolicy(variants=(Variant("a", 0.5), Variant("b", 0.5)), salt="digits-ab")
    names = ["alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"]
    first = names[0]
    other = next(n for n in names if policy.choose(n).name != policy.choose(first).name)
    return [first, other, next(n for n in names if n not in (first, other))]


def ab_split(samples: np.ndarray, keys: int) -> dict:
    """Key i sends held-out digit i (cycling), so the shadow's agreement figures mean something."""
    from archiver.operate.server import ServerHandle

    client = ServerHandle.load(os.path.join(ROOT, RUN_DIR)).client()

    def variant(i: int) -> str:
        body = {"data": samples[i % len(samples)].tolist()}
        return client.predict("digits-ab", body, headers={"X-Request-Key": f"user-{i}"}).json()["variant"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        variants = list(pool.map(variant, range(keys)))
    return {v: variants.count(v) / keys for v in ("a", "b")}


def show_ab_metrics() -> None:
    import time

    import requests

    from archiver.operate.status import parse_prometheus

    time.sleep(2.5)  # the shadow compares off the answer path; counters are flushed every second
    print("$ curl -s http://127.0.0.1:8082/metrics | grep 'ModelName=\"digits-ab\"'")
    text = requests.get("http://127.0.0.1:8082/metrics", timeout=10).text
    for line in text.splitlines():
        if 'ModelName="digits-ab"' in line and line.startswith(("tspack_requests_total", "tspack_shadow_total")):
            print("  " + line)
    shadow: dict[str, dict[str, float]] = {}
    for name, labels, value in parse_prometheus(text):
        if name == "tspack_shadow_total" and labels.get("ModelName") == "digits-ab":
            shadow.setdefault(labels["Primary"], {})[labels["Outcome"]] = value
    for primary, counts in sorted(shadow.items()):
        total = sum(counts.values())
        if total:
            print(f"  shadow (2.0 int8) agreed with variant {primary} on {counts.get('agree', 0) / total:.1%} "
                  f"of {total:.0f} requests")


def main() -> int:
    os.chdir(ROOT)
    step("1. Train the digits CNN on scikit-learn's 8x8 digits: version 1.0 (short) and 2.0 (longer)")
    run(sys.executable, "scripts/train_digits.py", "--out", WORK)

    step("2. Distil version 2.0 into a student a tenth of its size")
    run(sys.executable, "scripts/distill_digits.py", "--work", WORK)

    step("3. Build: TorchScript, ONNX, int8, pruned, fp16 and image variants, each validated against eager")
    tspack("build", "--spec", "config/deploy.yaml")

    step("3b. A model with two named int64 inputs and a dict output, built from the command line (torch.export + "
         "AOTInductor)")
    run(sys.executable, "scripts/make_token_model.py", "--out", WORK)
    tspack("build", "--name", "sequence", "--model-class", "archiver/zoo/token_classifier.py:TokenClassifier",
           "--weights", os.path.join(WORK, "token_classifier.pt"), "--samples", os.path.join(WORK, "token_samples.npz"),
           "--input", "input_ids:-1:int64", "--input", "attention_mask:-1:int64", "--format", "aoti",
           "--model-store", STORE)

    step("3c. A text classifier: trained here on VADER's lexicon, saved as a Hugging Face folder, built from it")
    run(sys.executable, "scripts/train_text.py", "--out", SENTIMENT)
    tspack("build", "--pretrained", SENTIMENT, "--frontend", "text", "--name", "sentiment", "--format", "onnx",
           "--model-store", STORE)

    step("4. Generate config.properties (token auth on; model API on, to register versions)")
    tspack("serve", "stop")
    startup = ("digits_v1.0.mar", "digits-image-onnx_v2.0.mar", "digits-image-int8_v2.0.mar", "digits-aoti_v2.0.mar",
               "sequence_v1.0.mar", "sentiment_v1.0.mar")
    loads = [arg for archive in startup for arg in ("--load", archive)]
    tspack("config", *loads, "--enable-model-api", "--out", CONFIG)

    step("5. Start TorchServe with digits 1.0, the image + ONNX, image + int8 and AOTInductor variants of 2.0, and "
         "the two-input model")
    # --fresh: the demo deploys anew; a deployment recorded by an earlier run is set aside, not restored.
    tspack("serve", "start", "--config", CONFIG, "--fresh")

    step("6. Register version 2.0 through the management API and make it the default")
    tspack("register", os.path.join(STORE, "digits_v2.0.mar"))
    tspack("set-default", "digits", "2.0")
    tspack("versions", "digits")

    step("7. Predict held-out digits with curl (JSON tensors; default version = 2.0)")
    held_out = np.load(os.path.join(WORK, "heldout.npz"))
    x, y = held_out["x"], held_out["y"]
    key = inference_key()
    print(f"$ KEY=$(python -c \"import json;print(json.load(open('{KEY_FILE}'))['inference']['key'])\")")
    for i in range(3):
        body_file = os.path.join(WORK, f"heldout_{i}.json")
        with open(body_file, "w", encoding="utf-8") as f:
            json.dump({"data": x[i].tolist()}, f)
        answer = curl_predict("digits", body_file, key)
        top = answer["predictions"][0]
        print(f"  -> version {answer['version']}: predicted {top['index']} ({top['label']}, "
              f"p={top['probability']:.3f}), true label {y[i]}")

    step("8. The same digit as a PNG file, through image + ONNX (curl -F) and image + int8 (raw bytes)")
    png = sorted(f for f in os.listdir(os.path.join(WORK, "samples")) if f.endswith(".png"))[0]
    png_path = os.path.join(WORK, "samples", png)
    for model, multipart in (("digits-image-onnx", True), ("digits-image-int8", False)):
        top = curl_image(model, png_path, key, multipart)["predictions"][0]
        print(f"  -> {model}: predicted {top['index']} (p={top['probability']:.3f}); file {png}")

    step("8b. torch.export + AOTInductor: digits 2.0 as a compiled .pt2 package, served next to TorchScript")
    body_file = os.path.join(WORK, "heldout_0.json")
    top = curl_predict("digits-aoti", body_file, key)["predictions"][0]
    print(f"  -> digits-aoti: predicted {top['index']} (p={top['probability']:.3f})")
    for model in ("digits", "digits-aoti"):
        p50, p90 = served_latency(model, x)
        print(f"  {model:<12} ({'TorchScript' if model == 'digits' else 'AOTInductor'}): p50 {p50:.2f} ms, "
              f"p90 {p90:.2f} ms over 300 sequential requests")

    step("8c. The two-input model: JSON by input name, answered with every named output")
    tokens_file = os.path.join(WORK, "tokens_0.json")
    with open(tokens_file, "w", encoding="utf-8") as f:
        json.dump({"input_ids": [[101, 7, 42, 9, 102]], "attention_mask": [[1, 1, 1, 1, 1]]}, f)
    answer = curl_predict("sequence", tokens_file, key)
    outputs = answer["results"][0]["outputs"]
    print(f"  -> outputs: {', '.join(f'{name} ({len(values)} values)' for name, values in outputs.items())}; "
          f"logits {[round(v, 4) for v in outputs['logits']]}")

    step("8d. The text classifier: held-out lexicon entries through curl, then the served accuracy on all of them")
    with open(os.path.join(SENTIMENT, "heldout.json"), encoding="utf-8") as f:
        held_out_texts = json.load(f)
    # The model learnt from the lexicon's words and short phrases: curl one held-out entry of each label.
    for label in ("negative", "positive"):
        text = next(t for t, y in zip(held_out_texts["texts"], held_out_texts["labels"])
                    if y == label and t.isalpha() and len(t) > 5)  # a word, not one of the lexicon's emoticons
        top = curl_text("sentiment", text, key)["predictions"][0]
        print(f"  -> {top['label']} (p={top['probability']:.3f}); true label {label}")
    print(f"  sentiment: {served_text_accuracy():.1%} held-out accuracy as served", flush=True)

    step("8e. Open Inference Protocol v2 through the tspack gateway: tritonclient, binary tensors (its default)")
    oip_with_tritonclient(key)

    step("9. A/B test: 1.0 vs 2.0, 50/50, sticky on X-Request-Key (router archive; the .war twin beside it)")
    tspack("register", os.path.join(STORE, "digits-ab_v1.0.mar"))
    tspack("register", os.path.join(STORE, "digits-ab_v1.0.war"))
    body_file = os.path.join(WORK, "heldout_0.json")
    for user in demo_users():
        seen = []
        for path in ("predictions", "predictions", "predictions", "wfpredict"):
            answer = curl_ab(path, user, body_file, key, show=user == "alice" and path == "wfpredict" or not seen)
            seen.append(f"{answer['variant']}={answer['version']}" + (" (.war)" if path == "wfpredict" else ""))
        print(f"  -> {user}: {', '.join(seen)}")
    split = ab_split(x, 1000)
    print(f"  1000 keys: variant a (1.0) {split['a']:.1%}, variant b (2.0) {split['b']:.1%}  (weights 50/50)")
    show_ab_metrics()

    step(f"10. Accuracy of each version as served, on all {len(y)} held-out digits")
    for version in ("1.0", "2.0"):
        print(f"  digits {version}: {served_accuracy(version, x, y):.1%} held-out accuracy", flush=True)

    step("Done. TorchServe keeps running.")
    print(f"""  Call it again:
    KEY=$(python -c "import json;print(json.load(open('{KEY_FILE}'))['inference']['key'])")
    curl -s {INFERENCE}/predictions/digits -H "Authorization: Bearer $KEY" \\
         -H "Content-Type: application/json" --data-binary @{os.path.join(WORK, 'heldout_0.json')}
    curl -s {INFERENCE}/predictions/digits-image-onnx -H "Authorization: Bearer $KEY" -F data=@{png_path}
    .venv/bin/tspack predict digits --file {os.path.join(WORK, 'heldout_0.json')}
    .venv/bin/tspack serve status
    curl -s http://127.0.0.1:8082/metrics | grep tspack_
  Stop it:
    .venv/bin/tspack serve stop      (or: make stop)""")
    return 0


if __name__ == "__main__":
    sys.exit(main())

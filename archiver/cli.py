"""`tspack`: a thin command line over the archiver library.

Each command parses its flags, builds the library's config objects, calls one library function and
prints the result. Errors of the pack are printed on one line (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import typing
from typing import Any, Optional

from archiver.deploy import k8s
from archiver.deploy.properties import DEFAULT_OIP_PORT, entry_from_archive
from archiver.errors import TspackCliError
from archiver.package.archive import copy_into_store
from archiver.spec import DEFAULT_BATCHING, Batching
from archiver.tables import render
from handlers.errors import SpecError
from handlers.registry import FRONTENDS, RUNTIMES

_table = render


# --- build ---------------------------------------------------------------------------------------------


def cmd_build(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from archiver.build import build
    from archiver.package.report import format_table
    from archiver.spec import DeploySpec

    spec = DeploySpec.from_yaml(args.spec) if args.spec else spec_from_flags(args)
    if args.model_store:
        spec = replace(spec, model_store=os.path.abspath(args.model_store))
    if args.gpus is not None:
        spec = replace(spec, gpus=args.gpus)
    if args.only is not None:
        check_only(args.only, [m.name for m in spec.models] + [ab.name for ab in spec.ab])
    result = build(spec, progress=not args.quiet, only=args.only)
    print(format_table(result.entries))
    print(f"report: {result.report_path}")
    if result.failed:
        names = ", ".join(e.key for e in result.failed)
        print(f"tspack build: {len(result.failed)} artifact(s) failed validation: {names}", file=sys.stderr)
        return 1
    return 0


def check_only(only: list[str], names: list[str]) -> None:
    """Refuse `--only` names the spec does not have (else the build builds nothing and succeeds)."""
    unknown = [n for n in only if n not in names]
    if not only or unknown:
        what = f"{', '.join(unknown)} not in the spec" if unknown else "give at least one name"
        raise SpecError(f"--only: {what}; the spec has: {', '.join(dict.fromkeys(names))}")


def spec_from_flags(args: argparse.Namespace):
    """A one-model DeploySpec from command-line flags, through the same parser as the YAML spec."""
    from archiver.spec import DeploySpec, resolve_paths
    from handlers.spec import parse

    if not args.name or not (args.input_shape or args.input or args.pretrained):
        raise SpecError("build: give --spec FILE, or --name, the inputs (--input NAME:SHAPE:DTYPE or --input-shape) "
                        "and a model source")
    if args.pretrained:
        source = {"pretrained": args.pretrained}
    elif args.torchscript:
        source = {"torchscript": args.torchscript}
    else:
        source = {"model_class": args.model_class, "weights": args.weights}
    model = {
        "name": args.name, "version": args.version, "source": source, "frontend": args.frontend,
        "artifacts": [{"format": fmt, "id": "main" if i == 0 else fmt, "method": args.method}
                      for i, fmt in enumerate(args.format)],
        "serving": {"batch_size": args.batch_size, "workers": args.workers,
                    **({} if args.batching is None else {"batching": args.batching}),
                    **({} if args.max_batch_delay is None else {"max_batch_delay_ms": args.max_batch_delay})},
    }
    inputs = flag_inputs(args)
    if inputs:
        model["inputs"] = inputs
    if args.outputs:
        model["outputs"] = [o.strip() for o in args.outputs.split(",")]
    if args.tolerance is not None:
        model["tolerance"] = args.tolerance
    if args.samples:
        model["samples"] = {"file": args.samples}
    if args.labels:
        labels = _read_labels(args.labels)
        model["output"] = {"kind": "classification", "labels": labels, "top_k": min(5, len(labels))}
    spec = parse(DeploySpec, {"models": [model], "model_store": args.model_store or "model_store"})
    return resolve_paths(spec, os.getcwd())


def _shape(text: str, flag: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError as exc:
        raise SpecError(f"{flag}: '{text}' is not a shape; use comma-separated sizes, -1 for a free axis, "
                        "e.g. 1,28,28 or -1") from exc


def flag_inputs(args: argparse.Namespace) -> list[dict]:
    """`--input NAME:SHAPE[:DTYPE]` (repeatable) or the one-input `--input-shape` + `--dtype`."""
    if args.input and args.input_shape:
        raise SpecError("build: give --input (one per input) or --input-shape (one input), not both")
    if args.input_shape:
        return [{"shape": _shape(args.input_shape, "--input-shape"), "dtype": args.dtype}]
    inputs = []
    for item in args.input or []:
        parts = item.split(":")
        if len(parts) not in (2, 3) or not parts[0]:
            raise SpecError(f"--input: '{item}' must look like NAME:SHAPE[:DTYPE], e.g. input_ids:-1:int64")
        entry = {"name": parts[0], "shape": _shape(parts[1], "--input")}
        entry["dtype"] = parts[2] if len(parts) == 3 else args.dtype
        inputs.append(entry)
    return inputs


# Flags whose values may start with '-' (a free axis: `--input-shape -1,12`); argparse would read them as options.
SHAPE_FLAGS = ("--input-shape", "--input")


def join_shape_values(argv: list[str]) -> list[str]:
    """`--input-shape -1,12` -> `--input-shape=-1,12`, so a leading free axis is taken as the value it is."""
    joined, i = [], 0
    while i < len(argv):
        if argv[i] in SHAPE_FLAGS and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            joined.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
            continue
        joined.append(argv[i])
        i += 1
    return joined


def _read_labels(value: str) -> list[str]:
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):  # index_to_name.json
            from handlers.spec import read_index_to_name

            return list(read_index_to_name(value))
        return [str(v) for v in data]
    return [v.strip() for v in value.split(",")]


# --- config --------------------------------------------------------------------------------------------


def cmd_config(args: argparse.Namespace) -> int:
    from archiver.deploy.placement import assign, detect_gpus, placement_table
    from archiver.deploy.properties import ServerConfig, write_config

    store = os.path.abspath(args.model_store)
    gpus = args.gpus if args.gpus is not None else detect_gpus()
    entries = [entry_from_archive(item, store, gpus) for item in args.load]
    dev = args.profile == "dev"
    config = ServerConfig(
        model_store=store, inference_port=args.inference_port, management_port=args.management_port,
        metrics_port=args.metrics_port, grpc_inference_port=args.grpc_ports[0],
        grpc_management_port=args.grpc_ports[1], bind_address=args.bind, models=tuple(entries),
        number_of_gpu=gpus, token_auth=not (dev or args.disable_token_auth), model_api=dev or args.enable_model_api,
        job_queue_size=args.job_queue_size, workflow_store=args.workflow_store,
        open_inference_protocol=not args.no_oip, oip_port=args.oip_port or None,
    )
    from archiver.deploy.alerts import ALERTS_FILE, AlertThresholds

    alerts = AlertThresholds(error_rate=args.alert_error_rate, p99_latency_s=args.alert_p99_s,
                             max_psi=args.alert_max_psi)
    path = write_config(config, args.out, alerts)
    print(f"wrote {path}")
    print(f"wrote {os.path.join(os.path.dirname(os.path.abspath(path)), ALERTS_FILE)} (Prometheus alerting rules)")
    rows = [["model", "version", "archive", "workers", "batch", "delay_ms"]]
    rows += [[e.name, e.version, e.mar, str(e.workers), str(e.batch_size), str(e.max_batch_delay_ms)] for e in entries]
    if entries:
        print(_table(rows))
        print(f"placement on {gpus} GPU(s):")
        print(placement_table(assign([e.deployed for e in entries], gpus), gpus))
    print(f"token auth: {'on' if config.token_auth else 'OFF'}   model API: {'on' if config.model_api else 'off'}   "
          f"gpus: {config.number_of_gpu}   inference: {config.inference_url}   "
          f"OIP gateway: {config.oip_url or 'off'}")
    return 0


# --- serve ---------------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    from archiver.operate import server

    if args.action == "start":
        from archiver.operate.restore import describe_outcome, start_restored

        outcome = start_restored(args.config, args.run_dir, fresh=args.fresh, timeout_s=args.timeout)
        handle = outcome.handle
        print(f"TorchServe is up (pid {handle.pid}): inference {handle.inference_url}, "
              f"management {handle.management_url}, metrics {handle.metrics_url}/metrics")
        if handle.oip_url:
            print(f"OIP v2 gateway (pid {handle.oip_pid}): {handle.oip_url}/v2 (probes take no token; metadata and "
                  "infer take the inference key)")
        print("\n".join(describe_outcome(outcome)))
        if args.fresh and not outcome.set_aside:
            print("--fresh: there was no recorded deployment to set aside")
        if handle.key_file:
            print(f"token auth on: keys in {handle.key_file}")
        if outcome.refused:
            names = ", ".join(f"{r.model} {r.version} ({r.archive})" for r in outcome.refused)
            print(f"tspack serve: started without {len(outcome.refused)} refused version(s): {names}",
                  file=sys.stderr)
            return EXIT_REFUSED
        return 0
    if args.action == "stop":
        from archiver.operate.deployment import record_path

        stopped = server.stop(args.run_dir, quiet=True)
        print("TorchServe stopped" if stopped else "no TorchServe was running from " + os.path.abspath(args.run_dir))
        if os.path.isfile(record_path(args.run_dir)):
            print(f"the deployment stays recorded in {record_path(args.run_dir)}: `tspack serve start` restores it "
                  "(--fresh starts from config.properties instead)")
        return 0
    from archiver.operate.status import format_status, server_status

    status = server_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0 if status.get("healthy") else 1


# --- management ----------------------------------------------------------------------------------------


EXIT_REFUSED = 3  # `serve start` started, but refused recorded versions whose archives went missing or changed


def _client(args: argparse.Namespace):
    from archiver.operate.server import ServerHandle

    return ServerHandle.load(os.path.abspath(args.run_dir)).client()


@contextlib.contextmanager
def recording(args: argparse.Namespace):
    """Rewrite the deployment record after a command that changes the deployment, even when the command failed
    half-way (a swap whose probe failed has still registered and unregistered)."""
    from archiver.deploy.properties import read_properties
    from archiver.operate.deployment import record_now
    from archiver.operate.server import ServerHandle

    handle = ServerHandle.load(os.path.abspath(args.run_dir))
    try:
        yield handle
    except BaseException:
        with contextlib.suppress(TspackCliError):
            record_now(handle.client(), read_properties(handle.config_path).get("model_store", ""), handle.run_dir)
        raise
    record_now(handle.client(), read_properties(handle.config_path).get("model_store", ""), handle.run_dir)


def cmd_register(args: argparse.Namespace) -> int:
    from archiver.deploy.properties import read_properties

    archive = os.path.abspath(args.archive)
    if not os.path.isfile(archive):
        raise SpecError(f"register: archive not found: {args.archive}")
    with recording(args) as handle:
        return _register(args, handle, read_properties(handle.config_path), archive)


def _register(args: argparse.Namespace, handle, props: dict, archive: str) -> int:
    from archiver.package.archive import archive_info

    workflow = archive.endswith(".war")
    store = props.get("workflow_store" if workflow else "model_store") or props.get("model_store", "")
    if copy_into_store(archive, store):
        print(f"copied {os.path.basename(archive)} into {store}")
    client = handle.client()
    if workflow:
        result = client.register_workflow(os.path.basename(archive), workflow_name=args.name)
        print(result.get("status", result) if isinstance(result, dict) else result)
        # TorchServe 0.12 loads no workflow at start (there is no load_workflows), so none can be restored.
        print("note: workflows are not restored by `tspack serve start`; an A/B router archive (.mar) is")
        return 0
    model_name, version, _ = archive_info(archive)
    result = client.register(os.path.basename(archive), model_name=args.name, initial_workers=args.workers)
    name = args.name or model_name
    print(result.get("status", result) if isinstance(result, dict) else result)
    if args.set_default:
        client.set_default(name, version)
        print(f"{name} {version} is now the default version")
    return 0


def cmd_swap(args: argparse.Namespace) -> int:
    from archiver.deploy.properties import read_properties
    from archiver.operate.swap import swap_version
    from archiver.package.archive import archive_info

    archive = os.path.abspath(args.archive)
    if not os.path.isfile(archive):
        raise SpecError(f"swap: archive not found: {args.archive}")
    model, version, _ = archive_info(archive)
    probe = json.loads(args.probe) if args.probe else None
    with recording(args) as handle:
        store = read_properties(handle.config_path).get("model_store", "")
        copy_into_store(archive, store)
        result = swap_version(handle.client(), model, os.path.basename(archive), version, args.workers, args.drain,
                              retire=not args.keep_old, probe=probe)
    for line in result.steps:
        print(line)
    return 0


def cmd_set_default(args: argparse.Namespace) -> int:
    with recording(args) as handle:
        result = handle.client().set_default(args.model, args.version)
    print(result.get("status", result) if isinstance(result, dict) else result)
    return 0


def cmd_unregister(args: argparse.Namespace) -> int:
    with recording(args) as handle:
        result = handle.client().unregister(args.model, args.version)
    print(result.get("status", result) if isinstance(result, dict) else result)
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    from archiver.operate.swap import wait_ready

    max_workers = args.max_workers if args.max_workers is not None else args.workers
    with recording(args) as handle:
        client = handle.client()
        # Asynchronous, then wait: a synchronous scale holds a frontend network thread until the workers are up.
        client.scale(args.model, args.version, min_worker=args.workers, max_worker=max_workers, synchronous=False)
        version = args.version or client.describe(args.model)[0]["modelVersion"]
        wait_ready(client, args.model, version, args.workers, args.timeout)
    print(f"{args.model} {version}: {args.workers} worker(s) ready (max {max_workers})")
    return 0


def cmd_versions(args: argparse.Namespace) -> int:
    from archiver.operate.server import ServerHandle
    from archiver.operate.status import format_endpoints, model_versions

    handle = ServerHandle.load(os.path.abspath(args.run_dir))
    client = handle.client()
    versions = model_versions(client, args.model)
    rows = [["version", "default", "workers", "batching", "built_at", "runtime", "max_abs_err", "accuracy",
             "archive"]]
    for v in versions:
        rows.append([v["version"], "*" if v["default"] else "", v["workers"],
                     v.get("batching") or f"batch {v.get('batch_size')}", v.get("built_at") or "-",
                     v.get("runtime") or "-", v.get("max_abs_error") or "-", v.get("accuracy") or "-", v["archive"]])
    print(_table(rows))
    print(format_endpoints(client.inference_url, args.model, handle.oip_url))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.file:
        with open(args.file, "rb") as f:
            data = f.read()
        guessed = "application/json" if args.file.endswith(".json") else "application/octet-stream"
        content_type = args.content_type or guessed
        response = client.predict(args.model, version=args.version, data=data, content_type=content_type)
    else:
        response = client.predict(args.model, body=json.loads(args.json), version=args.version)
    print(response.text)
    return 0 if response.status_code == 200 else 1


def cmd_drift(args: argparse.Namespace) -> int:
    from archiver.operate.drift import drift_report
    from archiver.operate.server import ServerHandle

    handle = ServerHandle.load(os.path.abspath(args.run_dir))
    report = drift_report(handle, args.model, args.version, args.max_psi, args.min_count)
    print(_table(report.rows()))
    print(report.summary())
    return 1 if report.drifted else 0


# --- parser --------------------------------------------------------------------------------------------


# --- k8s -----------------------------------------------------------------------------------------------


def add_k8s_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `k8s` subcommand (flags mirror K8sConfig) to an argparse subparsers object."""
    k = subparsers.add_parser("k8s", help="write Kubernetes manifests (Deployment, Service, HPA; Ingress, PVC) for "
                              "the image")
    for field in dataclasses.fields(k8s.K8sConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = int if isinstance(field.default, int) else str
        extra: dict[str, Any] = {"choices": k8s.SERVICE_TYPES} if field.name == "service_type" else {}
        k.add_argument(flag, type=kind, default=field.default, help=k8s.FLAG_HELP[field.name], **extra)
    k.add_argument("--out", default=os.path.join("docker", "k8s"),
                   help="folder for the YAML files (default: %(default)s)")
    k.set_defaults(func=cmd_k8s)
    return k


def config_from_args(args: argparse.Namespace) -> k8s.K8sConfig:
    return k8s.K8sConfig(**{field.name: getattr(args, field.name) for field in dataclasses.fields(k8s.K8sConfig)})


def cmd_k8s(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    for path in k8s.write_manifests(config, args.out):
        print(f"wrote {path}")
    print(f"{config.variant} variant, image {config.image_ref}: kubectl apply -f {args.out}")
    if config.rate_limit:
        print(f"rate limit: {config.rate_limit} requests/s per client IP (burst {k8s.BURST_MULTIPLIER}x) at "
              f"ingress-nginx; it answers 503 over the limit unless its ConfigMap sets limit-req-status-code: \"429\"")
    return 0


# --- tune ----------------------------------------------------------------------------------------------


def add_tune_parser(subparsers: Any) -> argparse.ArgumentParser:
    t = subparsers.add_parser("tune", help="pick a model's serving configuration (runtime, batching, workers, "
                              "threads) by measuring it against a TorchServe on this host")
    t.add_argument("--spec", required=True, help="the deployment spec the model was built from")
    t.add_argument("--model", required=True, help="the model's name in the spec")
    t.add_argument("--version", help="its version, when the spec lists several")
    t.add_argument("--slo-p99-ms", type=float, default=50.0, help="p99 latency budget at every concurrency "
                   "(default %(default)s)")
    t.add_argument("--concurrency", default="1,8,32", help="client counts to measure, comma-separated; the winner "
                   "has the most requests/s at the last (default %(default)s)")
    t.add_argument("--budget-s", type=float, default=300.0, help="time for the whole run (default %(default)s)")
    t.add_argument("--duration-s", type=float, default=5.0, help="seconds per concurrency per configuration "
                   "(default %(default)s)")
    t.add_argument("--max-trials", type=int, help="stop after this many configurations")
    t.add_argument("--cores", type=int, help="cores the deployment may use (default: this host's)")
    t.add_argument("--write", action="store_true", help="tune the spec in place instead of writing FILE.tuned.yaml")
    t.add_argument("--report-dir", help="where the report goes (default: MODEL_STORE/tune/NAME_vVERSION)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_tune)
    return t


def cmd_tune(args: argparse.Namespace) -> int:
    from archiver.operate.tune.search import TuneSettings
    from archiver.operate.tune.session import tune

    try:
        concurrency = tuple(int(c) for c in args.concurrency.split(","))
    except ValueError:
        raise SpecError(f"--concurrency: a comma-separated list of client counts, got '{args.concurrency}'") from None
    result = tune(TuneSettings(
        spec_path=os.path.abspath(args.spec), model=args.model, version=args.version, slo_p99_ms=args.slo_p99_ms,
        concurrency=concurrency, budget_s=args.budget_s, duration_s=args.duration_s, max_trials=args.max_trials,
        write=args.write, report_dir=args.report_dir, cores=args.cores, progress=not args.quiet))
    print(result.table)
    print(result.verdict)
    if result.tuned_spec:
        print(f"tuned spec: {result.tuned_spec}")
    print(f"report: {result.report['markdown']} (plot: {result.report['plot']})")
    return 0 if result.winner is not None else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tspack", description="Optimize, package, serve and operate PyTorch "
                                     "models on TorchServe.")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="export, validate and package models into .mar archives")
    b.add_argument("--spec", help="deployment spec (YAML), e.g. config/deploy.yaml")
    b.add_argument("--only", nargs="*", help="build only these model names from the spec")
    b.add_argument("--model-store", help="where archives and build_report.json go (default: the spec's)")
    b.add_argument("--name", help="model name (without --spec)")
    b.add_argument("--version", default="1.0", help="model version (default 1.0)")
    b.add_argument("--model-class", help="path/to/file.py:ClassName of the eager model")
    b.add_argument("--weights", help="state_dict file for --model-class")
    b.add_argument("--torchscript", help="a TorchScript file instead of --model-class/--weights")
    b.add_argument("--pretrained", help="a Hugging Face model folder (save_pretrained) instead of --model-class")
    b.add_argument("--input", action="append", metavar="NAME:SHAPE[:DTYPE]",
                   help="a named input, repeatable: --input input_ids:-1:int64 --input attention_mask:-1:int64 "
                        "(-1: a free axis)")
    b.add_argument("--input-shape", help="the one input's sample shape, e.g. 1,28,28 or -1,12")
    b.add_argument("--dtype", default="float32", help="dtype of --input-shape (and of --input without one)")
    b.add_argument("--outputs", help="names of a tuple's outputs, comma-separated (dict outputs name themselves)")
    b.add_argument("--format", nargs="+", default=["torchscript"], choices=list(RUNTIMES),
                   help="; ".join(f"{name}: {entry.summary}" for name, entry in RUNTIMES.items()))
    b.add_argument("--method", default="trace", choices=["trace", "script"])
    b.add_argument("--frontend", default="tensor", choices=list(FRONTENDS),
                   help="; ".join(f"{name}: {entry.summary}" for name, entry in FRONTENDS.items()))
    b.add_argument("--tolerance", type=float)
    b.add_argument("--samples", help=".npz with validation inputs x (and labels y)")
    b.add_argument("--labels", help="class names: a,b,c or a JSON file (list or index_to_name.json)")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--batching", choices=list(typing.get_args(Batching)),
                   help=f"zero_wait: run what is queued the moment the model is free; delay: TorchServe waits "
                        f"--max-batch-delay for a batch to fill (default: {DEFAULT_BATCHING}, or delay when "
                        "--max-batch-delay is given)")
    b.add_argument("--max-batch-delay", type=int, help="ms, delay batching only (default: 2 with batching, 0 with "
                                                       "--batch-size 1)")
    b.add_argument("--workers", type=int, default=1)
    b.add_argument("--gpus", type=int, help="GPUs of the host the archives are for (default: the spec's, else "
                   "this host's)")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_build)

    c = sub.add_parser("config", help="write config.properties (and metrics.yaml) for a deployment")
    c.add_argument("--load", action="append", default=[], metavar="[NAME=]ARCHIVE",
                   help="archive to serve at start-up (repeatable); workers and batching come from the archive")
    c.add_argument("--model-store", default="model_store")
    c.add_argument("--workflow-store")
    c.add_argument("--out", default=os.path.join("model_store", "config.properties"))
    c.add_argument("--profile", choices=["production", "dev"], default="production",
                   help="dev turns token auth off and the model API on")
    c.add_argument("--enable-model-api", action="store_true", help="allow register/unregister (token auth stays on)")
    c.add_argument("--disable-token-auth", action="store_true",
                   help="turn token authorization off (not for production)")
    c.add_argument("--no-oip", action="store_true",
                   help="leave TorchServe's OIP v2 health/metadata routes and OIP gRPC service off "
                        "(/v2/models/NAME/infer still works)")
    c.add_argument("--bind", default="127.0.0.1")
    c.add_argument("--inference-port", type=int, default=8080)
    c.add_argument("--management-port", type=int, default=8081)
    c.add_argument("--metrics-port", type=int, default=8082)
    c.add_argument("--grpc-ports", type=int, nargs=2, default=[7070, 7071], metavar=("INFERENCE", "MANAGEMENT"),
                   help="TorchServe's gRPC ports (it always opens them)")
    c.add_argument("--oip-port", type=int, default=DEFAULT_OIP_PORT,
                   help="port of the tspack OIP v2 gateway `serve start` runs beside TorchServe (health, metadata, "
                        "versioned infer; default %(default)s; 0: no gateway)")
    c.add_argument("--job-queue-size", type=int, default=100)
    c.add_argument("--gpus", type=int, help="number of GPUs (default: detect with nvidia-smi or torch)")
    c.add_argument("--alert-error-rate", type=float, default=0.05,
                   help="alerts.yaml: 5xx share of a model's answers that alerts (default 0.05)")
    c.add_argument("--alert-p99-s", type=float, default=0.5,
                   help="alerts.yaml: p99 handler latency per batch that alerts, seconds (default 0.5)")
    c.add_argument("--alert-max-psi", type=float, default=0.2,
                   help="alerts.yaml: prediction-drift PSI over the last hour that alerts (default 0.2)")
    c.set_defaults(func=cmd_config)

    s = sub.add_parser("serve", help="start, stop or check TorchServe")
    s.add_argument("action", choices=["start", "stop", "status"])
    s.add_argument("--config", default=os.path.join("model_store", "config.properties"))
    s.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for readiness")
    s.add_argument("--json", action="store_true", help="status as JSON")
    s.add_argument("--fresh", action="store_true", help="start: ignore the recorded deployment (it is set aside as "
                   "a file, not deleted) and load what config.properties lists")
    s.set_defaults(func=cmd_serve)

    r = sub.add_parser("register", help="register an archive (a new version) through the management API")
    r.add_argument("archive")
    r.add_argument("--name", help="model name (default: the archive's)")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--set-default", action="store_true")
    r.set_defaults(func=cmd_register)

    w = sub.add_parser("swap", help="zero-downtime swap: register a new version, make it default, retire the old")
    w.add_argument("archive")
    w.add_argument("--workers", type=int, default=1)
    w.add_argument("--drain", type=float, default=2.0, help="seconds the old version keeps draining (default 2)")
    w.add_argument("--keep-old", action="store_true", help="keep the old versions registered")
    w.add_argument("--probe", help="JSON request body the new version must answer 200 before the switch")
    w.set_defaults(func=cmd_swap)

    d = sub.add_parser("set-default", help="make a version the default")
    d.add_argument("model")
    d.add_argument("version")
    d.set_defaults(func=cmd_set_default)

    u = sub.add_parser("unregister", help="unregister a model version (or the model)")
    u.add_argument("model")
    u.add_argument("version", nargs="?")
    u.set_defaults(func=cmd_unregister)

    sc = sub.add_parser("scale", help="set a version's worker count (recorded, so a restart keeps it)")
    sc.add_argument("model")
    sc.add_argument("version", nargs="?", help="default: the default version")
    sc.add_argument("--workers", type=int, required=True, help="minimum workers")
    sc.add_argument("--max-workers", type=int, help="default: --workers")
    sc.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the workers")
    sc.set_defaults(func=cmd_scale)

    v = sub.add_parser("versions", help="list a model's versions, workers and build figures")
    v.add_argument("model")
    v.set_defaults(func=cmd_versions)

    p = sub.add_parser("predict", help="send one prediction")
    p.add_argument("model")
    p.add_argument("--version")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--file", help="request body file (.json, .npy, image)")
    group.add_argument("--json", help="request body as JSON text")
    p.add_argument("--content-type")
    p.set_defaults(func=cmd_predict)

    dr = sub.add_parser("drift", help="compare served predictions with the build's validation profile (PSI, TV); "
                        "exit 1 above --max-psi")
    dr.add_argument("model")
    dr.add_argument("--version", help="model version (default: the default version)")
    dr.add_argument("--max-psi", type=float, default=0.2, help="PSI above which drift is reported (default 0.2)")
    dr.add_argument("--min-count", type=int, default=100,
                    help="served predictions needed before comparing (default 100)")
    dr.set_defaults(func=cmd_drift)

    add_k8s_parser(sub)
    add_tune_parser(sub)

    for command in (s, r, w, d, u, sc, v, p, dr):
        command.add_argument("--run-dir", default=os.path.join(".tspack", "server"),
                             help="the server's run folder (key_file.json, logs, state)")
    return parser


# torchao (pt2e int8; transformers imports it when installed) warns at import about CUDA kernels a CPU build cannot
# load; those lines say nothing about the build.
QUIET_LIBRARY_LOGGERS = ("torchao",)


def main(argv: Optional[list[str]] = None) -> int:
    import logging

    for name in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    args = build_parser().parse_args(join_shape_values(sys.argv[1:] if argv is None else list(argv)))
    try:
        return args.func(args)
    except (TspackCliError, SpecError) as exc:
        print(f"tspack {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

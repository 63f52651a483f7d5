"""`tspack config`: the TorchServe `config.properties` (and its metrics config) for a deployment.

Declared as a dataclass and rendered from it. The production profile keeps token authorization on and
the model API off; both change only when asked for explicitly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from archiver.deploy.alerts import ALERTS_FILE, AlertThresholds, baselines, write_alerts
from archiver.deploy.placement import Deployed
from archiver.package.archive import archive_info
from handlers.errors import SpecError
from handlers.metrics import metrics_yaml_section
from handlers.spec import require

Profile = Literal["production", "dev"]
METRICS_FILE = "metrics.yaml"
LOG_CONFIG_FILE = "log4j2.xml"
ARCHIVE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]*\.(mar|war)"
# Where `serve start` runs the OIP gateway (archiver/operate/oip_gateway.py); TorchServe ignores keys it does not know.
OIP_ADDRESS_KEY = "tspack_oip_address"
DEFAULT_OIP_PORT = 8083


_require = require


@dataclass(frozen=True)
class ModelEntry:
    """One model version in the `models=` block (TorchServe takes workers and batching from it at start)."""

    name: str
    version: str
    mar: str
    workers: int = 1
    max_workers: Optional[int] = None
    batch_size: int = 8
    max_batch_delay_ms: int = 2
    response_timeout_s: int = 120
    default: bool = True
    device_type: Optional[str] = None
    device_ids: tuple[int, ...] = ()

    def __post_init__(self):
        _require(self.workers >= 1, f"models.{self.name}.workers: must be >= 1, got {self.workers}")
        _require(self.batch_size >= 1, f"models.{self.name}.batch_size: must be >= 1")

    @property
    def deployed(self) -> Deployed:
        return Deployed(name=self.name, workers=self.workers, device_type=self.device_type, device_ids=self.device_ids)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `config.properties` says. Ports 0 are not allowed: pick free ones before rendering."""

    model_store: str
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    # TorchServe always starts gRPC servers too; two servers on one host must not share these ports.
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    # The tspack OIP gateway (archiver/operate/oip_gateway.py), which `serve start` runs beside TorchServe for the
    # OIP routes TorchServe 0.12 lacks. None: no gateway. The library leaves it off, so servers it starts on free
    # ports for tests and benchmarks do not all claim one port; `tspack config --oip-port` defaults to
    # DEFAULT_OIP_PORT.
    oip_port: Optional[int] = None
    bind_address: str = "127.0.0.1"
    models: tuple[ModelEntry, ...] = ()
    number_of_gpu: int = 0
    job_queue_size: int = 100
    token_auth: bool = True
    model_api: bool = False
    # TorchServe's own OIP v2 routes: /v2, /v2/health/live|ready over HTTP and the OIP gRPC service
    # (ServerLive/Ready, ModelReady, ModelMetadata, ModelInfer) on the gRPC inference port. Infer at
    # /v2/models/{name}/infer reaches the handlers either way; every one of these routes takes the inference token.
    open_inference_protocol: bool = True
    token_expiration_min: int = 60
    # The frontend's hard cap. Above it Netty answers a bare 413 with no body, so it sits well above the
    # handlers' own per-model limits (max_body_bytes, image max_bytes), which answer a JSON 413 naming the limit.
    max_request_size: int = 64 * 1024 * 1024
    max_response_size: int = 16 * 1024 * 1024
    default_response_timeout_s: int = 120
    workflow_store: Optional[str] = None
    metrics_config: Optional[str] = None
    log_config: Optional[str] = None
    access_log: bool = False
    netty_threads: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        ports = (self.inference_port, self.management_port, self.metrics_port, self.grpc_inference_port,
                 self.grpc_management_port, *(() if self.oip_port is None else (self.oip_port,)))
        _require(all(0 < p < 65536 for p in ports), f"ports: must be in 1..65535, got {ports}")
        _require(len(set(ports)) == len(ports), "ports: inference, management, metrics, the two gRPC ports and "
                 f"the OIP gateway's must differ, got {ports}")
        _require(self.number_of_gpu >= 0, "number_of_gpu: must be >= 0")
        _require(self.job_queue_size >= 1, "job_queue_size: must be >= 1")
        _require(self.token_expiration_min >= 1, "token_expiration_min: must be >= 1")

    @property
    def inference_url(self) -> str:
        return f"http://{self.bind_address}:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.bind_address}:{self.management_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.bind_address}:{self.metrics_port}"

    @property
    def oip_url(self) -> Optional[str]:
        return None if self.oip_port is None else f"http://{self.bind_address}:{self.oip_port}"

    def models_block(self) -> dict:
        block: dict[str, dict] = {}
        for m in self.models:
            block.setdefault(m.name, {})[m.version] = {
                "defaultVersion": m.default, "marName": m.mar, "minWorkers": m.workers,
                "maxWorkers": m.max_workers or m.workers, "batchSize": m.batch_size,
                "maxBatchDelay": m.max_batch_delay_ms, "responseTimeout": m.response_timeout_s,
            }
        return block

    def render(self) -> str:
        store = os.path.abspath(self.model_store)
        lines = [
            "# Generated by `tspack config`. Edit the spec and regenerate rather than editing by hand.",
            f"inference_address={self.inference_url}",
            f"management_address={self.management_url}",
            f"metrics_address={self.metrics_url}",
            f"grpc_inference_address={self.bind_address}",
            f"grpc_management_address={self.bind_address}",
            f"grpc_inference_port={self.grpc_inference_port}",
            f"grpc_management_port={self.grpc_management_port}",
            f"model_store={store}",
            # Only archives directly in the local model store may be registered: no remote URLs, no other folders
            # (TorchServe refuses a literal '..' but decodes %2e%2e, so the file name is spelled out).
            f"allowed_urls=file://{re.escape(store)}/{ARCHIVE_NAME}",
            f"number_of_gpu={self.number_of_gpu}",
            "metrics_mode=prometheus",
            f"job_queue_size={self.job_queue_size}",
            f"default_response_timeout={self.default_response_timeout_s}",
            f"max_request_size={self.max_request_size}",
            f"max_response_size={self.max_response_size}",
            f"disable_token_authorization={'false' if self.token_auth else 'true'}",
            f"enable_model_api={'true' if self.model_api else 'false'}",
            f"ts_open_inference_protocol={'true' if self.open_inference_protocol else 'false'}",
            f"token_expiration_min={self.token_expiration_min}",
            # Handlers parse request bytes themselves, so malformed JSON gets a precise 4xx, not a worker warning.
            "decode_input_request=false",
            "default_workers_per_model=1",
            "install_py_dep_per_model=false",
            "enable_envvars_config=false",
        ]
        if self.oip_url:
            lines.append(f"{OIP_ADDRESS_KEY}={self.oip_url}")
        if self.netty_threads:
            lines.append(f"number_of_netty_threads={self.netty_threads}")
        if self.metrics_config:
            lines.append(f"metrics_config={os.path.abspath(self.metrics_config)}")
        if self.log_config:
            lines.append(f"vmargs=-Dlog4j.configurationFile=file://{os.path.abspath(self.log_config)}")
        if self.workflow_store:
            lines.append(f"workflow_store={os.path.abspath(self.workflow_store)}")
        if self.models:
            lines.append("load_models=" + ",".join(f"{m.name}={m.mar}" for m in self.models if m.default))
            lines.append("models=" + json.dumps(self.models_block(), separators=(",", ":")))
        for key, value in sorted(self.extra.items()):
            lines.append(f"{key}={value}")
        return "\n".join(lines) + "\n"


def metrics_config_text() -> str:
    """TorchServe's default metrics config plus the model metrics tspack handlers emit."""
    import ts

    default_path = os.path.join(os.path.dirname(ts.__file__), "configs", "metrics.yaml")
    with open(default_path, encoding="utf-8") as f:
        config = yaml.safe_load(f)
    model_metrics = config.setdefault("model_metrics", {})
    for kind, entries in metrics_yaml_section().items():
        existing = {e["name"] for e in model_metrics.get(kind, [])}
        model_metrics.setdefault(kind, []).extend(e for e in entries if e["name"] not in existing)
    return yaml.safe_dump(config, sort_keys=False)


# "Sending response for jobId ..." per request (BatchAggregator), "Getting requests from model" per request in
# asynchronous mode, "result=[METRICS]..." per metric line a worker prints (WorkerLifeCycle).
PER_REQUEST_LOGGERS = ("org.pytorch.serve.wlm.BatchAggregator", "org.pytorch.serve.wlm.AsyncBatchAggregator",
                       "org.pytorch.serve.wlm.WorkerLifeCycle")


def log_config_text(access_log: bool) -> str:
    """A log4j2 config for TorchServe's frontend that does not tax serving.

    TorchServe's built-in one logs org.pytorch.serve at DEBUG, writes each line twice (its logger and the
    root both append to ts_log.log) and copies everything to the console: measured here, quieting it took
    a 2-worker light model from 284 to 627 requests/s. Kept: INFO and above in ts_log.log, the workers'
    output in model_log.log (tracebacks, tspack's placement lines), and the access log only when asked for.
    Metrics need no log files: metrics_mode=prometheus serves them from memory.

    Quiet below WARN (PER_REQUEST_LOGGERS): the frontend classes that log an INFO line per request or per metric
    line, each a synchronous write. WorkerThread's per-batch "Backend response time" stays (with `delay` batching it
    tells which worker answered; zero-wait workers have no such line).
    """
    quiet = "".join(f'    <Logger name="{name}" level="warn" additivity="false"><AppenderRef ref="ts_log"/></Logger>\n'
                    for name in PER_REQUEST_LOGGERS)
    def rolling(name: str, pattern: str) -> str:
        return (f'    <RollingFile name="{name}" fileName="${{env:LOG_LOCATION:-logs}}/{name}.log" '
                f'filePattern="${{env:LOG_LOCATION:-logs}}/{name}.%d{{dd-MMM}}.log.gz">\n'
                f'      <PatternLayout pattern="{pattern}"/>\n'
                '      <Policies><SizeBasedTriggeringPolicy size="100 MB"/><TimeBasedTriggeringPolicy/></Policies>\n'
                '      <DefaultRolloverStrategy max="5"/>\n    </RollingFile>\n')

    full = "%d{ISO8601} [%-5p] %t %c - %m%n"
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<!-- Generated by `tspack config`. -->\n<Configuration>\n'
            "  <Appenders>\n" + rolling("ts_log", full) + rolling("model_log", full)
            + rolling("access_log", "%d{ISO8601} - %m%n") + "  </Appenders>\n  <Loggers>\n"
            f'    <Logger name="ACCESS_LOG" level="{"info" if access_log else "off"}" additivity="false">'
            '<AppenderRef ref="access_log"/></Logger>\n'
            '    <Logger name="MODEL_LOG" level="info" additivity="false"><AppenderRef ref="model_log"/></Logger>\n'
            '    <Logger name="MODEL_METRICS" level="off" additivity="false"/>\n'
            '    <Logger name="TS_METRICS" level="off" additivity="false"/>\n'
            '    <Logger name="io.netty" level="error"/>\n    <Logger name="org.apache" level="off"/>\n'
            '    <Logger name="org.pytorch.serve" level="info" additivity="false">'
            '<AppenderRef ref="ts_log"/></Logger>\n' + quiet +
            '    <Root level="warn"><AppenderRef ref="ts_log"/></Root>\n  </Loggers>\n</Configuration>\n')


def write_config(config: ServerConfig, path: str, alerts: Optional[AlertThresholds] = None) -> str:
    """Write config.properties at `path`, the metrics and log configs and the Prometheus alerting rules
    (alerts.yaml, with drift baselines from the start-up archives' profiles) beside it; returns the properties
    path."""
    from dataclasses import replace

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_alerts(os.path.join(folder, ALERTS_FILE), alerts or AlertThresholds(),
                 baselines(config.models, config.model_store))
    metrics_path = os.path.join(folder, METRICS_FILE)
    with open(metrics_path, "w", encoding="utf-8") as f:
        f.write(metrics_config_text())
    if config.metrics_config is None:
        config = replace(config, metrics_config=metrics_path)
    if config.log_config is None:
        log_path = os.path.join(folder, LOG_CONFIG_FILE)
        with open(log_path, "w", encoding="utf-8") as f:
            f.write(log_config_text(config.access_log))
        config = replace(config, log_config=log_path)
    with open(path, "w", encoding="utf-8") as f:
        f.write(config.render())
    return path


def read_properties(path: str) -> dict[str, str]:
    """Parse a config.properties file (key=value lines, # comments)."""
    props: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def entry_from_archive(item: str, store: str, gpus: Optional[int] = None):
    """`[name=]archive.mar` -> ModelEntry, with name, version, workers and batching read from the archive.

    With `gpus`, the archive's GPU ids are checked against that many GPUs.
    """
    name, _, archive = item.rpartition("=")
    path = archive if os.path.isabs(archive) or os.path.exists(archive) else os.path.join(store, archive)
    if not os.path.isfile(path):
        raise SpecError(f"--load: archive not found: {archive} (looked in {store})")
    if os.path.dirname(os.path.abspath(path)) != store:
        raise SpecError(f"--load: {archive} is not in the model store {store}; build it there or pass --model-store")
    model_name, version, model_config = archive_info(path)
    ids = tuple(model_config.get("deviceIds") or ())
    if gpus is not None and any(i >= gpus for i in ids):
        raise SpecError(f"--load: {os.path.basename(path)} places workers on GPUs {list(ids)}, but this host has "
                        f"{gpus}; TorchServe would silently drop the list. Rebuild it with --gpus {gpus}")
    if gpus == 0 and (model_config.get("handler") or {}).get("cpu_fallback") is False:
        raise SpecError(f"--load: {os.path.basename(path)} requires a GPU (cpu_fallback: false) and this host has none")
    return ModelEntry(
        name=name or model_name, version=version, mar=os.path.basename(path),
        workers=model_config.get("minWorkers", 1), max_workers=model_config.get("maxWorkers"),
        batch_size=model_config.get("batchSize", 1), max_batch_delay_ms=model_config.get("maxBatchDelay", 100),
        response_timeout_s=model_config.get("responseTimeout", 120), device_type=model_config.get("deviceType"),
        device_ids=ids)

"""The deployment record and the restore plan (issue 20), without a server; and the `--only` papercut."""

from __future__ import annotations

import json
import os

import pytest

from archiver.cli import main
from archiver.errors import DeploymentError
from archiver.operate import deployment as record
from archiver.operate.restore import effective_config, plan
from tests import support


def _store(tmp_path) -> str:
    store = tmp_path / "store"
    store.mkdir()
    for name in ("m_v1.mar", "m_v2.mar", "m_v3.mar", "n_v1.mar"):
        (store / name).write_bytes(name.encode() * 100)
    return str(store)


def _version(store: str, archive: str, workers: int = 1) -> record.VersionRecord:
    stat = os.stat(os.path.join(store, archive))
    return record.VersionRecord(archive=archive, sha256=record.sha256_file(os.path.join(store, archive)),
                                size=stat.st_size, mtime_ns=stat.st_mtime_ns, min_workers=workers,
                                max_workers=workers, batch_size=8, max_batch_delay_ms=5)


def _deployment(store: str) -> record.Deployment:
    return record.Deployment(model_store=store, models={
        "m": record.ModelRecord(default="2.0", versions={
            "1.0": _version(store, "m_v1.mar", workers=2), "2.0": _version(store, "m_v2.mar"),
            "3.0": _version(store, "m_v3.mar")}),
        "n": record.ModelRecord(default="1.0", versions={"1.0": _version(store, "n_v1.mar")})})


def test_record_is_written_atomically_and_reads_back(tmp_path):
    store = _store(tmp_path)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    assert record.load(run_dir) is None
    deployment = _deployment(store)
    path = record.save(deployment, run_dir)
    assert record.load(run_dir) == deployment
    assert os.listdir(run_dir) == [os.path.basename(path)], "no temp file is left beside the record"
    aside = record.set_aside(run_dir)
    assert not os.path.exists(path) and record.load(run_dir) is None
    with open(aside, encoding="utf-8") as f:
        assert json.load(f)["models"]["m"]["default"] == "2.0"


def test_a_broken_record_is_refused_with_the_way_out(tmp_path):
    with open(tmp_path / record.RECORD_FILE, "w", encoding="utf-8") as f:
        f.write('{"format": 1, "models": {"m": ')
    with pytest.raises(DeploymentError, match=r"cannot read the deployment record .*--fresh"):
        record.load(str(tmp_path))


def test_plan_puts_each_default_first_and_refuses_missing_or_changed_archives_by_name(tmp_path):
    store = _store(tmp_path)
    deployment = _deployment(store)
    restored, refused = plan(deployment, store)
    assert [(r.model, r.version, r.default) for r in restored] == [
        ("m", "2.0", True), ("m", "1.0", False), ("m", "3.0", False), ("n", "1.0", True)]
    assert not refused

    os.remove(os.path.join(store, "m_v3.mar"))
    with open(os.path.join(store, "m_v2.mar"), "ab") as f:
        f.write(b"changed")
    restored, refused = plan(deployment, store)
    was = deployment.models["m"].versions["2.0"].sha256[:12]
    assert [str(r) for r in refused] == [
        f"m 2.0 (m_v2.mar): archive changed since it was deployed (SHA-256 was {was}...)",
        f"m 3.0 (m_v3.mar): archive missing from {store}"]
    # the default was refused: the first remaining version becomes the default, as TorchServe would make it
    assert [(r.model, r.version, r.default, r.min_workers) for r in restored] == [
        ("m", "1.0", True, 2), ("n", "1.0", True, 1)]


def test_effective_config_replaces_only_the_model_lines(tmp_path):
    store = _store(tmp_path)
    base = tmp_path / "config.properties"
    base.write_text("# header\ninference_address=http://127.0.0.1:1\nload_models=old=old.mar\n"
                    'models={"old":{}}\nenable_model_api=false\n')
    deployment = _deployment(store)
    restored, _ = plan(deployment, store)
    out = effective_config(str(base), deployment, restored, str(tmp_path / "effective.properties"))
    lines = open(out, encoding="utf-8").read().splitlines()
    assert lines[0] == "# header" and "inference_address=http://127.0.0.1:1" in lines
    assert "enable_model_api=false" in lines and "old" not in "".join(lines[2:])
    assert "load_models=m=m_v2.mar,m=m_v1.mar,m=m_v3.mar,n=n_v1.mar" in lines
    block = json.loads(next(line for line in lines if line.startswith("models="))[len("models="):])
    assert block["m"]["1.0"] == {"defaultVersion": False, "marName": "m_v1.mar", "minWorkers": 2, "maxWorkers": 2,
                                 "batchSize": 8, "maxBatchDelay": 5, "responseTimeout": 120}


def test_build_only_with_a_name_the_spec_lacks_is_a_one_line_error(capsys):
    code = main(["build", "--spec", os.path.join(support.REPO, "config", "deploy.yaml"), "--only", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("tspack build: --only: nosuch not in the spec; the spec has: digits")

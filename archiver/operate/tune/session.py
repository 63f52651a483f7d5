"""One `tspack tune` run: read the spec, serve and measure configurations within the budget, write the tuned
spec and the report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Optional

from archiver.operate.tune import load, report
from archiver.operate.tune.measure import Trial, TrialServer, remove_scratch, scratch_folder
from archiver.operate.tune.search import Search, TuneSettings, default_report_dir, dimensions, winner
from archiver.operate.tune.space import baseline, pick_model, runtimes, write_tuned_spec
from archiver.package.archive import read_manifest
from archiver.spec import DeploySpec
from handlers.device import available_cores


@dataclass
class TuneResult:
    trials: list[Trial]
    winner: Optional[Trial]
    tuned_spec: Optional[str]  # None when no configuration met the SLO
    report: dict[str, str]
    table: str
    verdict: str


def tune(settings: TuneSettings) -> TuneResult:
    """Search `settings.model`'s serving configuration against a private TorchServe on this host.

    Raises:
        SpecError: the spec or model is unknown, or the model has no validated archive (build it first).
        ServerError: TorchServe did not start.
        TuneError: wrk is missing or measured nothing.
    """
    started = time.monotonic()  # the budget covers the whole run, TorchServe's start included
    spec = DeploySpec.from_yaml(settings.spec_path)
    model = pick_model(spec, settings.model, settings.version)
    found = runtimes(spec, model)
    cores = settings.cores or available_cores()
    # Every request of a run sends the same body: with the response cache on, each trial would time cache hits.
    base = replace(model.serving, cache=None)
    work = scratch_folder()
    try:
        body = load.request_body(read_manifest(found[0].archive), work, model.samples)
        with _progress(settings) as bar, TrialServer(work) as server:
            def evaluate(number, config):
                bar.set_description(f"tune #{number}: {config.describe()}")
                return server.run(number, config, base, body, settings.concurrency, settings.duration_s)

            def seen(trial):
                bar.update(min(time.monotonic() - started, settings.budget_s) - bar.n)

            left = settings.budget_s - (time.monotonic() - started)
            search = Search(evaluate, settings.slo_p99_ms, left, settings.max_trials, on_trial=seen)
            trials = search.run(baseline(model, found, cores), dimensions(found, cores))
    finally:
        remove_scratch(work)
    best = winner(trials, settings.slo_p99_ms)
    tuned = None
    if best is not None:
        out = settings.spec_path if settings.write else tuned_path(settings.spec_path)
        note = (f"tspack tune: {model.name} {model.version}, p99 SLO {settings.slo_p99_ms:g} ms, clients "
                f"{','.join(map(str, settings.concurrency))}, {cores} cores.\nWinner: {best.config.describe()}; "
                f"serve its archive {os.path.basename(best.config.runtime.archive)}.")
        tuned = write_tuned_spec(settings.spec_path, model, best.config, out, note)
    folder = settings.report_dir or default_report_dir(spec.model_store, model.name, model.version)
    paths = report.write(folder, trials, settings, best, cores, tuned)
    return TuneResult(trials, best, tuned, paths, report.text_table(trials, settings, best),
                      report.verdict(best, settings))


def tuned_path(spec_path: str) -> str:
    """FILE.yaml -> FILE.tuned.yaml, beside it (relative paths in the spec keep their meaning)."""
    root, ext = os.path.splitext(spec_path)
    return f"{root}.tuned{ext or '.yaml'}"


def _progress(settings: TuneSettings):
    from tqdm import tqdm

    return tqdm(total=settings.budget_s, unit="s", disable=not settings.progress, leave=False,
                desc="tune: starting TorchServe",
                bar_format="{desc:.70}: {percentage:3.0f}% of the budget |{bar}| {n:.0f}/{total:.0f} s")

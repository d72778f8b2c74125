"""Experiment tracking (optional, ``fedbridge[tracking]``): a finished bundle, logged to MLflow.

One MLflow run per bundle: params = the stage's config, metrics = its history (per epoch for
``bridge``/``train``, per round and per site for a federation: ``site/NAME/train_loss`` …) and
its final validation metrics, artifacts = ``model.json`` and whatever report files lie beside
it (``report.html``, ``metrics.json``, the federation's ``state.json``). Read from the bundle,
so the logged values are the bundle's values. Imported only when ``--tracking mlflow`` is given.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fedbridge_shared import rounds as R
from fedbridge_shared.errors import ConfigError, FedbridgeError
from fedbridge_shared.layout import SPEC_FILE

EXPERIMENT = "fedbridge"
REPORT_FILES = ("report.html", "metrics.json")
_BATCH = 100  # MLflow accepts at most 100 params and 1000 metrics per log_batch


def require() -> None:
    """Fail before any training when MLflow is missing (the CLI names the extra)."""
    if importlib.util.find_spec("mlflow") is None:
        raise ModuleNotFoundError("No module named 'mlflow'", name="mlflow")


def default_uri(out: Path) -> str:
    """A local file store, ``mlruns`` beside the bundle folder ``out``."""
    return (Path(out).resolve().parent / "mlruns").as_uri()


def _numbers(row: dict[str, Any], skip: Sequence[str] = ()) -> Iterator[tuple[str, float]]:
    for key, value in row.items():
        if key in skip or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            yield key, float(value)


def _name(text: str) -> str:
    """A metric-name-safe site name (MLflow allows letters, digits, ``_-. /``)."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", text)


def metrics_of(record: dict[str, Any]) -> list[tuple[str, float, int]]:
    """``(key, value, step)`` for a bundle record: per epoch, per round and per site."""
    training = record.get("training") or {}
    out: list[tuple[str, float, int]] = []
    for row in training.get("history") or []:
        if R.ROUND in row:  # a federation: step = round
            step = int(row[R.ROUND])
            out += [(k, v, step) for k, v in _numbers(row, skip=(R.ROUND,))]
            out.append(("dropped_sites", float(len(row.get(R.DROPPED) or [])), step))
            if row.get(R.PRIVACY):
                out += [(f"privacy/{k}", v, step) for k, v in _numbers(row[R.PRIVACY])]
            for site, numbers in (row.get(R.PER_SITE) or {}).items():
                out += [(f"site/{_name(site)}/{k}", v, step) for k, v in _numbers(numbers)]
        else:  # a central stage: step = epoch
            step = int(row.get("epoch", len(out)))
            out += [(k, v, step) for k, v in _numbers(row, skip=("epoch",))]
    metrics = record.get("metrics") or {}
    for key, v in _numbers(metrics.get("validation") or {}):
        out.append((f"validation/{key}", v, 0))
    if training.get("best_round"):
        out.append(("best_round", float(training["best_round"]), 0))
    if training.get("best_epoch"):
        out.append(("best_epoch", float(training["best_epoch"]), 0))
    return out


def params_of(record: dict[str, Any]) -> dict[str, str]:
    """The stage's config (flat), plus the model's architecture and input size."""
    training = record.get("training") or {}
    spec = record.get("spec") or record
    params = {str(k): str(v) for k, v in (training.get("config") or {}).items()}
    for key in ("arch", "image_size"):
        if key in spec:
            params.setdefault(key, str(spec[key]))
    return {k[:250]: v[:6000] for k, v in params.items()}


def log_bundle(
    bundle: Path,
    *,
    uri: str,
    run_name: str | None = None,
    extra_files: Sequence[Path] = (),
    experiment: str = EXPERIMENT,
) -> str:
    """Log the bundle at ``bundle`` as one finished MLflow run; returns the run's id."""
    require()
    if uri.startswith("file:") or "://" not in uri:  # MLflow 3 wants an opt-in for a file store
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    path = Path(bundle) / SPEC_FILE
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the bundle to track it ({e})") from e
    try:
        return _log(record, path, uri=uri, run_name=run_name, extra_files=extra_files,
                    experiment=experiment)  # fmt: skip
    except (FedbridgeError, KeyboardInterrupt):
        raise
    except Exception as e:  # MLflow's own errors, an unreachable server: the bundle stays
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FedbridgeError(
            f"tracking at {uri} failed ({first}); the bundle {path.parent} is written"
        ) from e


def _log(
    record: dict[str, Any],
    path: Path,
    *,
    uri: str,
    run_name: str | None,
    extra_files: Sequence[Path],
    experiment: str,
) -> str:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    bundle = path.parent
    training = record.get("training") or {}
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    exp_id = found.experiment_id if found else client.create_experiment(experiment)
    tags = {"stage": str(training.get("stage", "")), "bundle": str(Path(bundle).resolve())}
    if record.get("weights_sha256"):
        tags["weights_sha256"] = str(record["weights_sha256"])
    run = client.create_run(exp_id, run_name=run_name or Path(bundle).name, tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v) for k, v in params_of(record).items()]
        metrics = [Metric(k, v, now, s) for k, v, s in metrics_of(record)]
        for i in range(0, max(len(params), len(metrics)), _BATCH):
            client.log_batch(
                run_id, metrics=metrics[i : i + _BATCH], params=params[i : i + _BATCH],
                tags=[RunTag(k, v) for k, v in tags.items()] if i == 0 else [],
            )  # fmt: skip
        client.log_artifact(run_id, str(path))
        for extra in (*(Path(bundle) / f for f in REPORT_FILES), *map(Path, extra_files)):
            if extra.is_file():
                client.log_artifact(run_id, str(extra))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return str(run_id)

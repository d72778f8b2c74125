"""`fedbridge server status` from a real round store, and `--tracking mlflow` read back from the
local MLflow store: one tiny simulated federation and one tiny central train on real CXR."""

import json
import os
from pathlib import Path

import pytest
from cli import assert_one_line_error, fedbridge, json_out, ok

from fedbridge_server.status import collect
from fedbridge_shared.spec import read_bundle_record

os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the client below reads a file store


@pytest.fixture(scope="module")
def tracked_federation(fed, tmp_path_factory):
    """2 rounds, 3 sites, tracking on with the default store (mlruns beside --out)."""
    root, split = fed
    work = tmp_path_factory.mktemp("tracked")
    out = work / "fed"
    ok(
        "federate", "simulate", "--init", root / "bridge",
        "--site", split / "site-1", "--site", split / "site-2", "--site", split / "site-3",
        "--out", out, "--rounds", "2", "--augment-per-sample", "0", "--batch-size", "32",
        "--val-data", split / "test",
        "--tracking", "mlflow",
    )  # fmt: skip
    return out


def _client(uri):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _only_run(client, stage):
    exp = client.get_experiment_by_name("fedbridge")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.stage = '{stage}'")
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_status_after_a_run_reads_rounds_sites_best_and_history(tracked_federation):
    out = tracked_federation
    state = json.loads((out.with_name("fed-rounds") / "state.json").read_text())
    doc = json_out("server", "status", "--out", out, "--json")
    assert doc == json.loads(json.dumps(collect(out)))  # the command prints what collect builds
    rounds = doc["rounds"]
    assert rounds["total"] == 2 and rounds["completed"] == 2 and rounds["finished"]
    assert rounds["current"] is None  # live.json names round 2, which completed
    assert rounds["running"] is False
    assert (
        rounds["best_round"] == state["best_round"] and rounds["best_score"] == state["best_score"]
    )
    assert doc["history"] == state["history"] and doc["bundle"] == str(out)
    assert [h["sites"] for h in doc["history"]] == [["site-1", "site-2", "site-3"]] * 2
    per_site = doc["history"][1]["per_site"]["site-2"]
    assert per_site["train_examples"] > 0 and 0 <= per_site["val_accuracy"] <= 1
    assert doc["dropped"] == []
    # no coordinator ever ran here: the SuperLink part says so, the rounds are still shown
    assert doc["superlink"]["reachable"] is False and "fed-superlink" in doc["superlink"]["error"]
    assert doc["sites"] == [] and doc["runs"] == []
    live = json.loads((out.with_name("fed-rounds") / "live.json").read_text())
    assert live["round"] == 2 and live["rounds"] == 2 and live["phase"] == "evaluation"
    assert sorted(live["nodes"].values()) == ["site-1", "site-2", "site-3"]
    # the table for people names the same numbers
    text = ok("server", "status", "--out", out).stdout
    assert "rounds: 2 of 2 completed" in text and f"best round {state['best_round']}" in text
    assert "site-3" in text and "not reachable" in text


def test_status_mid_run_shows_the_round_in_progress(tracked_federation, tmp_path):
    """A round store copied as it is during round 2's training (state.json after round 1)."""
    import shutil

    src = tracked_federation.with_name("fed-rounds")
    out = tmp_path / "fed"
    rounds = shutil.copytree(src, tmp_path / "fed-rounds")
    state = json.loads((src / "state.json").read_text())
    state.update(completed=1, history=state["history"][:1])
    (rounds / "state.json").write_text(json.dumps(state))
    live = json.loads((src / "live.json").read_text()) | {"phase": "training"}
    (rounds / "live.json").write_text(json.dumps(live))
    doc = collect(out)
    assert doc["rounds"]["completed"] == 1 and not doc["rounds"]["finished"]
    assert doc["rounds"]["current"]["round"] == 2
    assert doc["rounds"]["current"]["phase"] == "training"
    assert doc["bundle"] is None and len(doc["history"]) == 1
    assert doc["rounds"]["running"] is False  # no SuperLink runs it: interrupted, resumable
    text = ok("server", "status", "--out", out).stdout
    assert "round 2 was in training when its run stopped" in text, text


def test_status_without_a_coordinator_is_one_line_error(tmp_path):
    result = fedbridge("server", "status", "--out", tmp_path / "nothing", "--json")
    assert_one_line_error(result, "no coordinator here", "nothing-superlink", "nothing-rounds")


def test_tracked_federation_logs_rounds_sites_config_and_files(tracked_federation):
    out = tracked_federation
    client = _client((out.parent / "mlruns").as_uri())
    run = _only_run(client, "federated")
    record = read_bundle_record(out)
    history = record["training"]["history"]
    assert run.info.status == "FINISHED"
    assert run.data.params["num-server-rounds"] == "2" and run.data.params["strategy"] == "fedavg"
    for key in ("train_loss", "federated_val_accuracy", "server_val_loss", "score"):
        got = client.get_metric_history(run.info.run_id, key)
        assert [(m.step, m.value) for m in sorted(got, key=lambda m: m.step)] == [
            (h["round"], h[key]) for h in history
        ], key
    site = client.get_metric_history(run.info.run_id, "site/site-1/val_loss")
    assert sorted((m.step, m.value) for m in site) == [
        (h["round"], h["per_site"]["site-1"]["val_loss"]) for h in history
    ]
    best = client.get_metric_history(run.info.run_id, "best_round")
    assert [m.value for m in best] == [record["training"]["best_round"]]
    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model.json", "state.json"} <= files
    local = client.download_artifacts(run.info.run_id, "model.json")
    assert json.loads(Path(local).read_text()) == record


def test_tracked_train_logs_every_epoch_and_the_validation_metrics(fed, tmp_path):
    root, split = fed
    uri = (tmp_path / "elsewhere").as_uri()  # --tracking-uri: not the default folder
    ok(
        "train", split / "site-1", "--out", tmp_path / "central", "--model", "test_efficientnet",
        "--init", "none", "--image-size", "48", "--epochs", "2", "--batch-size", "32",
        "--augment-per-sample", "0", "--patience", "5",
        "--tracking", "mlflow",
        "--tracking-uri", uri,
    )  # fmt: skip
    assert not (tmp_path / "mlruns").exists()
    client = _client(uri)
    run = _only_run(client, "train")
    record = read_bundle_record(tmp_path / "central")
    history = record["training"]["history"]
    assert len(history) == 2
    for key in ("train_loss", "val_loss", "val_accuracy"):
        got = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [(m.step, m.value) for m in got] == [(h["epoch"], h[key]) for h in history], key
    accuracy = client.get_metric_history(run.info.run_id, "validation/accuracy")
    assert [m.value for m in accuracy] == [record["metrics"]["validation"]["accuracy"]]
    assert run.data.params["epochs"] == "2" and run.data.params["arch"] == "test_efficientnet"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"model.json"}
    # a store that cannot take the run: one line naming it, and the bundle stays as written
    from fedbridge_shared.errors import FedbridgeError
    from fedbridge_shared.tracking import log_bundle

    with pytest.raises(FedbridgeError, match="tracking at bogus://nowhere failed") as e:
        log_bundle(tmp_path / "central", uri="bogus://nowhere")
    assert "\n" not in str(e.value) and read_bundle_record(tmp_path / "central") == record


def test_tracking_is_off_by_default_and_a_bad_choice_is_one_line(fed, tmp_path):
    root, split = fed
    result = fedbridge("train", split / "site-1", "--out", tmp_path / "x", "--tracking", "wandb")
    assert_one_line_error(result, "--tracking", "wandb")
    assert not (tmp_path / "x").exists()
    assert not (root / "mlruns").exists()  # the fixture's bridge ran without --tracking


def test_missing_mlflow_names_the_tracking_extra():
    from fedbridge.cli.extras import missing_extra_message

    line = missing_extra_message("mlflow", ["federate", "simulate"])
    assert "'tracking' extra" in line and "fedbridge[tracking]" in line
    assert "'tracking' extra" in missing_extra_message("mlflow", ["train", "data"])

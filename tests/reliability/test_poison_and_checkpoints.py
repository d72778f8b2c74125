"""A malicious site cannot poison the global model; a corrupted round checkpoint is not used.

Simulation runtime (same ServerApp round loop as the Deployment Engine). Malicious sites are
ClientApp mods that rewrite the site's *reply* after honest training.
"""

from __future__ import annotations

import json
import logging
import os
import sys

import cloudpickle
import pytest
import torch
from flwr.app import Array, ArrayRecord
from rich.console import Console

from fedbridge.simulate import simulate
from fedbridge_server.quorum import QuorumError
from fedbridge_server.store import RoundStore, RunState
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.spec import WEIGHTS_FILE, ModelSpec, load_bundle

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # mods below run in Ray actors


def _flat(root, out, rounds=2, **extra):
    return {
        "init": str(root / "bridge"),
        "out": str(out),
        "num-server-rounds": rounds,
        "augment-per-sample": 1,
        "batch-size": 32,
        "min-train-sites": 1,
        "min-evaluate-sites": 3,
        "min-available-sites": 3,
        "lr": 1e-3,
        "seed": 11,
        **extra,
    }


def _run(flat, split, mods=()):
    quiet = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    return simulate(flat, [split / f"site-{i}" for i in (1, 2, 3)], out=quiet, mods=mods)


def _is(context, msg, partition: int, rnd: int) -> bool:
    return (
        int(context.node_config["partition-id"]) == partition
        and msg.metadata.message_type == "train"
        and int(msg.content["config"]["server-round"]) == rnd
    )


def _rewrite(reply, change):
    """Change the packed weight vector a site sends (see fedbridge_shared.weights.pack)."""
    flat = reply.content["arrays"]["weights"].numpy().copy()
    reply.content["arrays"] = ArrayRecord({"weights": Array(change(flat))})
    return reply


def _nan(flat):
    flat[len(flat) // 2] = float("nan")
    return flat


def malicious(msg, context, call_next):
    """site-2 sends NaN weights in round 1; site-3 a wrongly shaped tensor in round 2."""
    reply = call_next(msg, context)
    if _is(context, msg, 1, 1):
        return _rewrite(reply, _nan)
    if _is(context, msg, 2, 2):
        return _rewrite(reply, lambda flat: flat[:-7])  # does not fit the model
    return reply


def absent(msg, context, call_next):
    """The reference: the same two sites simply fail in the same rounds."""
    if _is(context, msg, 1, 1) or _is(context, msg, 2, 2):
        raise RuntimeError("absent")
    return call_next(msg, context)


def test_nan_and_misshaped_updates_are_dropped_and_do_not_poison_the_model(fed, tmp_path):
    root, split = fed
    bad = _run(_flat(root, tmp_path / "bad"), split, mods=[malicious])
    r1, r2 = bad["history"]
    assert r1["sites"] == ["site-1", "site-3"] and r2["sites"] == ["site-1", "site-2"]
    assert any(
        d.startswith("site-2: update rejected") and "NaN or Inf" in d for d in r1["dropped"]
    ), r1
    assert any(d.startswith("site-3: update rejected") and "shape" in d for d in r2["dropped"]), r2
    ref = _run(_flat(root, tmp_path / "ref"), split, mods=[absent])
    assert [h["sites"] for h in ref["history"]] == [r1["sites"], r2["sites"]]
    for name in ("round-0001", "round-0002"):
        a = load_bundle(tmp_path / "bad-rounds" / name).state_dict  # verified: finite
        b = load_bundle(tmp_path / "ref-rounds" / name).state_dict
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: not the honest aggregate"
    summary = {"poisoned": [r1["dropped"], r2["dropped"]], "identical_to_honest": True}
    print(json.dumps(summary))


def lost_in_round_2(msg, context, call_next):
    """site-2 fails in round 2 (as a site lost mid-round does)."""
    if _is(context, msg, 1, 2):
        raise RuntimeError("lost")
    return call_next(msg, context)


def test_a_round_below_the_quorum_stops_the_run_and_it_resumes_later(fed, tmp_path):
    root, split = fed
    out = tmp_path / "fed"
    with pytest.raises(QuorumError) as stopped:
        _run(_flat(root, out, **{"min-train-sites": 3}), split, mods=[lost_in_round_2])
    text = str(stopped.value)
    assert "round 2: 2 usable update(s), fewer than the quorum of 3" in text
    assert "site-2: failed" in text and "Rounds up to 1 are saved" in text
    assert not out.exists() and (tmp_path / "fed-rounds" / "round-0001").is_dir()
    # the quorum is not a weight-changing setting: the same run resumes with a smaller one
    summary = _run(_flat(root, out, **{"min-train-sites": 2}), split)
    assert [h["round"] for h in summary["history"]] == [1, 2]
    assert summary["history"][1]["sites"] == ["site-1", "site-2", "site-3"]
    assert load_bundle(out).training["rounds"] == 2


# ------------------------------------------------------------------------ round checkpoints


def _spec() -> ModelSpec:
    return ModelSpec(arch="test_efficientnet", labels=("A", "B"), image_size=32)


def _weights(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3, 2), value), "b": torch.full((2,), value)}


def _save_rounds(store: RoundStore, n: int) -> RunState:
    state = RunState({"seed": 1})
    for rnd in range(1, n + 1):
        state.completed = rnd
        state.history.append({"round": rnd, "score": 1.0 / rnd})
        state.best_round, state.best_score = rnd, 1.0 / rnd
        store.save_round(state, _spec(), _weights(rnd), {"round": rnd}, {}, {})
    return state


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous_round(tmp_path, caplog):
    store = RoundStore(tmp_path / "model", keep_last=3)
    _save_rounds(store, 3)
    _flip_a_byte(store.round_dir(3) / WEIGHTS_FILE)
    with caplog.at_level(logging.WARNING, logger="fedbridge.server"):
        state, bundle, _ = store.load({"seed": 1})
    assert state.completed == 2 and state.best_round == 2
    assert [h["round"] for h in state.history] == [1, 2]
    assert torch.equal(bundle.state_dict["w"], _weights(2)["w"])
    assert "round 3 checkpoint unusable" in caplog.text and "does not match" in caplog.text

    (store.round_dir(2) / "model.json").unlink()  # the next one broken another way
    state, bundle, _ = store.load({"seed": 1})
    assert state.completed == 1 and torch.equal(bundle.state_dict["w"], _weights(1)["w"])

    _flip_a_byte(store.round_dir(1) / WEIGHTS_FILE)  # nothing usable: a fresh start
    state, bundle, _ = store.load({"seed": 1})
    assert state.completed == 0 and bundle is None


def test_unreadable_state_and_other_settings_are_refused(tmp_path):
    store = RoundStore(tmp_path / "model")
    _save_rounds(store, 1)
    with pytest.raises(ConfigError, match="other settings \\(seed\\)"):
        store.load({"seed": 2})
    (store.dir / "state.json").write_text('{"completed": 1, "fing')
    with pytest.raises(ConfigError, match="state.json: unreadable run state"):
        store.load({"seed": 1})


def test_restart_after_corrupting_the_newest_round_reruns_it_identically(fed, tmp_path):
    """End to end: the corrupted round 2 is detected by hash, round 1 is used, round 2 rerun."""
    root, split = fed
    # one torch thread per site: float sums depend on the thread count (see RELIABILITY.md)
    flat = _flat(root, tmp_path / "fed", **{"min-train-sites": 3, "threads": 1})
    first = _run(flat, split)
    rounds = tmp_path / "fed-rounds"
    before = load_bundle(rounds / "round-0002").state_dict
    _flip_a_byte(rounds / "round-0002" / WEIGHTS_FILE)
    again = _run(flat, split)
    assert [h["round"] for h in again["history"]] == [1, 2]
    after = load_bundle(rounds / "round-0002").state_dict  # verifies the rewritten checkpoint
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert before.keys() == after.keys() and first["best_round"] >= 1
    assert all(torch.equal(before[k], after[k]) for k in before), "rerun round 2 differs"

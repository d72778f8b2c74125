"""The site worker of a deployed site: frames, and the ClientApp → worker path on real images.

Known answer: a task sent through the ClientApp's socket path to a worker gives exactly the
weights and metrics that :class:`Site` gives when called directly with the same task.
"""

import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from badinputs import make_class_tree
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, RecordDict

from fedbridge_client import client_app
from fedbridge_client.site import Site
from fedbridge_client.wire import WireError, recv_frame, send_frame
from fedbridge_client.worker import Worker
from fedbridge_shared import protocol as P
from fedbridge_shared.models import init_model
from fedbridge_shared.processes import stop_pids
from fedbridge_shared.protocol import LocalSettings, RoundTask
from fedbridge_shared.weights import pack, shared_state, unpack

SETTINGS = LocalSettings(batch_size=8, augment_per_sample=1, lr=1e-3, proximal_mu=0.0)


def test_a_frame_carries_its_header_and_named_arrays_exactly():
    a, b = socket.socketpair()
    arrays = {
        "features.0.weight": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(7, dtype=np.int64),
    }
    with a, b:
        send_frame(a, {"kind": "train", "config": {"x": 1.5, "s": "é"}}, arrays)
        header, got = recv_frame(b)
    assert header == {"kind": "train", "config": {"x": 1.5, "s": "é"}}
    assert set(got) == set(arrays)
    assert all(np.array_equal(got[k], arrays[k]) and got[k].dtype == arrays[k].dtype for k in got)


def test_a_cut_or_oversized_frame_is_refused_without_reading_it():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(struct.pack("!QQ", 10, 1 << 40))  # declares a 1 TiB body
        with pytest.raises(WireError, match="over the limit"):
            recv_frame(b)
    a, b = socket.socketpair()
    with b:
        with a:
            a.sendall(struct.pack("!QQ", 10, 0) + b'{"ki')
        with pytest.raises(WireError, match="connection closed with 6 of 10 bytes unread"):
            recv_frame(b)


@pytest.fixture(scope="module")
def site_data(cxr_root, tmp_path_factory):
    data = make_class_tree(tmp_path_factory.mktemp("worker") / "data", cxr_root, per_class=5)
    labels = Site(data, "probe").index.labels
    model, spec = init_model("none", labels, "test_efficientnet", 48)
    return data, spec, shared_state(model)


def _message(kind: str, spec, state) -> Message:
    task = RoundTask(spec.to_dict(), SETTINGS, 2, 3)
    arrays = ArrayRecord({P.WEIGHTS: Array(pack(state))})
    content = RecordDict({P.CONFIG: ConfigRecord(task.to_config()), P.ARRAYS: arrays})
    metadata = Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=1, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=3600.0, message_type=kind,
    )  # fmt: skip
    return Message(content=content, metadata=metadata)


@pytest.fixture
def worker_socket(site_data, tmp_path):
    data, _, _ = site_data
    worker, path = Worker(data, "site-x"), tmp_path / "w.sock"
    thread = threading.Thread(target=worker.serve, args=(path,), daemon=True)
    thread.start()
    for _ in range(200):  # the socket appears as soon as serve() binds it
        if path.exists():
            break
        thread.join(0.05)
    return str(path)


def test_the_clientapp_path_through_the_worker_equals_the_site_itself(site_data, worker_socket):
    data, spec, state = site_data
    direct_state, direct = Site(data, "site-x").train(RoundTask(spec.to_dict(), SETTINGS, 2, 3),
                                                      state)  # fmt: skip
    reply = client_app._in_worker(worker_socket, _message("train", spec, state))
    assert list(reply[P.ARRAYS]) == [P.WEIGHTS]  # one packed array: one HTTP object
    got = unpack(reply[P.ARRAYS][P.WEIGHTS].numpy(), state)
    assert list(got) == list(direct_state)
    assert all(torch.equal(got[k], direct_state[k]) for k in got)
    metrics = dict(reply[P.METRICS])
    assert metrics[P.NUM_EXAMPLES] == direct.num_examples
    assert metrics["train-loss"] == pytest.approx(direct.train_loss)
    assert reply[P.SITE][P.SITE_NAME] == "site-x"
    evaluated = client_app._in_worker(worker_socket, _message("evaluate", spec, state))
    assert P.ARRAYS not in evaluated
    direct_eval = Site(data, "site-x").evaluate(RoundTask(spec.to_dict(), SETTINGS, 2, 3), state)
    assert direct_eval.num_examples > 0  # the comparison below has images behind it
    assert dict(evaluated[P.METRICS])["val-accuracy"] == pytest.approx(direct_eval.val_accuracy)
    assert dict(evaluated[P.METRICS])["val-loss"] == pytest.approx(direct_eval.val_loss)


def test_a_failing_task_and_a_missing_worker_are_reported_as_site_errors(
    site_data, worker_socket, tmp_path
):
    _, spec, state = site_data
    other = spec.to_dict() | {"labels": ["A", "B"]}  # classes this site does not have
    msg = _message("train", spec, state)
    msg.content[P.CONFIG][P.SPEC_JSON] = json.dumps(other)
    with pytest.raises(P.SiteFailure, match="refused the task: labels_differ") as refused:
        client_app._in_worker(worker_socket, msg)
    # what crosses the wire is a code and a count, never the message with the site's folders
    assert refused.value.wire() == '{"error": "labels_differ", "count": 1}'
    # a task outside fedbridge's schema (an extra key) is refused before the data is touched
    odd = _message("evaluate", spec, state)
    odd.content[P.CONFIG]["walk"] = "/"
    with pytest.raises(P.SiteFailure, match="bad_task"):
        client_app._in_worker(worker_socket, odd)
    # the worker survives a failed task and serves the next one
    assert client_app._in_worker(worker_socket, _message("evaluate", spec, state))[P.METRICS]
    with pytest.raises(P.SiteFailure, match="worker is not running") as down:
        client_app._in_worker(str(tmp_path / "gone.sock"), msg)
    assert down.value.code == P.SiteErrorCode.WORKER_DOWN


def test_a_worker_started_with_a_label_map_trains_the_sites_set_labelled_films(
    site_data, data_root, tmp_path
):
    """The worker `site join` starts, as a process, with the site's own --label-map."""
    data, _, _ = site_data
    adult = tmp_path / "data"
    shutil.copytree(data, adult)
    nih = data_root / "bridge" / "cxr-adult" / "PNEUMONIA_UNSPECIFIED"
    (adult / nih.name).mkdir()
    for image in sorted(nih.glob("*.jpg"))[:6]:
        shutil.copy(image, adult / nih.name / image.name)
    labels = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")
    model, spec = init_model("none", labels, "test_efficientnet", 48)
    state = shared_state(model)
    path = tmp_path / "w.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedbridge_client.worker", "--socket", str(path), "--data",
         str(adult), "--name", "site-a", "--label-map",
         "PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for _ in range(60_000):  # until it binds or dies (importing torch takes a while)
            if path.exists() or proc.poll() is not None:
                break
            time.sleep(0.1)
        assert path.exists(), proc.stderr.read() if proc.stderr else ""
        reply = client_app._in_worker(str(path), _message("train", spec, state))
        metrics = dict(reply[P.METRICS])
        counted = sum(metrics[f"class-count-{i}"] for i in range(len(labels)))
        assert metrics[P.NUM_EXAMPLES] == counted + 6  # the 6 films train, as a label set
    finally:
        stop_pids([proc.pid])  # SIGTERM, SIGKILL after 15 s
        proc.wait()

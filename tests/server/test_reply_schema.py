"""The coordinator accepts only fedbridge's closed reply schema from a site, and shows a site's
failure as a code and a count from the enum, never the text it sent."""

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.app.error import Error

from fedbridge_server.strategy import screen_replies
from fedbridge_shared import protocol as P


def _meta(kind: str, src: int, reply_to: str = "") -> Metadata:
    return Metadata(
        run_id=1, message_id=f"m{src}{reply_to}", src_node_id=src, dst_node_id=src,
        reply_to_message_id=reply_to, group_id="", created_at=time.time(), ttl=60.0,
        message_type=kind,
    )  # fmt: skip


def _reply(kind="evaluate", src=7, metrics=None, site=None, extra=None) -> Message:
    records = {
        P.METRICS: MetricRecord(metrics or {P.NUM_EXAMPLES: 3, "val-loss": 0.5}),
        P.SITE: ConfigRecord(site or {P.SITE_NAME: "site-a"}),
        **(extra or {}),
    }
    if kind == "train":
        records[P.ARRAYS] = ArrayRecord({P.WEIGHTS: Array(np.zeros(3, np.float32))})
    return Message(content=RecordDict(records), metadata=_meta(kind, src, f"s{src}"))


def _sent(kind: str) -> Message:
    metadata = Metadata(
        run_id=1, message_id="s7", src_node_id=0, dst_node_id=7, reply_to_message_id="",
        group_id="", created_at=time.time(), ttl=60.0, message_type=kind,
    )  # fmt: skip
    return Message(content=RecordDict(), metadata=metadata)


PLANTED = "DOE_JOHN_MRN4471234_1961-02-03"


@pytest.mark.parametrize(
    "reply",
    [
        _reply(metrics={P.NUM_EXAMPLES: 3, PLANTED: 1.0}),
        _reply(site={P.SITE_NAME: f"/data/{PLANTED}.jpg"}),
        _reply(site={P.SITE_NAME: "site-a", "path": PLANTED}),
        _reply(extra={"loot": ConfigRecord({"files": PLANTED})}),
        _reply(metrics={P.NUM_EXAMPLES: 3, "class-count-0": 1, "class-correct-0x": 1}),
    ],
)
def test_a_reply_outside_the_schema_is_dropped_without_repeating_it(reply):
    sent = _sent("evaluate")
    usable, dropped = screen_replies([sent], [reply], None, {})
    assert usable == [] and len(dropped) == 1 and "not fedbridge's schema" in dropped[0]
    assert PLANTED not in dropped[0] and "MRN" not in dropped[0]


def test_a_reply_in_the_schema_is_kept():
    sent = _sent("evaluate")
    metrics = {P.NUM_EXAMPLES: 3, "val-loss": 0.5, "class-count-0": 2, "class-correct-0": 1}
    usable, dropped = screen_replies([sent], [_reply(metrics=metrics)], None, {})
    assert len(usable) == 1 and dropped == []


@pytest.mark.parametrize(
    ("reason", "shown"),
    [
        ("<class 'SiteError'>:<'{\"error\": \"unreadable_images\", \"count\": 2}'>",
         "unreadable_images: 2"),
        (f"DataError: /data/CNV/{PLANTED}.jpg: truncated", "not in fedbridge's schema"),
        ('{"error": "' + PLANTED.lower()[:20] + '", "count": 1}', "not in fedbridge's schema"),
    ],
)  # fmt: skip
def test_an_error_reply_is_shown_as_a_code_and_a_count_only(reason, shown):
    sent = _sent("train")
    error = Message(error=Error(code=0, reason=reason), metadata=_meta("train", 7, "s7"))
    usable, dropped = screen_replies([sent], [error], None, {})
    assert usable == [] and shown in dropped[0] and "MRN" not in dropped[0]


def test_a_site_worker_takes_record_level_dp_tasks_and_nothing_else():
    """The deployed worker answers only fedbridge's round-task keys, DP-SGD's included."""
    from fedbridge_shared.protocol import (
        WEIGHTS,
        LocalSettings,
        RecordDP,
        RoundTask,
        task_problem,
    )  # fmt: skip

    task = RoundTask({"arch": "x"}, LocalSettings(), 1, 2, dp=RecordDP(target_epsilon=4.0))
    config = task.to_config()
    assert any(k.startswith("dp-sgd.") for k in config)
    assert task_problem({"kind": "train", "config": config}, [WEIGHTS]) is None
    config["data-path"] = "/site/images"  # a foreign key: refused
    assert task_problem({"kind": "train", "config": config}, [WEIGHTS]) is not None


def test_secure_aggregation_replies_have_a_closed_schema_too():
    """Keys, encrypted shares and revealed secrets are short byte strings under fixed key
    names; a string (a name, a path) or another record is refused."""
    ok = {P.SECAGG_RECORD: {"enc-public": b"k" * 32, "to-1234": b"x" * 200}}
    assert P.reply_problem("query.secagg_setup", ok) is None
    assert P.reply_problem("query.secagg_share", {P.SECAGG_RECORD: {"to-1": "DOE_JOHN"}})
    assert P.reply_problem("query.secagg_unmask", {P.SECAGG_RECORD: {"path": b"x" * 5000}})
    assert P.reply_problem("query.secagg_unmask", {**ok, "extra": {}})
    masked = {
        P.ARRAYS: {P.WEIGHTS: None},
        P.METRICS: {P.NUM_EXAMPLES: 3, "secagg-clipped": 0},
        P.SITE: {P.SITE_NAME: "site-a"},
    }
    assert P.reply_problem("train.secagg", masked) is None
    assert P.reply_problem("train", masked)  # the clip count belongs to secure rounds only

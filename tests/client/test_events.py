"""The site console in words: what a site did each round, its images per class by label name,
and the end of a run, from the events file the ClientApp writes."""

from fedbridge_client.events import STARTED, EventFollower, append_event, describe_event
from fedbridge_shared import protocol as P

LABELS = ["CNV", "DME", "DRUSEN", "NORMAL"]


def _events(tmp_path, *entries) -> list[str]:
    path = tmp_path / "events.jsonl"
    shown: list[str] = []
    follower = EventFollower(path, lambda e: shown.append(describe_event(e)))
    for kw in entries:
        append_event(path, **kw)
    follower.read_new()
    return shown


def test_a_round_in_words_with_counts_by_label_and_the_end_of_the_run(tmp_path):
    trained = P.TrainReply(
        num_examples=17, class_counts=(5, 4, 0, 8), train_loss=0.52, train_accuracy=0.7,
        seconds=3.2,
    ).to_metrics()  # fmt: skip
    checked = P.EvalReply(
        num_examples=6, class_counts=(2, 1, 0, 3), val_loss=0.4, val_accuracy=0.5,
        class_correct=(1, 1, 0, 1),
    ).to_metrics()  # fmt: skip
    common = {"round_": 3, "rounds": 3, "ok": True}
    shown = _events(
        tmp_path,
        {**common, "kind": "training", "detail": STARTED},
        {**common, "kind": "training", "detail": "x", "metrics": trained, "labels": LABELS},
        {**common, "kind": "evaluation", "detail": "x", "metrics": checked, "labels": LABELS},
    )
    assert shown == [
        "round 3 of 3: training started",
        "round 3 of 3: trained on 17 image(s) (CNV 5, DME 4, DRUSEN 0, NORMAL 8): loss 0.520, "
        "accuracy 0.700, 3.2 s; update sent to the coordinator",
        "round 3 of 3: checked the new global model on 6 validation image(s) (CNV 2, DME 1, "
        "DRUSEN 0, NORMAL 3): accuracy 0.500, loss 0.400; result sent to the coordinator\n"
        "run finished: all 3 round(s) done; waiting for the next run",
    ]
    assert not any("class-count" in line for line in shown)


def test_a_refusal_keeps_its_local_reason_and_an_older_line_reads_as_written(tmp_path):
    shown = _events(
        tmp_path,
        {"round_": 1, "kind": "training", "ok": False, "detail": "label VIRAL unknown"},
        {"round_": 2, "kind": "training", "ok": True, "detail": "num-examples 4"},
    )
    assert shown == [
        "round 1: training REFUSED: label VIRAL unknown",
        "round 2: training: num-examples 4",
    ]

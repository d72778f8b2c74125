"""A hospital site without Flower: local training, evaluation, label checks, determinism."""

import shutil

import pytest
import torch
from badinputs import make_class_tree

from fedbridge_client.site import Site
from fedbridge_shared.errors import DataError
from fedbridge_shared.models import init_model
from fedbridge_shared.protocol import (
    NUM_EXAMPLES,
    LocalSettings,
    RoundTask,
    SiteErrorCode,
    SiteFailure,
)
from fedbridge_shared.weights import shared_state

SETTINGS = LocalSettings(batch_size=8, augment_per_sample=1, lr=1e-3, proximal_mu=0.0)


def task(spec, server_round=1, settings=SETTINGS, num_rounds=5):
    return RoundTask(spec.to_dict(), settings, server_round, num_rounds)


@pytest.fixture(scope="module")
def site_and_model(cxr_root, tmp_path_factory):
    data = make_class_tree(tmp_path_factory.mktemp("site") / "data", cxr_root, per_class=6)
    site = Site(data, "site-1")
    model, spec = init_model("none", site.index.labels, "test_efficientnet", 48)
    return site, spec, shared_state(model)


def test_train_returns_weights_of_the_same_layout_and_changes_them(site_and_model):
    site, spec, state = site_and_model
    new, reply = site.train(task(spec), state)
    assert list(new) == list(state)
    assert all(new[k].shape == state[k].shape for k in state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    metrics = reply.to_metrics()
    assert metrics[NUM_EXAMPLES] == len(site._parts(spec, SETTINGS)[0][0])
    counts = {f"class-count-{i}" for i in range(len(spec.labels))}
    assert set(metrics) == {NUM_EXAMPLES, "train-loss", "train-accuracy", "seconds", *counts}


def test_same_round_same_weights_and_other_round_other_weights(site_and_model):
    site, spec, state = site_and_model
    a, _ = site.train(task(spec, 3), state)
    b, _ = site.train(task(spec, 3), state)
    c, _ = site.train(task(spec, 4), state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_fedprox_term_keeps_weights_closer_to_the_global_model(site_and_model):
    site, spec, state = site_and_model
    free, _ = site.train(task(spec, 2), state)
    prox_settings = LocalSettings(**{**SETTINGS.__dict__, "proximal_mu": 10.0})
    prox, _ = site.train(task(spec, 2, prox_settings), state)
    dist = lambda s: sum((s[k] - state[k]).pow(2).sum() for k in state)  # noqa: E731
    assert dist(prox) < dist(free)


def test_evaluate_reports_validation_loss_and_accuracy(site_and_model):
    site, spec, state = site_and_model
    m = site.evaluate(task(spec), state)
    assert m.num_examples > 0 and 0 <= m.val_accuracy <= 1 and m.val_loss > 0
    # per true class: images and how many of them the global model got right
    assert sum(m.class_counts) == m.num_examples and len(m.class_correct) == len(spec.labels)
    assert all(0 <= k <= n for k, n in zip(m.class_correct, m.class_counts, strict=True))
    assert sum(m.class_correct) == round(m.val_accuracy * m.num_examples)


def test_site_with_other_class_names_is_refused_before_training(site_and_model, oct_root, tmp_path):
    _, spec, state = site_and_model
    other = Site(make_class_tree(tmp_path / "oct", oct_root, per_class=2), "site-9")
    with pytest.raises(DataError, match=r"site site-9: class folders \[.*\] are not among"):
        other.train(task(spec), state)


def test_a_site_without_one_class_trains_on_what_it_has(oct_root, tmp_path):
    data = make_class_tree(tmp_path / "oct", oct_root, per_class=6)
    shutil.rmtree(data / "DRUSEN")  # this hospital has no DRUSEN cases
    site = Site(data, "site-2")
    model, spec = init_model("none", ("CNV", "DME", "DRUSEN", "NORMAL"), "test_efficientnet", 32)
    state = shared_state(model)
    new, reply = site.train(task(spec), state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    assert reply.counts_by_label(spec.labels)["DRUSEN"] == 0
    assert all(reply.counts_by_label(spec.labels)[k] > 0 for k in ("CNV", "DME", "NORMAL"))
    assert site.evaluate(task(spec), new).class_counts[spec.labels.index("DRUSEN")] == 0


def test_the_last_round_of_the_federation_ends_the_cosine_schedule(site_and_model):
    # The site continues one LR schedule across rounds: in the last round of R the learning
    # rate has decayed to a sliver of its peak, so the weights move much less than in round 1.
    site, spec, state = site_and_model
    first, _ = site.train(task(spec, 1, num_rounds=20), state)
    last, _ = site.train(task(spec, 20, num_rounds=20), state)
    head = [k for k in state if k.startswith("classifier.")]  # trained weights, not BN buffers
    dist = lambda s: sum((s[k] - state[k]).pow(2).sum() for k in head)  # noqa: E731
    assert dist(last) < 0.2 * dist(first)


MAP = {"PNEUMONIA_UNSPECIFIED": ("BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA")}
LABELS = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")


@pytest.fixture(scope="module")
def adult_site(cxr_root, data_root, tmp_path_factory):
    """CXR classes plus NIH adult films known only as 'pneumonia' (organism not recorded)."""
    data = make_class_tree(tmp_path_factory.mktemp("adult") / "data", cxr_root, per_class=6)
    nih = data_root / "bridge" / "cxr-adult" / "PNEUMONIA_UNSPECIFIED"
    (data / nih.name).mkdir()
    for image in sorted(nih.glob("*.jpg"))[:10]:
        shutil.copy(image, data / nih.name / image.name)
    return data


def test_a_site_label_map_trains_set_labelled_films_and_never_validates_them(adult_site):
    site = Site(adult_site, "site-4", MAP)
    model, spec = init_model("none", LABELS, "test_efficientnet", 48)
    spec_labels = spec.labels
    assert "PNEUMONIA_UNSPECIFIED" not in spec_labels and len(spec_labels) == 4
    state = shared_state(model)
    settings = LocalSettings(**{**SETTINGS.__dict__, "val_fraction": 0.3, "augment_per_sample": 0})
    (train_imgs, train_y), (val_imgs, val_y) = site._parts(spec, settings)
    k = len(spec_labels)
    assert sum(t >= k for t in train_y) == 10  # all 10 set-labelled films train …
    assert all(t < k for t in val_y) and val_imgs  # … and none validates
    # a set target (≥ C) reaches the loss only as a label set: plain CE would fail on it
    new, reply = site.train(task(spec, settings=settings), state)
    assert any(not torch.equal(new[k_], state[k_]) for k_ in state)
    counts = reply.counts_by_label(spec_labels)
    assert set(counts) == set(spec_labels)  # only the model's own labels leave the site
    assert reply.num_examples == len(train_imgs) == sum(counts.values()) + 10
    m = site.evaluate(task(spec, settings=settings), new)
    assert m.num_examples == len(val_imgs) == sum(m.class_counts)


def test_a_site_label_map_is_checked_against_the_folder_and_the_model(adult_site, tmp_path):
    model, spec = init_model("none", LABELS, "test_efficientnet", 48)
    state = shared_state(model)
    with pytest.raises(DataError, match=r"class folders \['PNEUMONIA_UNSPECIFIED'\]"):
        Site(adult_site, "site-4").train(task(spec), state)  # undeclared: refused
    with pytest.raises(DataError, match="--label-map ADULT: no class folder of that name"):
        Site(adult_site, "site-4", {"ADULT": ("NORMAL",)})
    bad = Site(adult_site, "site-4", {"PNEUMONIA_UNSPECIFIED": ("PNEUMONIA",)})
    with pytest.raises(SiteFailure, match="PNEUMONIA is not a label of the model") as e:
        bad.train(task(spec), state)
    assert e.value.code is SiteErrorCode.LABELS_DIFFER

"""A hospital site without Flower: local training, evaluation, label checks, determinism."""

import pytest
import torch
from badinputs import make_class_tree

from fedbridge_client.site import LocalSettings, Site
from fedbridge_shared.errors import DataError
from fedbridge_shared.models import init_model
from fedbridge_shared.weights import shared_state

SETTINGS = LocalSettings(batch_size=8, augment_per_sample=1, lr=1e-3)


@pytest.fixture(scope="module")
def site_and_model(cxr_root, tmp_path_factory):
    data = make_class_tree(tmp_path_factory.mktemp("site") / "data", cxr_root, per_class=6)
    site = Site(data, "site-1")
    model, spec = init_model("none", site.index.labels, "test_efficientnet", 48)
    return site, spec, shared_state(model)


def test_train_returns_weights_of_the_same_layout_and_changes_them(site_and_model):
    site, spec, state = site_and_model
    new, metrics = site.train(spec, state, SETTINGS, server_round=1)
    assert list(new) == list(state)
    assert all(new[k].shape == state[k].shape for k in state)
    assert any(not torch.equal(new[k], state[k]) for k in state)
    assert metrics["num-examples"] == sum(len(p) for p in [site._parts(spec, SETTINGS)[0][0]])
    assert set(metrics) == {"num-examples", "train-loss", "train-accuracy", "seconds"}


def test_same_round_same_weights_and_other_round_other_weights(site_and_model):
    site, spec, state = site_and_model
    a, _ = site.train(spec, state, SETTINGS, server_round=3)
    b, _ = site.train(spec, state, SETTINGS, server_round=3)
    c, _ = site.train(spec, state, SETTINGS, server_round=4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_fedprox_term_keeps_weights_closer_to_the_global_model(site_and_model):
    site, spec, state = site_and_model
    free, _ = site.train(spec, state, SETTINGS, server_round=5)
    prox, _ = site.train(
        spec, state, LocalSettings(**{**SETTINGS.__dict__, "proximal_mu": 10.0}), server_round=5
    )
    dist = lambda s: sum((s[k] - state[k]).pow(2).sum() for k in state)  # noqa: E731
    assert dist(prox) < dist(free)


def test_evaluate_reports_validation_loss_and_accuracy(site_and_model):
    site, spec, state = site_and_model
    m = site.evaluate(spec, state, SETTINGS)
    assert m["num-examples"] > 0 and 0 <= m["val-accuracy"] <= 1 and m["val-loss"] > 0


def test_site_with_other_class_names_is_refused_before_training(site_and_model, oct_root, tmp_path):
    _, spec, state = site_and_model
    other = Site(make_class_tree(tmp_path / "oct", oct_root, per_class=2), "site-9")
    with pytest.raises(DataError, match="site site-9: class folders .* differ"):
        other.train(spec, state, SETTINGS, server_round=1)

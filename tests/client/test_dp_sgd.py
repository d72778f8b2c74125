"""Record-level DP-SGD at a site: per-patient sampling, frozen BatchNorm, the recorded ε."""

import math

import pytest
import torch
from badinputs import make_class_tree
from opacus.accountants import RDPAccountant

from fedbridge_client import dp_sgd
from fedbridge_client.site import Site
from fedbridge_shared.errors import ConfigError
from fedbridge_shared.models import init_model
from fedbridge_shared.protocol import LocalSettings, RecordDP, RoundTask, TrainReply
from fedbridge_shared.weights import shared_state

SETTINGS = LocalSettings(batch_size=4, augment_per_sample=1, lr=1e-3, val_fraction=0.2)
DP = RecordDP(max_grad_norm=1.0, noise_multiplier=1.1, delta=1e-5)


@pytest.fixture(scope="module")
def site_and_model(cxr_root, tmp_path_factory):
    """A site of 24 real CXR images whose MANIFEST.csv gives two images to each patient."""
    data = make_class_tree(tmp_path_factory.mktemp("dp-site") / "data", cxr_root, per_class=6)
    files = sorted(p.relative_to(data).as_posix() for p in data.glob("*/*"))
    rows = [f"{f},P{i // 2:03d}" for i, f in enumerate(files)]
    (data / "MANIFEST.csv").write_text("path,patient_id\n" + "\n".join(rows) + "\n")
    site = Site(data, "site-1")
    model, spec = init_model("none", site.index.labels, "test_efficientnet", 48)
    return site, spec, shared_state(model)


def _task(spec, rnd=1, rounds=3, dp=DP):
    return RoundTask(spec.to_dict(), SETTINGS, rnd, rounds, dp)


def test_the_recorded_epsilon_is_the_accountants_for_sigma_q_and_steps(site_and_model):
    site, spec, state = site_and_model
    _, reply = site.train(_task(spec, rnd=2), state)
    patients = len(set(site.train_patients(spec, SETTINGS)))
    images = len(site.train_patients(spec, SETTINGS))
    assert reply.dp_patients == patients and patients == images // 2  # a record is a patient
    q = SETTINGS.batch_size / patients
    steps = 2 * SETTINGS.local_epochs * math.ceil(patients / SETTINGS.batch_size)  # round 2
    accountant = RDPAccountant()
    for _ in range(steps):  # step by step: another path through Opacus than the site's
        accountant.step(noise_multiplier=1.1, sample_rate=q)
    assert reply.epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-9)
    assert reply.noise_multiplier == 1.1
    metrics = reply.to_metrics()
    assert TrainReply.from_metrics(metrics).epsilon == reply.epsilon
    _, plain = site.train(_task(spec, dp=None), state)
    assert "epsilon" not in plain.to_metrics()  # DP keys travel only under DP


def test_known_epsilon_of_the_gaussian_mechanism():
    """q = 1: T steps of the Gaussian mechanism have RDP T·α/(2σ²) at order α; Balle et al.
    2020's conversion ε = min_α RDP(α) + log((α−1)/α) − (log δ + log α)/(α−1) over Opacus'
    orders gives the exact known answer; q < 1 (subsampling) costs less."""
    sigma, steps, delta = 2.0, 4, 1e-5
    orders = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
    known = min(
        steps * a / (2 * sigma**2)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in orders
    )
    full = dp_sgd.Plan(8, 1.0, 1, steps, sigma, delta, 1.0, 8)
    assert full.epsilon(steps) == pytest.approx(known, rel=1e-9)
    sub = dp_sgd.Plan(80, 0.1, 10, steps, sigma, delta, 1.0, 8)
    assert 0 < sub.epsilon(steps) < known and sub.epsilon(0) == 0.0


def test_each_site_derives_the_sigma_that_meets_the_target():
    dp = RecordDP(target_epsilon=3.0, delta=1e-5)
    p = dp_sgd.plan(dp, patients=150, batch_size=16, local_epochs=1, rounds=3)
    assert p.sample_rate == 16 / 150 and p.steps_per_epoch == 10 and p.total_steps == 30
    assert 2.9 <= p.epsilon(p.total_steps) <= 3.0 + 0.02
    with pytest.raises(ConfigError, match=r"'dp.target-epsilon' .*150 patients.*raise it"):
        dp_sgd.plan(
            RecordDP(target_epsilon=0.05, delta=1e-12), patients=150, batch_size=150,
            local_epochs=50, rounds=100,
        )  # fmt: skip


def test_batchnorm_is_frozen_and_the_weights_train(site_and_model):
    site, spec, state = site_and_model
    new, _ = site.train(_task(spec), state)
    model, _ = init_model("none", spec.labels, "test_efficientnet", 48)
    norms = {
        f"{name}.{k}"
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for k in ("weight", "bias", "running_mean", "running_var")
    }
    assert norms and norms <= set(state)
    assert all(torch.equal(new[k], state[k]) for k in norms)  # statistics and affine: the bridge's
    others = [k for k in state if k not in norms and state[k].is_floating_point()]
    assert any(not torch.equal(new[k], state[k]) for k in others)


def test_the_noise_is_secret_not_replayable_from_the_run_seed(site_and_model):
    site, spec, state = site_and_model
    a, _ = site.train(_task(spec), state)
    b, _ = site.train(_task(spec), state)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # same task, same seed, other noise


def test_patient_sampler_takes_at_most_one_item_of_a_patient_per_step():
    groups = dp_sgd.item_groups(["a", "a", "b", "c", "c", "c"], copies=2)
    assert groups == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9, 10, 11]]
    sampler = dp_sgd.PatientSampler(
        groups, q=0.5, steps=2000, generator=torch.Generator().manual_seed(0)
    )
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2000
    owner = {i: g for g, items in enumerate(groups) for i in items}
    assert all(len({owner[i] for i in b}) == len(b) for b in batches)
    assert sum(map(len, batches)) / 2000 == pytest.approx(1.5, abs=0.1)  # q · patients
    assert any(not b for b in batches)  # Poisson: some steps draw nobody (noise-only steps)

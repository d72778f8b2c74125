"""The partial-label loss: a film known only as "one of these classes"."""

import numpy as np
import pytest
import torch

from fedbridge_shared.errors import ConfigError
from fedbridge_shared.losses import hits, label_masks, make_criterion
from fedbridge_shared.training import target_plan


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_set_targets_pay_minus_log_of_the_sets_mass_and_single_targets_plain_ce():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 4)) * 3
    target = np.array([0, 3, 4, 4, 5, 2])  # 4 = {1, 3}, 5 = {0, 2}
    p = _softmax(logits)
    sets = {4: [1, 3], 5: [0, 2]}
    expected = np.mean(
        [-np.log(p[i, sets[t]].sum() if t in sets else p[i, t]) for i, t in enumerate(target)]
    )
    loss = make_criterion(num_classes=4, label_smoothing=0.0, label_sets=[(1, 3), (0, 2)])
    got = loss(torch.tensor(logits), torch.tensor(target))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    plain = make_criterion(num_classes=4, label_smoothing=0.0)
    ordinary = torch.tensor([0, 3, 2])
    assert plain(torch.tensor(logits[[0, 1, 5]]), ordinary).item() == pytest.approx(
        loss(torch.tensor(logits[[0, 1, 5]]), ordinary).item(), rel=1e-9
    )


def test_a_set_target_moves_mass_onto_the_set_not_onto_one_member():
    logits = torch.zeros(1, 4, requires_grad=True)
    loss = make_criterion(num_classes=4, label_smoothing=0.0, label_sets=[(1, 3)])
    opt = torch.optim.SGD([logits], lr=1.0)
    for _ in range(50):
        opt.zero_grad()
        loss(logits, torch.tensor([4])).backward()
        opt.step()
    p = torch.softmax(logits, 1)[0].detach().numpy()
    assert p[1] + p[3] > 0.95
    assert p[1] == pytest.approx(p[3], abs=1e-6)  # no member guessed


def test_hits_count_a_prediction_inside_the_set():
    masks = label_masks(3, [(0, 2)])
    logits = torch.tensor([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
    assert hits(logits, torch.tensor([3, 3, 3]), masks) == 2
    assert hits(logits, torch.tensor([0, 1, 1]), None) == 2


def test_target_plan_makes_mapped_folders_targets_not_model_labels():
    labels, target_of, sets = target_plan(
        ["BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "PNEUMONIA_UNSPECIFIED", "VIRAL_PNEUMONIA"],
        {"PNEUMONIA_UNSPECIFIED": ("VIRAL_PNEUMONIA", "BACTERIAL_PNEUMONIA")},
        where="data",
    )
    assert labels == ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")
    assert target_of["PNEUMONIA_UNSPECIFIED"] == 4 and sets == [(0, 3)]
    assert target_of["NORMAL"] == 2
    with pytest.raises(ConfigError, match="--label-map ADULT: no class folder"):
        target_plan(["NORMAL"], {"ADULT": ("NORMAL",)}, where="data")
    typo = {"PNEUMONIA_UNSPECIFIED": ("BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONA")}
    with pytest.raises(ConfigError, match="VIRAL_PNEUMONA is neither a class folder"):
        target_plan(["BACTERIAL_PNEUMONIA", "PNEUMONIA_UNSPECIFIED"], typo, where="data")
    labels, _, sets = target_plan(  # a target the --init bundle knows is fine
        ["NORMAL", "PNEUMONIA_UNSPECIFIED"],
        {"PNEUMONIA_UNSPECIFIED": ("BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA")},
        where="data",
        known=("BACTERIAL_PNEUMONIA", "NORMAL", "VIRAL_PNEUMONIA"),
    )
    assert labels == ("BACTERIAL_PNEUMONIA", "NORMAL", "VIRAL_PNEUMONIA") and sets == [(0, 2)]

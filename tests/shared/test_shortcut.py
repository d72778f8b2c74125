"""The shortcut audit's parts with known answers: probe, per-source numbers, label mapping."""

import numpy as np
import pytest

from fedbridge_shared.errors import ConfigError
from fedbridge_shared.report_sections import limitations, shortcut_section
from fedbridge_shared.shortcut import (
    FLAG_TEXT,
    external_metrics,
    parse_label_map,
    per_source,
    probe_pair,
    resolve_label_map,
    shortcut_audit,
)

LABELS = ("BACTERIAL_PNEUMONIA", "COVID19", "NORMAL", "VIRAL_PNEUMONIA")


def _features(n: int, *, readable: np.ndarray, seed: int) -> np.ndarray:
    """16 noise dimensions; the first one carries ``readable`` (0/1/…) with a wide margin."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16))
    x[:, 0] += 6.0 * readable
    return x


def _design(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    sources = np.where(np.arange(n) % 2 == 0, "kermany", "ieee8023")
    labels = rng.choice(["NORMAL", "COVID19", "VIRAL_PNEUMONIA"], size=n)
    groups = [f"p{i // 2}-{sources[i]}" for i in range(n)]  # 2 films per patient
    return sources, labels, groups


def test_probe_flags_a_model_whose_features_read_the_source_and_not_the_label():
    sources, labels, groups = _design()
    x = _features(len(labels), readable=(sources == "ieee8023").astype(float), seed=1)
    probe = probe_pair(x, list(labels), list(sources), groups)
    assert probe["source"]["balanced_accuracy"] > 0.95
    assert probe["label"]["adjusted"] < 0.25  # noise: near chance
    assert probe["flagged"] is True
    assert probe["source"]["folds"] == 5 and probe["features"] == 16


def test_probe_does_not_flag_a_model_that_reads_the_label_and_not_the_source():
    sources, labels, groups = _design(seed=2)
    code = np.searchsorted(np.unique(labels), labels).astype(float)
    x = _features(len(labels), readable=code, seed=3)
    probe = probe_pair(x, list(labels), list(sources), groups)
    assert probe["label"]["balanced_accuracy"] > 0.9
    assert probe["source"]["adjusted"] < 0.3
    assert probe["flagged"] is False


def test_probe_folds_keep_a_patients_films_together():
    """Each patient's two films share a private random feature vector and a source: a probe
    whose folds split patients would read the source off the twin film (memorised); with
    patient-grouped folds it stays at chance."""
    n_patients, dims = 40, 64
    rng = np.random.default_rng(0)
    x = np.repeat(rng.normal(size=(n_patients, dims)), 2, axis=0)
    sources = list(np.repeat(rng.choice(["a", "b"], size=n_patients), 2))
    groups = [f"p{i // 2}" for i in range(2 * n_patients)]
    probe = probe_pair(x, sources, sources, groups)
    assert probe["source"]["balanced_accuracy"] < 0.75
    leaky = probe_pair(x, sources, sources, [f"f{i}" for i in range(2 * n_patients)])
    assert leaky["source"]["balanced_accuracy"] >= 0.85  # the same probe, folds by film


def test_probe_says_why_it_cannot_run():
    x = np.zeros((6, 4))
    probe = probe_pair(x, ["A", "B"] * 3, ["only"] * 6, [f"p{i}" for i in range(6)])
    assert (
        probe["source"]["available"] is False
        and "fewer than 2 classes" in (probe["source"]["reason"])
    )
    assert probe["flagged"] is None
    unknown = probe_pair(x, ["A", "B"] * 3, [None] * 6, [f"p{i}" for i in range(6)])
    assert unknown["source"]["reason"] == "no image's source is known"


def test_per_source_counts_accuracy_confusion_and_covid_calls():
    true = ["COVID19", "NORMAL", "NORMAL", "VIRAL_PNEUMONIA", "NORMAL", "BACTERIAL_PNEUMONIA"]
    pred = ["COVID19", "COVID19", "NORMAL", "COVID19", "NORMAL", "BACTERIAL_PNEUMONIA"]
    src = ["ieee8023", "ieee8023", "ieee8023", "ieee8023", "kermany", "kermany"]
    out = per_source(true, pred, src, LABELS)
    ieee, kermany = out["ieee8023"], out["kermany"]
    assert ieee["n"] == 4 and ieee["accuracy"] == 0.5
    assert ieee["non_COVID19_called_COVID19"]["k"] == 2
    assert ieee["non_COVID19_called_COVID19"]["n"] == 3
    assert ieee["confusion_matrix"]["rows"] == ["COVID19", "NORMAL", "VIRAL_PNEUMONIA"]
    assert ieee["confusion_matrix"]["counts"][1] == [0, 1, 1, 0]  # NORMAL: 1 COVID, 1 NORMAL
    assert ieee["per_class"]["NORMAL"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert kermany["accuracy"] == 1.0 and kermany["non_COVID19_called_COVID19"]["k"] == 0
    assert set(per_source(true, pred, [None] * 6, LABELS)) == {"unknown"}


def test_label_map_parsing_and_resolution():
    declared = parse_label_map(["PNEUMONIA_UNSPECIFIED=BACTERIAL_PNEUMONIA|VIRAL_PNEUMONIA"])
    assert declared == {"PNEUMONIA_UNSPECIFIED": ("BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA")}
    mapping = resolve_label_map(
        ["COVID19", "NORMAL", "PNEUMONIA_UNSPECIFIED"], LABELS, declared, where="ext"
    )
    assert mapping["NORMAL"] == ("NORMAL",) and mapping["COVID19"] == ("COVID19",)
    for bad in ("NOEQUALS", "=NORMAL", "X=", "X=A||B"):
        with pytest.raises(ConfigError, match="--label-map"):
            parse_label_map([bad])
    with pytest.raises(ConfigError, match=r"\['PNEUMONIA_UNSPECIFIED'\] are not among the model"):
        resolve_label_map(["PNEUMONIA_UNSPECIFIED"], LABELS, None, where="ext")
    with pytest.raises(ConfigError, match="FUNGAL is not a label"):
        resolve_label_map(["X"], LABELS, {"X": ("FUNGAL",)}, where="ext")


def test_external_metrics_score_a_set_mapping_as_correct():
    mapping = {"COVID19": ("COVID19",), "NORMAL": ("NORMAL",),
               "PNEUMONIA_UNSPECIFIED": ("BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA")}  # fmt: skip
    true = ["COVID19", "COVID19", "NORMAL", "PNEUMONIA_UNSPECIFIED", "PNEUMONIA_UNSPECIFIED"]
    pred = ["COVID19", "NORMAL", "COVID19", "VIRAL_PNEUMONIA", "BACTERIAL_PNEUMONIA"]
    ext = external_metrics(true, pred, mapping)
    assert (ext["accuracy"]["k"], ext["accuracy"]["n"]) == (3, 5)
    assert (ext["COVID19_sensitivity"]["k"], ext["COVID19_sensitivity"]["n"]) == (1, 2)
    called = ext["non_COVID19_called_COVID19"]
    assert (called["k"], called["n"]) == (1, 3)
    assert ext["per_label"]["PNEUMONIA_UNSPECIFIED"]["rate"] == 1.0
    assert ext["ood"]["measured"] is False and "not measured" in ext["ood"]["text"]


def test_the_model_card_carries_the_flag_only_when_source_reads_easier():
    sources, labels, groups = _design()
    for readable, flagged in ((sources == "ieee8023", True), (labels == "COVID19", False)):
        x = _features(len(labels), readable=readable.astype(float), seed=4)
        audit = shortcut_audit(
            true_labels=list(labels), predicted=list(labels), sources=list(sources),
            groups=groups, features=x, model_labels=LABELS,
        )  # fmt: skip
        assert audit["flagged"] is flagged
        items = limitations(metrics={"n": len(labels), "shortcut": audit}, labels=LABELS,
                            y_true=[], sources=None, card={}, sites={})  # fmt: skip
        assert any(FLAG_TEXT in i for i in items) is flagged
        assert ("Flag:" in shortcut_section({"shortcut": audit})) is flagged

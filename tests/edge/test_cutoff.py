"""A label the bedside calls only at or above a cut-off chosen at export (issue #29), on the small
real CXR bundle and real adult films (NIH NORMAL and "Pneumonia": the films the shortcut calls
COVID19)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from cli import assert_one_line_error, fedbridge, ok

from fedbridge_edge.cutoff import Cutoff, choose
from fedbridge_edge.modelfile import read_edge_model
from fedbridge_edge.preprocess import list_images
from fedbridge_edge.runtime import Predictor
from fedbridge_shared.calibration import softmax


def _films(root, data_root, per_class: int):
    """NIH adult NORMAL / PNEUMONIA_UNSPECIFIED films, and a few COVID19 films (symlinks)."""
    adult = data_root / "bridge" / "cxr-adult"
    sources = {
        label: sorted((adult / label).glob("*.jpg"))[:per_class]
        for label in ("NORMAL", "PNEUMONIA_UNSPECIFIED")
    }
    sources["COVID19"] = sorted((data_root / "cxr" / "COVID19").glob("*.jpg"))[:8]
    for label, files in sources.items():
        (root / label).mkdir(parents=True)
        for f in files:
            os.symlink(f, root / label / f.name)
    return root


@pytest.fixture(scope="module")
def cut(cxr_bundle, cxr_parts, data_root, tmp_path_factory):
    """The bundle exported with --cutoff COVID19=0.10 on 50 adult non-COVID films."""
    root = tmp_path_factory.mktemp("cutoff")
    films = _films(root / "films", data_root, 25)
    out = root / "cut.onnx"
    result = ok("export", "onnx", cxr_bundle, "--out", out, "--val-data", cxr_parts["val"],
                "--cutoff", "COVID19=0.10", "--cutoff-data", films)  # fmt: skip
    return out, films, result.stdout


def test_the_cutoff_lies_just_above_the_films_it_excludes():
    p = np.linspace(0.01, 0.99, 40)
    t = choose(p, 0.10)
    assert (p >= t).sum() == 4 and p[-5] < t <= p[-4]
    assert (np.full(30, 0.5) >= choose(np.full(30, 0.5), 0.10)).sum() == 0  # ties stay below
    rule = Cutoff(label="B", index=1, value=0.4)
    assert rule.decide(np.array([0.5, 0.42, 0.08])) == 1  # at or above: B, even if not the top
    assert rule.decide(np.array([0.35, 0.38, 0.27])) == 0  # top but below: the best other label
    assert rule.decide(np.array([0.2, 0.25, 0.55])) == 2


def test_export_seals_the_lowest_cutoff_that_keeps_false_calls_within_the_rate(cut, cxr_bundle):
    from fedbridge_edge.export import _features, _load_images, _torch_model
    from fedbridge_edge.preprocess import InputSpec

    path, films, stdout = cut
    edge = read_edge_model(path)
    d = edge.edge["decision"]
    assert (d["label"], d["max_false_rate"], d["negatives"], d["positives"]) == (
        "COVID19",
        0.10,
        50,
        8,
    )
    # the probabilities the bedside shows, recomputed from the bundle: softmax(logits / T)
    paths = list_images([films])
    bundle, model = _torch_model(cxr_bundle)
    x, _ = _load_images(paths, InputSpec.from_spec(bundle.spec.to_dict()))
    probs = softmax(_features(model, x)[1], edge.edge["calibration"]["temperature"])
    k = list(edge.labels).index("COVID19")
    negative = np.array([probs[i, k] for i, p in enumerate(paths) if p.parent.name != "COVID19"])
    t = d["cutoff"]
    assert (negative >= t).mean() <= 0.10 and d["false_rate"] == (negative >= t).mean()
    below = negative[negative < t]
    assert (negative >= below.max()).mean() > 0.10  # any lower cut-off would call more
    assert d["argmax_false_rate"] == (probs[[p.parent.name != "COVID19" for p in paths]].argmax(1)
                                      == k).mean()  # fmt: skip
    line = next(ln for ln in stdout.splitlines() if ln.startswith("cut-off: COVID19"))
    assert f"P ≥ {t:.3f}" in line and "50 --cutoff-data films" in line


def test_the_bedside_calls_covid_only_at_or_above_the_cutoff(cut, edge_onnx):
    """Same bundle, same --val-data: the same scores; only the call differs, by the rule."""
    path, films, _ = cut
    plain, with_cut = Predictor(edge_onnx, threads=1), Predictor(path, threads=1)
    t = read_edge_model(path).edge["decision"]["cutoff"]
    assert plain.identity.cutoff is None and with_cut.identity.cutoff == {"COVID19": t}
    changed = 0
    for f in list_images([films]):
        a, b = plain.predict_file(f).record, with_cut.predict_file(f).record
        if a.label is None:  # refused as out of distribution by both
            assert b.label is None
            continue
        assert b.scores == pytest.approx(a.scores, abs=1e-6)
        assert a.label == max(a.scores, key=a.scores.get)
        others = {k: v for k, v in b.scores.items() if k != "COVID19"}
        expected = "COVID19" if b.scores["COVID19"] >= t else max(others, key=others.get)
        assert b.label == expected
        changed += a.label != b.label
    assert changed > 0  # the rule moved calls on these adult films (the test exercised it)


def test_a_bad_cutoff_is_one_line_and_writes_nothing(cxr_bundle, cxr_parts, data_root, tmp_path):
    out = tmp_path / "m.onnx"
    base = ("export", "onnx", cxr_bundle, "--out", out, "--val-data", cxr_parts["val"])
    alone = fedbridge(*base, "--cutoff", "COVID19=0.10")
    assert_one_line_error(alone, "--cutoff and --cutoff-data go together")
    few = _films(tmp_path / "few", data_root, 5)  # 10 non-COVID films
    for cutoff, words in [
        ("FLU=0.1", ("--cutoff FLU", "not a label of this model")),
        ("COVID19=0.9", ("--cutoff 'COVID19=0.9'", "RATE in (0, 0.5]")),
        ("COVID19", ("--cutoff 'COVID19'", "LABEL=RATE")),
        ("COVID19=0.1", ("--cutoff-data", "10 films that are not COVID19", "at least 20")),
    ]:
        result = fedbridge(*base, "--cutoff", cutoff, "--cutoff-data", few)
        assert_one_line_error(result, *words)
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))

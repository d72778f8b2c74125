"""The label → code table the bundle keeps for DICOM SR findings."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from fedbridge_shared import label_codes
from fedbridge_shared.errors import BundleError
from fedbridge_shared.label_codes import LOCAL_SCHEME, LabelCode

CXR = ["COVID19", "BACTERIAL_PNEUMONIA", "VIRAL_PNEUMONIA", "NORMAL"]
OCT = ["CNV", "DME", "DRUSEN", "NORMAL"]


def test_paper_labels_get_snomed_codes_and_normal_is_marked():
    table = label_codes.default_codes([*CXR, "PNEUMONIA"])
    assert {c.scheme for c in table.values()} == {"SCT"}
    assert table["COVID19"] == LabelCode("840539006", "SCT", "COVID-19")
    assert table["PNEUMONIA"].value == "233604007"
    assert [label for label, c in table.items() if c.normal] == ["NORMAL"]
    normal = codes.SCT.Normal  # the one pydicom's dictionary has
    assert (table["NORMAL"].value, table["NORMAL"].meaning) == (normal.value, normal.meaning)


def test_oct_labels_and_unknown_labels_fall_back_to_the_local_scheme():
    table = label_codes.default_codes([*OCT, "weird_thing"])
    assert table["DME"].scheme == "SCT" and table["NORMAL"].normal
    assert table["CNV"] == LabelCode("CNV", LOCAL_SCHEME, "Choroidal neovascularization")
    assert table["DRUSEN"].scheme == LOCAL_SCHEME
    assert table["weird_thing"] == LabelCode("weird_thing", LOCAL_SCHEME, "Weird thing")
    assert not any(c.normal for label, c in table.items() if label != "NORMAL")


def test_json_round_trip():
    table = label_codes.default_codes([*CXR, *OCT[:3]])
    data = label_codes.to_json(table)
    assert data["NORMAL"] == {"value": "17621005", "scheme": "SCT", "meaning": "Normal",
                              "normal": True}  # fmt: skip
    assert label_codes.from_json(data) == table


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([], "non-empty object"),
        ({}, "non-empty object"),
        ({"A": "x"}, "expected an object"),
        ({"A": {"value": "1", "scheme": "SCT"}}, "meaning missing"),
        ({"A": {"value": "1", "scheme": "SNOMED", "meaning": "a"}}, "coding scheme 'SNOMED'"),
        ({"A": {"value": "a b", "scheme": "SCT", "meaning": "a"}}, "code value"),
        ({"A": {"value": "1", "scheme": "SCT", "meaning": "x" * 65}}, "code meaning"),
        ({"A": {"value": "1", "scheme": "SCT", "meaning": "a", "normal": "yes"}}, "normal must"),
        ({"A": {"value": "1", "scheme": "SCT", "meaning": "a", "colour": 1}}, "unknown keys"),
    ],
)
def test_from_json_refuses_bad_tables(data, needle):
    with pytest.raises(BundleError, match=needle):
        label_codes.from_json(data)


def test_from_edge_prefers_the_stored_table_and_checks_it_covers_the_labels():
    stored = {"A": {"value": "A", "scheme": LOCAL_SCHEME, "meaning": "Thing A"}}
    assert label_codes.from_edge({"label_codes": stored}, ["A"])["A"].meaning == "Thing A"
    assert label_codes.from_edge({}, CXR) == label_codes.default_codes(CXR)
    with pytest.raises(BundleError, match="no code for the model's labels B"):
        label_codes.from_edge({"label_codes": stored}, ["A", "B"])

"""Region mass fractions: oracle maps whose shares are known exactly."""

import numpy as np
import pytest

from fedbridge_shared.explain.regions import (
    BORDER_FRACTION,
    border_mask,
    region_fractions,
    summarise,
)


def test_mass_only_in_the_left_half():
    m = np.zeros((20, 20))
    m[:, :10] = -3.0  # the sign is ignored: absolute mass
    r = region_fractions(m)
    assert r["left"] == pytest.approx(1.0) and r["right"] == pytest.approx(0.0)


def test_uniform_map_puts_the_area_share_in_the_border():
    r = region_fractions(np.ones((40, 40)))
    inner = (40 - 2 * round(40 * BORDER_FRACTION)) ** 2
    assert r["border_area"] == pytest.approx(1 - inner / 1600)
    assert r["border"] == pytest.approx(r["border_area"])
    assert r["centre"] + r["border"] == pytest.approx(1.0)
    assert r["left"] == pytest.approx(0.5)


def test_odd_width_splits_the_middle_column():
    m = np.zeros((5, 5))
    m[:, 2] = 1.0
    assert region_fractions(m)["left"] == pytest.approx(0.5)


def test_centre_only_and_empty_maps():
    m = np.zeros((20, 20))
    m[~border_mask(m.shape)] = 1.0
    assert region_fractions(m)["centre"] == pytest.approx(1.0)
    empty = region_fractions(np.zeros((8, 8)))
    assert empty["left"] is None and empty["border_area"] > 0
    with pytest.raises(ValueError):
        region_fractions(np.zeros((2, 2, 2)))


def test_summarise_averages_per_class():
    rows = [
        {"predicted": "A", "left": 1.0, "right": 0.0, "centre": 1.0, "border": 0.0},
        {"predicted": "A", "left": 0.0, "right": 1.0, "centre": 0.5, "border": 0.5},
        {"predicted": "B", "left": None},
    ]
    s = summarise(rows, "predicted")
    assert s["A"]["n"] == 2 and s["A"]["left"] == pytest.approx(0.5)
    assert s["B"]["left"] is None

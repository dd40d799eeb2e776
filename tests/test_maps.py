"""Stored maps by kind: attention, generic (float32), relative = attention / generic per layer."""

import numpy as np
import pytest

from medvlm.core.maps import MapReader, MapUnavailable, check_kind
from medvlm.core.store import GENERIC_FINDING, ResultsStore, map_key


def _rec(study, finding, v):
    return {"model": "m", "study_id": study, "finding": finding, "variant_id": v, "status": "ok", "error": None}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    att = rng.random((3, 16)).astype(np.float32) * 1e-2
    generic = rng.random((3, 16)).astype(np.float32) * 1e-6  # small values: float16 would lose them
    store = ResultsStore(tmp_path)
    store.write_study("m", "s1", [_rec("s1", "f", 0)], {
        map_key("f", 0): ((4, 5, 6), att),
        map_key(GENERIC_FINDING, 0, "generic"): ((4, 5, 6), generic),
    })  # fmt: skip
    return tmp_path, att, generic


def test_kinds_are_read_as_stored(folder):
    out, att, generic = folder
    reader = MapReader(out)
    layers, got = reader.layered("m", "s1", "f", 0, "attention")
    assert layers == (4, 5, 6) and np.abs(got - att).max() <= 1e-5  # float16 storage
    _, g = reader.layered("m", "s1", "f", 0, "generic")
    assert np.array_equal(g, generic.astype(np.float64)), "the generic map must be stored in float32"


def test_relative_is_the_per_layer_ratio_then_the_layer_mean(folder):
    out, att, generic = folder
    reader = MapReader(out)
    stored_att = att.astype(np.float16).astype(np.float64)
    expected = (stored_att / generic.astype(np.float64)).mean(axis=0)
    got = reader.get("m", "s1", "f", 0, "relative")
    assert np.abs(got - expected).max() / expected.max() < 1e-12
    assert np.abs(reader.get("m", "s1", "f", 0, "relative", layers=[6]) - stored_att[2] / generic[2]).max() < 1e-6
    # attention alone is a different map: the test above could not pass with it
    assert np.abs(reader.get("m", "s1", "f", 0, "attention") - expected).max() > 1.0


def test_zero_in_the_generic_map_makes_relative_undefined(tmp_path):
    store = ResultsStore(tmp_path)
    generic = np.full((1, 4), 1e-3, np.float32)
    generic[0, 2] = 0.0
    store.write_study("m", "s", [_rec("s", "f", 0)], {
        map_key("f", 0): ((0,), np.full((1, 4), 0.25, np.float32)),
        map_key(GENERIC_FINDING, 0, "generic"): ((0,), generic),
    })  # fmt: skip
    reader = MapReader(tmp_path)
    with pytest.raises(MapUnavailable, match="0 at 1 of 4"):
        reader.get("m", "s", "f", 0, "relative")
    assert reader.getter("relative")("m", "s", "f", 0) is None
    assert reader.getter("attention")("m", "s", "f", 0) is not None


def test_exclusions_and_unknown_kinds(folder):
    out, att, _ = folder
    reader = MapReader(out)
    got = reader.get("m", "s1", "f", 0, exclude=[0, 3])
    assert got[0] == 0 and got[3] == 0 and got[1] > 0
    with pytest.raises(ValueError, match="unknown map kind 'raw'"):
        check_kind("raw")
    with pytest.raises(MapUnavailable, match="no gradxinput map"):
        reader.get("m", "s1", "f", 0, "gradxinput")
    with pytest.raises(MapUnavailable, match="not stored"):
        reader.get("m", "s1", "f", 0, layers=[1])

"""Grounding of stored maps against regions, end to end on hand-made maps whose answers are known."""

import numpy as np
import pandas as pd
import pytest

from medvlm.analysis.grounding_run import finding_present, grounding_table, grounding_units
from medvlm.core.maps import MapReader
from medvlm.core.store import GENERIC_FINDING, ResultsStore, map_key
from medvlm.data.regions import join_regions, read_regions

GEOMETRY = {"image_size": [160, 160], "crop_box": [0.0, 0.0, 160.0, 160.0], "grid": [4, 4], "input_size": 64}


def build(tmp_path, n_studies=6):
    """Studies whose region is the top-left 40 x 40 px cell (grid cell 0); the attention map is
    one-hot on cell 0 (inside) for even studies and cell 15 (outside) for odd ones."""
    store = ResultsStore(tmp_path)
    recs, boxes = [], []
    for s in range(n_studies):
        study = f"s{s}"
        att = np.full((1, 16), 1e-4, np.float32)
        att[0, 0 if s % 2 == 0 else 15] = 1.0
        rec = {"model": "m", "study_id": study, "finding": "effusion", "variant_id": 0, "status": "ok", "error": None,
               "cluster_id": study, "answer_gt": "yes", "polarity": "direct", "image_path": f"/img/{study}.png",
               "geometry": GEOMETRY}  # fmt: skip
        store.write_study("m", study, [rec], {map_key("effusion", 0): ((0,), att),
                                              map_key(GENERIC_FINDING, 0, "generic"): ((0,), np.full((1, 16), 0.5,
                                                                                                       np.float32))})
        recs.append(rec)
        boxes.append({"study_id": study, "finding": "effusion", "x": 0, "y": 0, "w": 40, "h": 40})
    path = tmp_path / "boxes.csv"
    pd.DataFrame(boxes).to_csv(path, index=False)
    return pd.DataFrame(recs), path


def test_units_by_hand(tmp_path):
    records, path = build(tmp_path)
    joined, report = join_regions(read_regions(path), records, lambda p: (160, 160))
    assert len(joined) == 6 and not report.errors
    units = grounding_units(records, joined, MapReader(tmp_path), ("attention", "relative"))
    assert len(units) == 12 and (units.status == "ok").all()
    inside = units[units.study_id == "s0"].set_index("map_kind")
    outside = units[units.study_id == "s1"].set_index("map_kind")
    assert inside.loc["attention", "pointing_hit"] == 1 and outside.loc["attention", "pointing_hit"] == 0
    assert inside.loc["attention", "area_fraction"] == pytest.approx(1 / 16)
    assert inside.loc["attention", "energy"] > 0.5 > 0.05 > outside.loc["attention", "energy"]  # bilinear: spread
    # relative = attention / a constant generic map: the same ranking, the same pointing
    assert inside.loc["relative", "pointing_hit"] == 1
    # the uniform map's energy is the region's area share
    assert inside.loc["attention", "uniform_energy"] == pytest.approx(1 / 16)
    assert inside.loc["attention", "pointing_hit_minus_prior"] == pytest.approx(
        1 - inside.loc["attention", "prior_pointing_hit"])


def test_table_pools_by_kind_and_variant(tmp_path):
    records, path = build(tmp_path)
    joined, _ = join_regions(read_regions(path), records, lambda p: (160, 160))
    units = grounding_units(records, joined, MapReader(tmp_path), ("attention",))
    table = grounding_table(units, n_boot=200)
    row = table[(table.map_kind == "attention") & (table.variant_id == "all") & (table.finding == "ALL")
                & (table.metric == "pointing_hit")].iloc[0]  # fmt: skip
    assert row.estimate == pytest.approx(0.5) and row.n_clusters == 6
    assert set(table.variant_id) == {"all", "0"}


def test_only_present_findings_with_regions_count(tmp_path):
    records, path = build(tmp_path, 2)
    records.loc[1, "answer_gt"] = "no"  # finding absent: not a grounding question
    assert finding_present(records).tolist() == [True, False]
    records.loc[1, "polarity"] = "negated"  # "Is the pleural space clear?" -> no: the finding is present
    assert finding_present(records).tolist() == [True, True]
    joined, _ = join_regions(read_regions(path), records, lambda p: (160, 160))
    units = grounding_units(records, joined, MapReader(tmp_path), ("attention", "gradxinput"))
    assert (units[units.map_kind == "gradxinput"].status == "no map").all()


def test_a_region_outside_the_crop_is_not_seen(tmp_path):
    records, path = build(tmp_path, 2)
    cropped = {**GEOMETRY, "crop_box": [40.0, 0.0, 160.0, 120.0]}  # the model saw x >= 40 only
    records["geometry"] = [cropped, cropped]
    joined, _ = join_regions(read_regions(path), records, lambda p: (160, 160))
    units = grounding_units(records, joined, MapReader(tmp_path), ("attention",))
    assert (units.status == "not seen").all() and units.pointing_hit.isna().all()
    assert grounding_table(units, n_boot=100).empty

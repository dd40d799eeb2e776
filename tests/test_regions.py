"""Tests of medvlm.data.regions: each format on the real file torchxrayvision's wheel ships (row and box
counts, one box checked by hand against the raw line), hand-made files for the rest, and the join
with everything that does not join counted."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from medvlm.data import regions as rg

SHARED_NIH = Path(__file__).resolve().parents[1] / "data" / "nih-cxr14"  # the repo's copy of shared/data


def _txv_file(name: str) -> Path:
    spec = importlib.util.find_spec("torchxrayvision")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torchxrayvision is not installed (pip install -r requirements-dev.txt): no real label files")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / name
        if path.is_file():
            return path
    pytest.skip(f"torchxrayvision's wheel has no data/{name}")


@pytest.fixture(scope="module")
def nih() -> rg.RegionSet:
    return rg.read_regions(_txv_file("BBox_List_2017.csv.gz"))


@pytest.fixture(scope="module")
def vindr() -> rg.RegionSet:
    return rg.read_regions(_txv_file("vinbigdata-train.csv.gz"))


def _by_key(rs: rg.RegionSet, key: str, finding: str) -> rg.Region:
    found = [r for r in rs.regions if r.key == key and r.finding == finding]
    assert len(found) == 1, found
    return found[0]


def _rows(*items) -> pd.DataFrame:
    """Question rows (study_id, image_path, finding, answer_gt), two paraphrases each."""
    out = [dict(study_id=s, image_path=p, finding=f, answer_gt=a, variant_id=v) for s, p, f, a in items for v in (0, 1)]
    return pd.DataFrame(out)


# ----------------------------------------------------------------------------- real files


def test_nih_bbox_real_file(nih):
    assert nih.format == "nih_bbox"
    assert (nih.entries, len(nih.regions), nih.negative_entries, nih.errors) == (984, 984, 0, [])
    assert len({r.key for r in nih.regions}) == 880
    per = {f: sum(r.finding == f for r in nih.regions) for f in ("atelectasis", "pleural_effusion", "infiltration")}
    assert per == {"atelectasis": 180, "pleural_effusion": 153, "infiltration": 123}  # "Effusion", "Infiltrate"
    # line 2: 00013118_008.png,Atelectasis,225.084745762712,547.019216763771,86.7796610169491,79.1864406779661
    r = _by_key(nih, "00013118_008", "atelectasis")
    assert r.sources == (f"{nih.path}:2",) and r.image_size == (1024, 1024) and r.label == "Atelectasis"
    np.testing.assert_allclose(r.boxes, [(225.084745762712, 547.019216763771, 311.864406779661, 626.205657441737)])
    # at 512 x 512 (scale 0.5) pixel centres in [112.54, 155.93) x [273.51, 313.10): columns 113..155, rows 274..312
    m = r.mask(512, 512)
    ys, xs = np.nonzero(m)
    assert (xs.min(), xs.max(), ys.min(), ys.max(), int(m.sum())) == (113, 155, 274, 312, 43 * 39)


def test_vindr_real_file_keeps_each_reader_and_unions(vindr):
    path = _txv_file("vinbigdata-train.csv.gz")
    assert vindr.format == "vindr" and vindr.errors == []
    assert (vindr.entries, vindr.negative_entries) == (67914, 31818)  # "No finding" rows carry no box
    assert dict(vindr.unmapped) == {"Other lesion": 2203}  # deliberately unmapped in findings.json: counted
    assert sum(len(r.boxes) for r in vindr.regions) == 67914 - 31818 - 2203
    frame = pd.read_csv(path)
    frame = frame[~frame["class_name"].isin(["No finding", "Other lesion"])]
    assert len(vindr.regions) == frame.groupby(["image_id", "class_name"]).ngroups == 14231
    # lines 4, 26167, 42711: three readers' cardiomegaly boxes on one image
    r = _by_key(vindr, "9a5094b2563a1ef3ff50dc5c7ff71345", "cardiomegaly")
    assert r.image_size is None and r.n_readers == 3 and sorted(r.readers) == ["R10", "R8", "R9"]
    assert [s.rsplit(":", 1)[1] for s in r.sources] == ["4", "26167", "42711"]
    assert r.boxes[0] == (691.0, 1375.0, 1653.0, 1831.0)  # 9a50...,Cardiomegaly,3,R10,691.0,1375.0,1653.0,1831.0
    m = r.mask(2000, 2000)
    # R8 (689, 1313)-(1666, 1763) reaches furthest up and right, R10 (691, 1375)-(1653, 1831) furthest down
    assert m[1313, 689] and m[1313, 1665] and m[1830, 1652] and m[1830, 691]
    assert not m[1312, 689] and not m[1313, 1666] and not m[1830, 1665] and not m[1831, 1000]
    assert len({rr.key for rr in vindr.regions if rr.n_readers == 3}) > 1000


def test_rsna_real_file():
    rs = rg.read_regions(_txv_file("kaggle_stage_2_train_labels.csv.zip"))
    assert rs.format == "rsna" and rs.errors == []
    assert (rs.entries, rs.negative_entries, len(rs.regions)) == (30227, 20672, 6012)  # Target 0 rows: no box
    assert sum(len(r.boxes) for r in rs.regions) == 9555
    # lines 6-7: 00436515-...,264.0,152.0,213.0,379.0,1 and ...,562.0,152.0,256.0,453.0,1
    r = _by_key(rs, "00436515-870c-4b36-a041-de91049b9ab4", "pneumonia")
    assert r.boxes == ((264.0, 152.0, 477.0, 531.0), (562.0, 152.0, 818.0, 605.0))
    assert r.label == "Lung Opacity" and r.image_size == (1024, 1024)
    assert int(r.mask().sum()) == 213 * 379 + 256 * 453  # the two boxes do not overlap


def test_siim_real_file_decodes_column_major_relative_runs():
    path = _txv_file("siim-pneumothorax-train-rle.csv.gz")
    rs = rg.read_regions(path)
    assert rs.format == "siim" and rs.errors == []  # every run of 3576 masks lies within 1024 x 1024
    assert (rs.entries, rs.negative_entries, len(rs.regions)) == (12954, 9378, 2669)
    with gzip.open(path, "rt") as fh:
        fh.readline()
        fh.readline()
        image_id, encoded = fh.readline().strip().split(",")
    numbers = [int(t) for t in encoded.split()]
    assert len(numbers) == 504 and sum(numbers[1::2]) == 30859
    assert any(b < a for a, b in zip(numbers[0::2], numbers[2::2], strict=False))  # offsets: relative, not absolute
    r = _by_key(rs, image_id, "pneumothorax")
    m = r.mask()
    assert m.shape == (1024, 1024) and int(m.sum()) == 30859
    _, n_blobs = ndimage.label(m, structure=np.ones((3, 3)))
    assert n_blobs == 1  # one contiguous blob: column-major with relative offsets is the right reading
    ys, xs = np.nonzero(m)
    assert ys.mean() < 512  # upper half of the image, as a pneumothorax (read row-major it would be transposed)


def test_siim_convention_by_hand():
    # 3 rows x 4 columns, "1 2 3 1": run of 2 from flat 1, then skip 3 -> run of 1 from flat 6; flat = x * 3 + y
    starts, lengths = rg.siim_runs("1 2 3 1", width=4, height=3)
    assert starts.tolist() == [1, 6] and lengths.tolist() == [2, 1]
    region = rg.Region("k", rg.KEY_STEM, "pneumothorax", "Pneumothorax", "siim", ("x:2",),
                       runs=(starts, lengths), image_size=(4, 3))
    np.testing.assert_array_equal(region.mask(), [[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]])  # [y, x]
    with pytest.raises(ValueError, match="past the 4 x 3"):
        rg.siim_runs("10 5", width=4, height=3)
    with pytest.raises(ValueError, match="pairs"):
        rg.siim_runs("1 2 3", width=4, height=3)


# ----------------------------------------------------------------------------- CheXlocalize (no real file ships)

# pycocotools 2.0 mask.encode of the masks _coco_masks() draws (recorded once; pycocotools is not a dependency)
_COCO_30x40 = "`28f0000[2OfM000[OJb06^OJb06_OJ`06@J`06AJ>6BJ>6CJ<6DJ<6EJ:6FJ:6GJ86HJ86IJ66JJ66KJ46:0000000W9"


def _coco_masks():
    big = np.zeros((30, 40), dtype=bool)
    big[5:12, 8:30] = True
    big[20:28, 2:5] = True
    for i in range(15):
        big[14 + i // 2, 10 + i] = True
    small = np.zeros((4, 6), dtype=bool)
    small[1:3, 2:5] = True
    return big, small


def test_coco_rle_decoding_matches_pycocotools_strings():
    big, small = _coco_masks()
    for counts, mask in ((_COCO_30x40, big), ("9220003", small)):
        starts, lengths = rg.coco_runs(counts, *mask.shape)
        flat = np.zeros(mask.size, dtype=bool)
        for s, n in zip(starts, lengths, strict=True):
            flat[s : s + n] = True
        np.testing.assert_array_equal(flat.reshape(mask.shape[1], mask.shape[0]).T, mask)
    assert rg.coco_rle_counts("h0").tolist() == [24]  # an empty 4 x 6 mask
    assert rg.coco_rle_counts([3, 2, 19]).tolist() == [3, 2, 19]  # uncompressed form
    with pytest.raises(ValueError, match="cover 24 pixels"):
        rg.coco_runs("h0", 5, 6)


def test_chexlocalize_json_and_join(tmp_path):
    big, small = _coco_masks()
    path = tmp_path / "gt_segmentations_val.json"
    path.write_text(json.dumps({
        "patient1_study1_view1_frontal": {
            "Cardiomegaly": {"size": [30, 40], "counts": _COCO_30x40},
            "Pleural Effusion": {"size": [4, 6], "counts": "9220003"},
            "Edema": {"size": [30, 40], "counts": "`U1"},  # all zero (pycocotools): a negative entry
            "Atelectasis": {"size": [30, 40], "counts": "h0"},  # counts for 24 pixels, not 1200: error
        },
        "patient2_study1_view1_frontal": {"img_size": [30, 40], "Edema": [[[1, 2], [3, 4]]]},
    }))
    rs = rg.read_regions(path)
    assert rs.format == "chexlocalize"
    assert (rs.entries, rs.negative_entries, len(rs.regions)) == (3, 1, 2)
    assert len(rs.errors) == 2 and "Atelectasis" in rs.errors[0] and "polygon" in rs.errors[1]
    r = _by_key(rs, "patient1_study1_view1_frontal", "cardiomegaly")
    assert r.image_size == (40, 30)
    np.testing.assert_array_equal(r.mask(), big)
    np.testing.assert_array_equal(_by_key(rs, "patient1_study1_view1_frontal", "pleural_effusion").mask(), small)

    img = "CheXpert-v1.0/valid/patient1/study1/view1_frontal.jpg"
    assert rg.chexlocalize_key(img) == "patient1_study1_view1_frontal"
    rows = _rows(("p1", img, "cardiomegaly", "yes"), ("p1", img, "pleural_effusion", "yes"))
    by_row, rep = rg.join_regions(rs, rows, {img: (80, 60)})  # a copy at twice the size
    assert rep.regions_unmatched == {}
    assert rep.errors[-1].endswith("a different aspect ratio")  # effusion's 6 x 4 vs 80 x 60
    assert rep.regions_joined == 1 and rep.rows_joined == 2 and dict(rep.scaled) == {"2": 1}
    assert rep.positives_without_region == 0  # the effusion group had a region, with an error (counted there)
    j = by_row[0][0]
    np.testing.assert_array_equal(j.mask(), np.repeat(np.repeat(big, 2, axis=0), 2, axis=1))


# ----------------------------------------------------------------------------- plain CSV, errors, join


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_box_csv_builder_format_and_per_line_errors(tmp_path):
    p = _write(tmp_path, "regions.csv", "\n".join([
        "study_id,image_path,finding,x,y,w,h,image_width,image_height,source",
        "s1,img/s1.png,pleural_effusion,10,20,30,40,100,100,nih",
        "s1,img/s1.png,Effusion,50,50,10,10,100,100,nih",  # same finding, another spelling: one region
        "s2,img/s2.png,cardiomegaly,90,90,20,5,100,100,x",  # x1 = 110 > 100: outside
        "s3,img/s3.png,nodule,5,5,0,4,100,100,x",  # zero width
        "s4,img/s4.png,mass,a,5,5,5,100,100,x",  # not a number
        "s5,img/s5.png,no_finding,,,,,100,100,x",  # no box: negative entry
        "s6,img/s6.png,unknown thing,1,1,2,2,100,100,x",  # unmapped label
    ]) + "\n")
    rs = rg.read_regions(p)
    assert rs.format == "box_csv" and len(rs.regions) == 1 and rs.negative_entries == 1
    assert dict(rs.unmapped) == {"unknown thing": 1}
    assert [e.split(": ", 1)[0] for e in rs.errors] == [f"{p}:4", f"{p}:5", f"{p}:6"]
    assert "outside the 100 x 100 image" in rs.errors[0] and "zero or negative area" in rs.errors[1]
    assert "'a' is not a number" in rs.errors[2]
    r = rs.regions[0]
    assert r.key_kind == rg.KEY_STUDY and r.boxes == ((10, 20, 40, 60), (50, 50, 60, 60)) and r.n_readers is None
    with pytest.raises(rg.RegionError, match="3 bad line"):
        rg.read_regions(p, strict=True)
    corners = _write(tmp_path, "corners.csv", "study_id,finding,x_min,y_min,x_max,y_max\ns1,mass,1,2,3,4\n")
    assert rg.read_regions(corners).regions[0].boxes == ((1, 2, 3, 4),)


def test_unknown_header_lists_the_known_formats(tmp_path):
    p = _write(tmp_path, "what.csv", "id,label,box\n1,2,3\n")
    with pytest.raises(rg.RegionError) as e:
        rg.read_regions(p)
    for name in rg.FORMATS:
        assert name in str(e.value)
    with pytest.raises(rg.RegionError, match="not found"):
        rg.read_regions(tmp_path / "missing.csv")


def test_a_region_file_not_in_utf8_names_its_line(tmp_path):
    p = tmp_path / "r.csv"
    p.write_bytes("study_id,finding,x,y,w,h\ns1,effusion,1,1,5,5\ns2,épanchement,1,1,5,5\n".encode("latin-1"))
    with pytest.raises(rg.RegionError, match=r"r\.csv:3 \(byte 0xe9 at column 4\): cannot read as UTF-8"):
        rg.read_regions(p)


def test_finding_map_override(tmp_path):
    p = _write(tmp_path, "r.csv", "study_id,finding,x,y,w,h\ns1,Effusion,1,1,5,5\n")
    assert rg.read_regions(p).regions[0].finding == "pleural_effusion"  # packaged default
    assert rg.read_regions(p, {"Effusion": "fluid_custom"}).regions[0].finding == "fluid_custom"


def test_join_counts_everything_that_does_not_join(tmp_path):
    p = _write(tmp_path, "nih.csv", "\n".join([
        "Image Index,Finding Label,Bbox [x,y,w,h],,,",
        "a.png,Atelectasis,100,100,200,100",  # joins a 512 x 512 copy: scale 0.5
        "b.png,Atelectasis,0,0,10,10",  # b is asked about cardiomegaly only: finding not asked
        "c.png,Atelectasis,0,0,10,10",  # c is not in the questions
        "d.png,Atelectasis,0,0,10,10",  # d is 600 x 400 on disk: another aspect ratio
        "e.png,Cardiomegaly,0,0,10,10",  # e's question says "no": joined, counted
        "f.png,Cardiomegaly,0,0,2000,10",  # outside 1024 x 1024: a per-line error
    ]) + "\n")
    rs = rg.read_regions(p)
    assert len(rs.regions) == 5 and len(rs.errors) == 1 and rs.errors[0].startswith(f"{p}:7:")
    rows = _rows(
        ("A", "imgs/a.png", "atelectasis", "yes"),
        ("B", "imgs/b.png", "cardiomegaly", "yes"),  # positive, cardiomegaly has regions in the file, none for b
        ("D", "imgs/d.png", "atelectasis", "yes"),
        ("E", "imgs/e.png", "cardiomegaly", "no"),
        ("G", "imgs/g.png", "atelectasis", "yes"),  # positive without region
        ("H", "imgs/h.png", "edema", "yes"),  # no edema regions in the file: not counted
    )
    sizes = {"imgs/a.png": (512, 512), "imgs/b.png": (512, 512), "imgs/d.png": (600, 400), "imgs/e.png": (1024, 1024)}
    by_row, rep = rg.join_regions(rs, rows, sizes)
    assert rep.regions_unmatched == {"image not in the questions": 1, "finding not asked for this image": 1}
    assert rep.regions_joined == 2 and rep.groups_joined == 2 and rep.rows_joined == 4
    assert sorted(by_row) == [0, 1, 6, 7]
    assert rep.negative_questions_with_region == 1
    assert rep.positives_without_region == 2 and rep.positive_rows_without_region == 4
    assert dict(rep.positives_without_region_by_finding) == {"cardiomegaly": 1, "atelectasis": 1}
    assert dict(rep.scaled) == {"0.5": 1}
    assert len(rep.errors) == 2 and "a different aspect ratio" in rep.errors[1] and f"{p}:5" in rep.errors[1]
    a = by_row[0][0]
    assert a.scale == (0.5, 0.5) and a.boxes() == [(50.0, 50.0, 150.0, 100.0)]
    assert int(a.mask().sum()) == 100 * 50 and a.describe()["region_scale"] == 0.5
    d = rep.as_dict()
    assert d["regions_joined"] == 2 and d["errors"] == 2 and d["files"][0]["positives_without_region"] == 2
    assert any("not joined: 1 region(s): image not in the questions" in line for line in rep.summary())


def test_unstated_size_boxes_must_fit_the_image_on_disk(tmp_path):
    p = _write(tmp_path, "v.csv", "\n".join([
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max",
        "img1,Cardiomegaly,3,R1,10,10,50,50",
        "img1,Cardiomegaly,3,R2,20,20,60,60",
        "img2,Cardiomegaly,3,R1,10,10,500,50",
        "img3,No finding,14,R1,,,,",
    ]) + "\n")
    rs = rg.read_regions(p)
    assert len(rs.regions) == 2 and rs.negative_entries == 1 and rs.regions[0].n_readers == 2
    rows = _rows(("1", "x/img1.dcm", "cardiomegaly", "yes"), ("2", "x/img2.dcm", "cardiomegaly", "yes"))
    by_row, rep = rg.join_regions(rs, rows, lambda path: (100, 100))
    assert rep.regions_joined == 1 and rep.size_not_stated == 1
    assert len(rep.errors) == 1 and "lies outside image x/img2.dcm" in rep.errors[0]
    assert int(by_row[0][0].mask().sum()) == 40 * 40 * 2 - 30 * 30  # union of the two readers' boxes
    sized = rg.read_regions(p, stated_sizes={"img2": (400, 400)})
    assert len(sized.regions) == 1 and "outside the 400 x 400 image" in sized.errors[0]


def test_real_downsampled_nih_image_on_disk(tmp_path):
    image = SHARED_NIH / "00000001_000.png"
    if not image.is_file():
        pytest.skip(f"{image} not present")
    from PIL import Image

    p = _write(tmp_path, "nih.csv", "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
               "00000001_000.png,Cardiomegaly,300,500,400,300\n")
    with Image.open(image) as im:
        size = im.size
    assert size == (512, 512)
    rows = _rows(("00000001_000", str(image), "cardiomegaly", "yes"))
    by_row, rep = rg.join_regions(rg.read_regions(p), rows, {str(image): size})
    assert rep.regions_joined == 1 and dict(rep.scaled) == {"0.5": 1}
    assert by_row[0][0].boxes() == [(150.0, 250.0, 350.0, 400.0)]


def test_resample_mask_takes_the_pixel_under_each_centre():
    m = np.zeros((4, 4), dtype=bool)
    m[1, 3] = True  # 4 -> 2: target centres 0.5, 1.5 sit on source 1.0, 3.0: rows/columns 1 and 3
    np.testing.assert_array_equal(rg.resample_mask(m, 2, 2), [[False, True], [False, False]])
    m2 = m.copy()
    m2[1, 3], m2[0, 2] = False, True  # between the sampled centres: gone at 2 x 2
    assert not rg.resample_mask(m2, 2, 2).any()
    np.testing.assert_array_equal(rg.resample_mask(m, 8, 8)[2:4, 6:8], np.ones((2, 2), dtype=bool))
    assert rg.resample_mask(m, 8, 8).sum() == 4

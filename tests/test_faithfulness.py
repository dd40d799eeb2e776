"""Deletion / insertion curves (medvlm.analysis.faithfulness): RISE's AUC on hand-made curves, the
perturbation checked pixel by pixel, the blur against scipy, a tiny model built here whose
answer one image cell decides, the backends' own pass on perturbed pixels, and the table."""

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter

from medvlm.analysis.faithfulness import (
    RANDOM,
    UNIT_KEY,
    FaithfulnessConfig,
    blur_sigma,
    cell_pixel_mask,
    faithfulness_for_studies,
    faithfulness_table,
    gaussian_blur,
    merge_curves,
    model_pixels,
    parse_variants,
    perturb,
    rise_auc,
    score_pixels,
    split_curves,
    step_counts,
)
from medvlm.core.backend import QuestionScore, VLMBackend
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.geometry import square_resize_geometry

Q = "Is there a pleural effusion?"


def test_rise_auc_on_hand_made_curves():
    assert rise_auc([1, 1, 1, 1]) == 1.0
    assert rise_auc([0, 0, 0]) == 0.0
    assert rise_auc([1, 0]) == 0.5
    assert rise_auc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert rise_auc([1.0, 0.0, 0.0, 0.0, 0.0]) == pytest.approx(0.125)  # drop at the first step: 1 / (2K)
    y = np.random.default_rng(0).random(17)
    assert rise_auc(y) == pytest.approx(np.trapezoid(y, dx=1 / 16))
    with pytest.raises(ValueError):
        rise_auc([0.3])


def test_step_counts():
    assert step_counts(256, 16).tolist() == list(range(0, 257, 16))
    n = step_counts(1369, 16)
    assert n[0] == 0 and n[-1] == 1369 and len(n) == 17
    assert np.abs(n / 1369 - np.arange(17) / 16).max() <= 1 / (2 * 1369)
    assert step_counts(10, 4).tolist() == [0, 3, 5, 8, 10]  # floor(k 10 / 4 + 1/2)


@pytest.mark.parametrize("grid, side", [((37, 37), 518), ((16, 16), 896), ((16, 16), 128)])
def test_perturbation_is_exactly_the_cells_named(grid, side):
    g = torch.Generator().manual_seed(0)
    original, substrate = torch.rand(3, side, side, generator=g), torch.rand(3, side, side, generator=g) + 2
    n = grid[0] * grid[1]
    removed = torch.zeros(2, n, dtype=torch.bool)
    removed[0, [0, grid[1] - 1, grid[1] + 3, n - 1]] = True
    removed[1, torch.randperm(n, generator=g)[: n // 3]] = True
    out = perturb(original, substrate, removed, grid)
    cell = side // grid[0]
    expected = original.expand(2, -1, -1, -1).clone()
    for b in range(2):
        for j in removed[b].nonzero()[:, 0].tolist():
            r, c = divmod(j, grid[1])
            expected[b, :, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = substrate[
                :, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell
            ]
    assert torch.equal(out, expected)
    # and the cells are where the overlays draw them: cell j covers Geometry.cell_box(j)
    geo = square_resize_geometry(side, side, side, grid)
    x0, y0, x1, y1 = geo.cell_box(*divmod(grid[1] + 3, grid[1]))
    mask = cell_pixel_mask(removed[:1], grid, side)[0, 0]
    assert mask[int(y0) : int(y1), int(x0) : int(x1)].all() and int(mask.sum()) == 4 * cell * cell
    with pytest.raises(ValueError, match="whole number"):
        cell_pixel_mask(removed[:1], grid, side + 1)


def test_blur_equals_scipy_and_commutes_with_normalisation():
    x = torch.rand(2, 3, 64, 80, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for sigma in (1.43, 2.857, 5.0):
        ours = gaussian_blur(x, sigma).numpy()
        ref = np.stack([[gaussian_filter(x[i, c].numpy(), sigma, mode="mirror", truncate=4.0) for c in range(3)]
                        for i in range(2)])  # fmt: skip
        assert np.abs(ours - ref).max() <= 1e-12, sigma
    mean, std = torch.tensor([0.48, 0.46, 0.41]).view(1, 3, 1, 1), torch.tensor([0.27, 0.26, 0.28]).view(1, 3, 1, 1)
    xf = x.float()
    assert (gaussian_blur((xf - mean) / std, 2.0) - (gaussian_blur(xf, 2.0) - mean) / std).abs().max() <= 1e-5
    assert blur_sigma(FaithfulnessConfig(), 518) == pytest.approx(5 * 518 / 224)
    assert blur_sigma(FaithfulnessConfig(blur_sigma=3.0), 896) == 3.0


def test_config_and_variants():
    assert parse_variants("all") is None and parse_variants("0") == (0,) and parse_variants("3,0") == (0, 3)
    for bad in ("", "x", "-1"):
        with pytest.raises(ValueError):
            parse_variants(bad)
    with pytest.raises(ValueError, match="substrate"):
        FaithfulnessConfig(substrate="noise")


# -- a tiny model whose answer one image cell decides -----------------------------------------------
class OneCellModel(VLMBackend):
    """P(yes) = sigmoid(40 (mean of cell DECIDER's normalised pixels - 0.9)): no other pixel
    matters. Input 64 x 64, normalised (x / 255 - 0.5) / 0.5, an 8 x 8 grid of 8 px cells."""

    name = "one_cell"
    default_batch_size = 24  # 4 images per pass
    DECIDER = 29  # cell (3, 5)
    side, _grid = 64, (8, 8)

    def __init__(self):
        self.config = MedicalAttentionConfig()
        self.layers = (0,)
        self.model = None
        self.device = torch.device("cpu")
        self.calls, self.seen = [], []

    @property
    def grid(self):
        return self._grid

    def geometry(self, width, height):
        return square_resize_geometry(width, height, self.side, self._grid)

    def preprocess(self, image):
        a = np.asarray(self.model_image(image).resize((self.side, self.side), Image.NEAREST), dtype=np.float32)
        return (torch.from_numpy(a).permute(2, 0, 1) / 255.0 - 0.5) / 0.5

    def prepare(self, items):
        items = self.checked_items(items)
        return {"items": items, "pixel_values": self.pixel_values([im for im, _, _ in items])}

    def score_prepared(self, prep):
        px = prep["pixel_values"]
        self.calls.append(len(px))
        self.seen.append(px.clone())
        r, c = divmod(self.DECIDER, self._grid[1])
        v = px[:, :, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8].mean((1, 2, 3))
        p = torch.sigmoid(40 * (v - 0.9)).double()
        return [[QuestionScore(question=qs[0], prompt=qs[0], p_yes=float(p[k]), coverage=1.0,
                               answer="yes" if p[k] >= 0.5 else "no", attention=np.zeros((0, 64)), layers=(),
                               image_mass=np.zeros(0), n_query_tokens=1)]
                for k, (_, qs, _) in enumerate(prep["items"])]  # fmt: skip

    def score(self, image, questions, findings=None):
        return self.score_prepared(self.prepare([(image, questions, findings)]))[0]

    def unload(self):
        pass


def one_cell_image(seed=0):
    rng = np.random.default_rng(seed)
    a = (rng.random((64, 64, 3)) * 100).astype(np.uint8)  # dark noise: normalised -1 .. -0.2
    r, c = divmod(OneCellModel.DECIDER, 8)
    a[r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = 255  # the deciding cell white: normalised 1
    return Image.fromarray(a)


@pytest.mark.parametrize("substrate", ["blur", "mean"])
def test_the_true_map_is_the_most_faithful_on_a_model_one_cell_decides(substrate):
    model = OneCellModel()
    n = 64
    true = np.zeros(n)
    true[OneCellModel.DECIDER] = 1.0
    anti = 1.0 - true  # the deciding cell last
    studies = []
    for s in range(6):
        image = one_cell_image(s)
        assert model.score(image, [Q])[0].answer == "yes"
        noise = np.random.default_rng(100 + s).random(n)
        rows = [{"finding": "effusion", "variant_id": 0, "question": Q, "answer": "yes"}]
        studies.append((f"s{s}", image, rows, {"attention": [true], "anti": [anti], "noise": [noise]}))
    cfg = FaithfulnessConfig(steps=8, substrate=substrate, n_random=3)
    records, curves = faithfulness_for_studies(model, studies, cfg)
    df = pd.DataFrame(records)
    assert set(df["map"]) == {"attention", "anti", "noise", RANDOM} and (df["status"] == "ok").all()
    auc = df.groupby("map")[["deletion_auc", "insertion_auc"]].mean()
    p0 = df["p_answer"].iloc[0]
    # the true map removes the deciding cell at step 1: the score falls to ~0 there
    assert auc.loc["attention", "deletion_auc"] <= p0 / (2 * cfg.steps) + 1e-3
    assert auc.loc["attention", "deletion_auc"] == auc["deletion_auc"].min()
    assert auc.loc["attention", "insertion_auc"] == auc["insertion_auc"].max()
    assert auc.loc[RANDOM, "deletion_auc"] >= 2 * p0 / cfg.steps, "random removed the deciding cell first"
    assert auc.loc["anti", "deletion_auc"] == auc["deletion_auc"].max()
    true_rows = df[df["map"] == "attention"]
    assert (true_rows["deletion_auc_minus_random"] < 0).all() and (true_rows["insertion_auc_minus_random"] > 0).all()
    assert true_rows["deletion_auc_minus_attention"].isna().all()
    anti_rows = df[df["map"] == "anti"]
    assert np.allclose(anti_rows["deletion_auc_minus_attention"],
                       anti_rows["deletion_auc"].to_numpy() - true_rows["deletion_auc"].to_numpy())  # fmt: skip
    # every unit's unique images: 2 shared end points + (K - 1) per curve and order
    assert (df["n_images"] == 2 + (cfg.steps - 1) * 2 * (3 + 3) + (substrate == "mean")).all()
    assert max(model.calls) == 4, "images_per_pass defaults to the backend's studies per pass"
    rows = merge_curves(records, curves)
    assert len(rows) == len(records) and all(len(r["deletion"]) == cfg.steps + 1 for r in rows)
    back = pd.DataFrame(split_curves(pd.DataFrame(rows))).set_index([*UNIT_KEY, "curve"]).sort_index()
    orig = pd.DataFrame(curves).set_index([*UNIT_KEY, "curve"]).sort_index()
    assert back["cells"].tolist() == orig["cells"].tolist()
    assert np.allclose(np.stack(back["score"].to_numpy()), np.stack(orig["score"].to_numpy()), atol=1e-6)
    c = pd.DataFrame(curves)
    dele = c[(c["map"] == "attention") & (c["curve"] == "deletion")]["score"].iloc[0]
    ins = c[(c["map"] == "attention") & (c["curve"] == "insertion")]["score"].iloc[0]
    assert dele[0] == pytest.approx(p0) and ins[-1] == pytest.approx(p0) and len(dele) == cfg.steps + 1
    assert dele[1] < 1e-3 and ins[1] == pytest.approx(p0)


@pytest.mark.parametrize("substrate", ["blur", "mean"])
def test_the_scored_pixels_are_exactly_the_cells_named(substrate):
    """Every image the model received, pixel by pixel: each of the map's deletion and insertion
    steps arrives as the original with exactly the first n_k cells in map order replaced
    (deletion: by the substrate; insertion: all but them by the blur, made here with scipy)."""
    model = OneCellModel()
    image = one_cell_image(7)
    values = np.random.default_rng(5).permutation(64).astype(float)  # distinct: the order is known
    order = np.argsort(-values)
    rows = [{"finding": "effusion", "variant_id": 0, "question": Q, "answer": "yes"}]
    cfg = FaithfulnessConfig(steps=4, substrate=substrate, n_random=1)
    faithfulness_for_studies(model, [("s0", image, rows, {"attention": [values]})], cfg)
    seen = torch.cat(model.seen).double().numpy()
    orig = model.preprocess(image).double().numpy()
    sigma = blur_sigma(cfg, 64)
    blur = np.stack([gaussian_filter(orig[c], sigma, mode="mirror", truncate=4.0) for c in range(3)])
    fill = blur if substrate == "blur" else np.zeros_like(orig)

    def with_cells(cells, base, sub):
        out = base.copy()
        for j in cells:
            r, c = divmod(int(j), 8)
            out[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8] = sub[:, r * 8 : (r + 1) * 8, c * 8 : (c + 1) * 8]
        return out

    for n in step_counts(64, cfg.steps):
        first = order[:n]
        for want in (with_cells(first, orig, fill), with_cells(np.setdiff1d(np.arange(64), first), orig, blur)):
            diffs = np.abs(seen - want).reshape(len(seen), -1).max(1)
            assert diffs.min() <= 1e-6, f"n_k = {n}: no image received equals it (closest {diffs.min():.2e})"


def test_unavailable_and_malformed_maps():
    model = OneCellModel()
    rows = [{"finding": "effusion", "variant_id": 0, "question": Q, "answer": "yes"},
            {"finding": "effusion", "variant_id": 1, "question": Q, "answer": "yes"}]  # fmt: skip
    maps = {"attention": [np.ones(64), np.ones(64)], "relative": ["generic map is 0 at 3 entries", None],
            "gradxinput": [np.full(64, np.nan), np.zeros(64)]}  # fmt: skip
    study = [("s0", one_cell_image(), rows, maps)]
    records, curves = faithfulness_for_studies(model, study, FaithfulnessConfig(steps=2))
    df = pd.DataFrame(records).set_index("map")
    assert len(df) == 4, "variant 1 is not chosen by default"
    assert df.loc["relative", "status"] == "unavailable" and "generic" in df.loc["relative", "reason"]
    assert df.loc["gradxinput", "status"] == "unavailable" and "non-finite" in df.loc["gradxinput", "reason"]
    assert np.isnan(df.loc["relative", "deletion_auc"]) and np.isnan(df.loc["relative", "deletion_auc_minus_random"])
    merged = {r["map"]: r for r in merge_curves(records, curves)}
    assert merged["relative"]["deletion"] is None and len(merged["attention"]["insertion"]) == 3
    assert {c["map"] for c in split_curves(list(merged.values()))} == {"attention", RANDOM}
    all_rows, _ = faithfulness_for_studies(model, [("s0", one_cell_image(), rows, maps)],
                                           FaithfulnessConfig(steps=2, variants="all"))  # fmt: skip
    assert len(all_rows) == 8
    with pytest.raises(ValueError, match="shape"):
        faithfulness_for_studies(model, [("s0", one_cell_image(), rows[:1], {"attention": [np.ones(63)]})])
    with pytest.raises(ValueError, match="answer"):
        faithfulness_for_studies(model, [("s0", one_cell_image(), [{**rows[0], "answer": "maybe"}],
                                          {"attention": [np.ones(64)]})])  # fmt: skip


# -- the real backends' own pass on perturbed pixels ------------------------------------------------
@pytest.fixture(scope="module", params=["llava_rad", "medgemma"])
def backend(request):
    if request.param == "llava_rad":
        from llava_rad_medical_only import LLaVARadMedical

        return LLaVARadMedical.tiny(MedicalAttentionConfig(controls=("text_only", "blank"), generic_prompt="Describe."))
    from medgemma_enhanced import MedGemmaMedical

    return MedGemmaMedical.tiny(MedicalAttentionConfig(controls=("blank",), generic_prompt="Describe."))


def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((64, 48)) * 255).astype("uint8")).convert("RGB")]  # fmt: skip


def test_model_pixels_are_what_the_processor_makes(backend):
    imgs = images()
    px = model_pixels(backend, imgs)
    if backend.name == "medgemma":  # its 8-bit path normalised as its pass does = the processor's float path
        ref = backend.processor.image_processor(imgs, return_tensors="pt")["pixel_values"]
        assert backend.pixel_values(imgs).dtype == torch.uint8
    else:
        ref = torch.stack([backend.preprocess(im) for im in imgs])
    assert px.dtype == torch.float32 and torch.allclose(px, ref.float(), atol=1e-6), (px - ref).abs().max()


def test_perturbed_pixels_score_as_the_backends_own_pass(backend):
    """score_pixels (one question per image, nothing extra) gives the P(yes) the backend's own
    score() gives on the image, and on perturbed pixels the P(yes) its own full pass gives
    (controls, generic prompt and attention capture on), batched or one at a time."""
    imgs = images()
    px = model_pixels(backend, imgs)
    p = score_pixels(backend, imgs, [Q, Q], [None, None], px)
    own = [backend.score(im, [Q])[0].p_yes for im in imgs]
    assert np.abs(p - own).max() <= 1e-6, (p, own)
    grid = backend.grid
    n = grid[0] * grid[1]
    removed = torch.zeros(3, n, dtype=torch.bool)
    removed[0, : n // 2] = True
    removed[1, n // 3 :] = True
    removed[2, ::5] = True
    sub = gaussian_blur(px[:1], 3.0)[0]
    perturbed = perturb(px[0], sub, removed, grid)
    assert (perturbed != px[0]).any(dim=(1, 2, 3)).all()
    batch = score_pixels(backend, [imgs[0]] * 3, [Q] * 3, [None] * 3, perturbed)
    alone = [score_pixels(backend, [imgs[0]], [Q], [None], perturbed[i : i + 1])[0] for i in range(3)]
    prep = backend.prepare([(imgs[0], [Q], None)] * 3)
    prep["pixel_values"] = perturbed
    full = [s[0].p_yes for s in backend.score_prepared(prep)]
    assert np.abs(batch - np.array(alone)).max() <= 1e-6 and np.abs(batch - np.array(full)).max() <= 1e-6
    assert np.abs(batch - p[0]).max() > 1e-6, "the perturbation changed nothing: the check could not fail"
    assert backend.config.controls, "the backend's own config is untouched"


def test_end_to_end_on_a_tiny_backend(backend):
    imgs = images()
    rows = [{"finding": "effusion", "variant_id": 0, "question": Q, "answer": "no"}]
    n = backend.grid[0] * backend.grid[1]
    att = np.random.default_rng(0).random(n)
    studies = [(f"s{i}", im, rows, {"attention": [att]}) for i, im in enumerate(imgs)]
    cfg = FaithfulnessConfig(steps=2, n_random=1, substrate="mean", images_per_pass=3)
    records, curves = faithfulness_for_studies(backend, studies, cfg)
    assert len(records) == 4 and len(curves) == 8
    own = [1 - backend.score(im, [Q])[0].p_yes for im in imgs]
    px = model_pixels(backend, imgs)
    zero = 1 - score_pixels(backend, imgs, [Q, Q], [None, None], torch.zeros_like(px))
    blur = 1 - score_pixels(backend, imgs, [Q, Q], [None, None], gaussian_blur(px, blur_sigma(cfg, px.shape[-1])))
    for i in range(2):
        r = [x for x in records if x["study_id"] == f"s{i}" and x["map"] == "attention"][0]
        assert abs(r["p_answer"] - own[i]) <= 1e-6
        assert abs(r["p_answer_deleted"] - zero[i]) <= 1e-6 and abs(r["p_answer_blurred"] - blur[i]) <= 1e-6
        assert r["n_images"] == 3 + 2 * (2 - 1) * 2


# -- the table ----------------------------------------------------------------------------------------
def synthetic_records():
    """Records of two models, 8 studies, 2 findings, maps attention and gradxinput (gradxinput
    the more faithful: lower deletion AUC) and random."""
    rng = np.random.default_rng(0)
    records = []
    for model in ("llava_rad", "medgemma"):
        for s in range(8):
            for f in ("effusion", "cardiomegaly"):
                base = {"model": model, "study_id": f"s{s}", "finding": f, "variant_id": 0}
                auc = {"attention": 0.3 + 0.4 * rng.random(), "gradxinput": 0.3 * rng.random(),
                       RANDOM: 0.3 + 0.4 * rng.random()}  # fmt: skip
                for name, d in auc.items():
                    rec = {**base, "map": name, "status": "ok", "deletion_auc": d, "insertion_auc": 1 - d}
                    rec["deletion_auc_minus_random"] = d - auc[RANDOM] if name != RANDOM else np.nan
                    rec["insertion_auc_minus_random"] = auc[RANDOM] - d if name != RANDOM else np.nan
                    rec["deletion_auc_minus_attention"] = d - auc["attention"] if name != "attention" else np.nan
                    rec["insertion_auc_minus_attention"] = auc["attention"] - d if name != "attention" else np.nan
                    records.append(rec)
    records.append({**records[0], "map": "relative", "status": "unavailable", "deletion_auc": np.nan,
                    "insertion_auc": np.nan, "deletion_auc_minus_random": np.nan})  # fmt: skip
    return records


def test_table_pools_units_with_paired_differences():
    records = synthetic_records()
    table = faithfulness_table(records, n_boot=200)
    df = pd.DataFrame(records)
    assert list(dict.fromkeys(table["map"])) == ["attention", "relative", "gradxinput", RANDOM]
    row = table[(table["map"] == "gradxinput") & (table["model"] == "medgemma") & (table["finding"] == "ALL")
                & (table["metric"] == "deletion_auc_minus_random")].iloc[0]  # fmt: skip
    units = df[(df["map"] == "gradxinput") & (df["model"] == "medgemma")]
    assert row["estimate"] == pytest.approx(units["deletion_auc_minus_random"].mean())
    assert row["ci_low"] <= row["estimate"] <= row["ci_high"] and row["n_clusters"] == 8
    metrics = set(table[table["map"] == RANDOM]["metric"])
    assert "deletion_auc_minus_random" not in metrics and "deletion_auc_minus_attention" in metrics
    assert "deletion_auc_minus_attention" not in set(table[table["map"] == "attention"]["metric"])
    assert (table["model"] == "llava_rad - medgemma").any()
    rel = table[(table["map"] == "relative") & (table["finding"] == "ALL") & (table["metric"] == "deletion_auc")]
    assert rel["n_units"].tolist() == [0]


# -- the figure ----------------------------------------------------------------------------------------
def test_curves_figure_draws_each_map_with_its_band():
    from medvlm.report.faithfulness_figures import curve_bands, faithfulness_curves_figure
    from medvlm.report.figure_canvas import BANNER_GID

    model = OneCellModel()
    true = np.zeros(64)
    true[OneCellModel.DECIDER] = 1.0
    rows = [{"finding": "effusion", "variant_id": 0, "question": Q, "answer": "yes"}]
    studies = [(f"s{s}", one_cell_image(s), rows, {"attention": [true], "noise": [np.random.default_rng(s).random(64)]})
               for s in range(6)]  # fmt: skip
    _, curves = faithfulness_for_studies(model, studies, FaithfulnessConfig(steps=3, n_random=2))
    other = [{**c, "model": "other", "score": [x / 2 for x in c["score"]]} for c in curves]
    bands = curve_bands(curves + other, n_boot=200)
    units = pd.DataFrame(curves + other)
    for m in ("one_cell", "other"):
        sel = units[(units["model"] == m) & (units["map"] == "noise") & (units["curve"] == "insertion")]
        want = np.mean(np.stack(sel["score"].to_numpy()), axis=0)
        got = bands[(bands["model"] == m) & (bands["map"] == "noise") & (bands["curve"] == "insertion")]
        got = got.sort_values("step")
        assert np.allclose(got["estimate"], want) and (got["n_units"] == 6).all()
        assert got["auc"].iloc[0] == pytest.approx(rise_auc(want))
        assert (got["ci_low"] <= got["estimate"] + 1e-12).all() and (got["n_clusters"] == 6).all()
        assert got["fraction"].tolist() == [0.0, 21 / 64, 43 / 64, 1.0]  # n_k = floor(64 k / 3 + 1/2)
    fig = faithfulness_curves_figure(curves + other, maps=["attention"], n_boot=200, random_weights=True)
    axes = fig.get_axes()
    assert len(axes) == 4
    labels = [line.get_label() for line in axes[0].get_lines()]
    assert len(labels) == 2 and labels[0].startswith("attention (AUC") and labels[1].startswith(f"{RANDOM} (AUC")
    assert labels[0].endswith(", 6 units)"), labels[0]
    assert len(axes[0].collections) == 2, "one band per line"
    assert any(t.get_gid() == BANNER_GID for t in fig.texts)
    fig.canvas.draw()
    with pytest.raises(ValueError, match="no curves for map"):
        faithfulness_curves_figure(curves, maps=["relevancy"], n_boot=200)
    with pytest.raises(ValueError, match="finding"):
        faithfulness_curves_figure(curves, finding="pneumothorax", n_boot=200)


def test_report_section():
    from medvlm.report.report_faithfulness import FAITHFULNESS_TERMS, faithfulness_section

    table = faithfulness_table(synthetic_records(), n_boot=200)
    text = "\n".join(faithfulness_section(table, "studies", {"steps": 16, "substrate": "blur", "n_random": 3,
                                                             "variants": "0", "blur_sigma": 11.6},
                                         figure="figures/faithfulness_curves.png"))  # fmt: skip
    assert text.startswith("## Faithfulness") and "figures/faithfulness_curves.png" in text
    assert "blur sigma (model-input pixels): 11.60." in text
    per_model = faithfulness_section(table, "studies", {"blur_sigma": {"llava_rad": 11.5625, "medgemma": 2.857142857}})
    assert "blur sigma (model-input pixels): llava_rad 11.56, medgemma 2.86." in "\n".join(per_model)
    for name in ("attention", "gradxinput", RANDOM):
        assert f"Map **{name}**" in text
    assert "llava_rad (deletion: gradxinput, insertion: gradxinput)" in text
    assert {t.key for t in FAITHFULNESS_TERMS} >= {"deletion_auc", "insertion_auc", "gradxinput", "relevancy"}
    assert faithfulness_section(None, "studies", {}) == []


def test_the_analysis_side_needs_no_transformers():
    """--analyze_only's faithfulness table, figure and report section import no transformers
    (the perturbation's device helper comes from medvlm.core.engine only when images are scored)."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, medvlm.analysis.faithfulness, medvlm.analysis.faithfulness_run, "
            "medvlm.report.report_faithfulness, medvlm.report.reporting; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr

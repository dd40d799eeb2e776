"""Attention sinks: the image-token norms captured in the packed pass against the eager
full-prompt reference's output_hidden_states (float32, tiny models of both architectures),
and medvlm.analysis.sinks' definitions on hand-made maps and norms whose answers are known."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from archive.reference import _inputs, eager_text_attention
from archive.reference_llava_rad import eager_attention, official_input_ids, reference_pixels, reference_vision_features
from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.analysis import sinks
from medvlm.core.config import GENERIC_PROMPT, MedicalAttentionConfig
from medvlm.core.maps import MapReader
from medvlm.core.store import ResultsStore, map_key

QUESTIONS = ["Is there a pleural effusion?", "Is the heart enlarged?", "Is there a pneumothorax in this chest X-ray?"]
REL_TOL = 1e-5  # float32: the norms are O(10), compared relative to the largest


def images():
    rng = np.random.default_rng(5)
    return [Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((64, 48)) * 255).astype("uint8")).convert("RGB")]  # fmt: skip


@pytest.fixture(scope="module", params=["llava_rad", "medgemma"])
def backend(request):
    config = MedicalAttentionConfig(generic_prompt=GENERIC_PROMPT, layers=(0, -1))  # packed extras; a layer subset
    return LLaVARadMedical.tiny(config) if request.param == "llava_rad" else MedGemmaMedical.tiny(config)


@torch.no_grad()
def reference_image_norms(backend, image, question) -> np.ndarray:
    """[n_layers + 1, n_image]: ||hidden_states[l]|| over the image span of one full prompt, eager,
    output_hidden_states=True (hidden_states[l] is the input of layer l)."""
    if backend.name == "medgemma":
        inputs = _inputs(backend, image, question)
        with eager_text_attention(backend.model):
            out = backend.model(**inputs, output_hidden_states=True, use_cache=False)
        start, end = backend._image_span(inputs["input_ids"][0].tolist())
    else:  # the reference's own splice (archive/reference_llava_rad.py), prompt as the backend builds it
        import llava_rad_medical_only as lr

        ids = official_input_ids(backend.tokenizer, lr.build_prompt(backend.config.full_question(question)))
        p = ids.index(-200)
        pixels = reference_pixels(image, backend.image_size, backend.mean, backend.std)[None]
        img = backend.projector(reference_vision_features(backend.vision.trunk, pixels, lr.VISION_SELECT_LAYER))[0]
        emb = backend.model.get_input_embeddings()
        embeds = torch.cat([emb(torch.tensor(ids[:p])), img, emb(torch.tensor(ids[p + 1 :]))])[None]
        with eager_attention(backend.model):
            out = backend.model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
        start, end = p, p + img.shape[0]
    return torch.stack([h[0, start:end].norm(dim=-1) for h in out.hidden_states]).numpy()


def test_image_token_norms_equal_the_eager_hidden_states(backend):
    imgs = images()
    scores = backend.score_many([(imgs[0], QUESTIONS, None), (imgs[1], QUESTIONS[:1], None)])
    for image, study in zip(imgs, scores, strict=True):
        norms = study[0].image_token_norms
        assert norms.dtype == np.float32 and norms.shape == (len(study[0].layers), study[0].attention.shape[-1])
        assert all(s.image_token_norms is norms for s in study), "one norms array per study"
        ref = reference_image_norms(backend, image, study[-1].question)[list(study[0].layers)]
        rel = np.abs(norms - ref).max() / np.abs(ref).max()
        assert rel <= REL_TOL, f"{backend.name}: image-token norms differ from hidden_states[l] by {rel:.2e} (relative)"
    a, b = scores[0][0].image_token_norms, scores[1][0].image_token_norms
    assert np.abs(a - b).max() > 1e-3, "the norms ignore the image"


# -- definitions on hand-made arrays ---------------------------------------------------------
def test_top_share_of_known_maps():
    n = 256  # k = ceil(2.56) = 3
    one = np.full(n, 0.1 / (n - 1))
    one[17] = 0.9
    uniform = np.ones(n)
    got = sinks.top_share(np.stack([one, uniform, 5 * uniform, np.zeros(n)]))
    assert abs(got[0] - (0.9 + 2 * 0.1 / (n - 1))) < 1e-12, got[0]  # 90% on one token, + two of the rest
    assert abs(got[1] - 3 / n) < 1e-12 and abs(got[2] - 3 / n) < 1e-12, got[1:3]  # scale-free, = uniform_top_share
    assert np.isnan(got[3])
    assert sinks.uniform_top_share(n) == 3 / n and sinks.top_k(1369) == 14
    with pytest.raises(ValueError, match="non-negative"):
        sinks.top_share(-uniform[None])


def test_recurrent_sinks_by_share_of_studies():
    # five studies, several maps each: position 7 peaks in studies 0-3, position 40 in studies 0 and 4 only
    peaks = [[7, 7, 40], [7, 3], [7], [2, 7, 7], [40, 9]]
    share = sinks.peak_share(peaks, 64)
    assert share[7] == 0.8 and share[40] == 0.4 and share[3] == 0.2
    assert sinks.recurrent_sinks(peaks, 64).tolist() == [7]  # 4 of 5 > 0.5; 2 of 5 is not
    assert sinks.recurrent_sinks(peaks, 64, min_share=0.3).tolist() == [7, 40]
    assert sinks.recurrent_sinks([[1], [2]], 64).tolist() == []  # 1 of 2 is not more than half


def test_a_planted_high_norm_token_is_an_outlier():
    rng = np.random.default_rng(0)
    norms = rng.uniform(9.0, 11.0, size=(4, 3, 100))  # 4 studies, 3 layers
    norms[2, 1, 55] *= 20
    out = sinks.norm_outliers(norms)
    assert out.sum() == 1 and out[2, 1, 55]
    norms[0, 0, 5] *= 2.5  # within the bulk's tail: not an outlier at factor 3
    assert not sinks.norm_outliers(norms)[0, 0, 5]


def _store_run(tmp_path, n_studies=6, n=64, sink=11):
    """A run folder by hand: model 'm' with a planted sink at `sink` (the peak at layer 5 in
    studies 0-4, never at layer 2) and norms with a 20x outlier at position 3 in every study."""
    rng = np.random.default_rng(1)
    store, records = ResultsStore(tmp_path), []
    for s in range(n_studies):
        maps = {}
        for f in ("effusion", "cardiomegaly"):
            for v in range(2):
                att = rng.uniform(0.5, 1.0, size=(2, n)) / n
                att[0, (s * 7 + v) % n] = 0.2  # layer 2: content peaks that move
                att[1, sink if s < 5 else 50] = 0.5  # layer 5: the sink in 5 of 6 studies
                maps[map_key(f, v)] = ((2, 5), att)
                records.append({"model": "m", "study_id": f"s{s}", "finding": f, "variant_id": v,
                                "cluster_id": f"p{s}", "status": "ok"})  # fmt: skip
        store.write_study("m", f"s{s}", records[-4:], maps)
    return records


def test_sink_summary_finds_the_planted_sink_and_its_share(tmp_path):
    records = pd.DataFrame(_store_run(tmp_path))
    reader = MapReader(tmp_path)
    norm = np.full((2, 64), 10.0)
    norm[:, 3] = 200.0

    report = sinks.sink_summary(records, reader, lambda m, s: ((2, 5), norm), n_boot=200)
    assert report.by_layer["m"][5] == [11] and report.by_layer["m"][2] == []
    assert report.by_layer["m"][sinks.MEAN_LAYER] == [11]  # the layer-mean map peaks there too
    assert report.sinks == {"m": [11]}
    assert report.norm_recurrent["m"] == {2: [3], 5: [3]}
    t = report.table.set_index(["layer", "model", "finding", "metric"])
    at = t.loc[(5, "m", "ALL", "peak_at_sink"), "estimate"]
    assert abs(at - 5 / 6) < 1e-12, at
    assert t.loc[(2, "m", "ALL", "peak_at_sink"), "estimate"] == 0
    layer_mean = [reader.get("m", r.study_id, r.finding, r.variant_id) for r in records.itertuples()]
    want = np.mean([m[11] / m.sum() for m in layer_mean])  # the pooled mean of the maps' shares on the sink
    got = t.loc[(sinks.MEAN_LAYER, "m", "ALL", "sink_share"), "estimate"]
    assert abs(got - want) < 1e-12 and want > 0.15, (got, want)
    assert t.loc[(5, "m", "ALL", "has_norm_outlier"), "estimate"] == 1
    assert abs(t.loc[(5, "m", "ALL", "norm_max_ratio"), "estimate"] - 20) < 1e-12
    manifest = report.manifest(grids={"m": (8, 8)})
    assert manifest["positions"] == {"m": [11]} and manifest["cells"] == {"m": [[1, 3]]}
    assert manifest["by_layer"]["m"]["5"] == [11] and manifest["by_layer"]["m"]["mean"] == [11]
    assert manifest["n_studies"] == {"m": 6} and manifest["min_share"] == 0.5
    assert json.loads(json.dumps(manifest)) == manifest  # JSON-ready as written
    assert set(report.table["metric"]) <= set(sinks.GLOSSARY)  # every number has its glossary sentence
    # excluding the detected sink zeroes it, as figures and grounding read the map
    assert reader.get("m", "s0", "effusion", 0, exclude=report.sinks["m"])[11] == 0


def test_missing_maps_and_norms_are_counted_not_filled(tmp_path):
    records = pd.DataFrame(_store_run(tmp_path, n_studies=2))
    extra = {"model": "m", "study_id": "s9", "finding": "effusion", "variant_id": 0, "cluster_id": "p9",
             "status": "ok"}  # fmt: skip
    records = pd.concat([records, pd.DataFrame([extra])], ignore_index=True)
    report = sinks.sink_summary(records, MapReader(tmp_path), lambda m, s: None, n_boot=50)
    assert report.missing == {"maps": {"m": 1}, "norms": {"m": 3}}
    assert report.n_studies == {"m": 2}

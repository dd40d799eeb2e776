"""The controls (text_only, blank) and the generic prompt of relative attention, packed into the
scoring pass, against the slow references: each full prompt through eager attention, float32,
on the tiny models of both architectures."""

import copy
import dataclasses

import numpy as np
import pytest
from PIL import Image

from archive.reference import medgemma_reference, medgemma_text_only_reference
from archive.reference_llava_rad import llava_rad_reference_score, llava_rad_text_only_reference
from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.core.backend import blank_image
from medvlm.core.config import GENERIC_PROMPT, MedicalAttentionConfig

QUESTIONS = ["Is there a pleural effusion?", "Is the heart enlarged?", "Is there a pneumothorax in this chest X-ray?"]
TOL = 1e-5


def images():
    rng = np.random.default_rng(3)
    return [Image.fromarray((rng.random((70, 90, 3)) * 255).astype("uint8")),
            Image.fromarray((rng.random((64, 48)) * 255).astype("uint8")).convert("RGB")]  # fmt: skip


CONFIG = MedicalAttentionConfig(controls=("text_only", "blank"), generic_prompt=GENERIC_PROMPT)


@pytest.fixture(scope="module", params=["llava_rad", "medgemma"])
def backends(request):
    """(backend with controls and the generic prompt, the same weights without them)."""
    if request.param == "llava_rad":
        on = LLaVARadMedical.tiny(CONFIG)
    else:
        on = MedGemmaMedical.tiny(CONFIG)
    off = copy.copy(on)
    off.config = MedicalAttentionConfig()
    off._token_cache, off._prompt_cache = {}, {}
    return on, off


def _text_only_ref(backend, q):
    if backend.name == "medgemma":
        return medgemma_text_only_reference(backend, q)
    return llava_rad_text_only_reference(backend, q)


def _image_ref(backend, image, q):
    """(P(yes), {layer: head-mean answer-token row over the image span})."""
    if backend.name == "medgemma":
        ref = medgemma_reference(backend, image, q)
        s, e = ref["image_span"]
        rows = {i: a[:, -1, s:e].mean(0).numpy() for i, a in enumerate(ref["attentions"])}
        return ref["p_yes"], rows
    from medvlm.core.scoring import yes_probability

    ref = llava_rad_reference_score(backend, image, q, query_mode="answer")
    s, e = ref["image_span"]
    p_yes = float(yes_probability(ref["logits"][None], backend.answer_tokens)[0][0])
    return p_yes, {i: r[:, -1, s:e].mean(0).numpy() for i, r in ref["rows"].items()}


def test_controls_equal_the_full_prompt_references(backends):
    on, _ = backends
    imgs = images()
    scores = on.score_many([(imgs[0], QUESTIONS, None), (imgs[1], QUESTIONS[:2], None)])
    for image, study in zip(imgs, scores, strict=True):
        for s in study:
            text_ref = _text_only_ref(on, s.question)
            assert abs(s.controls["text_only"] - text_ref) <= TOL, (s.question, s.controls["text_only"], text_ref)
            blank_ref, _ = _image_ref(on, blank_image(image.size), s.question)
            assert abs(s.controls["blank"] - blank_ref) <= TOL, (s.question, s.controls["blank"], blank_ref)
    # the controls are not the image answer itself (the comparison above could not pass by accident)
    assert any(abs(s.controls["text_only"] - s.p_yes) > 1e-4 for s in scores[0])


def test_the_generic_map_equals_the_generic_prompts_eager_rows(backends):
    on, _ = backends
    imgs = images()
    scores = on.score_many([(imgs[0], QUESTIONS[:2], None), (imgs[1], QUESTIONS[:1], None)])
    raw = copy.copy(on)
    raw.config = dataclasses.replace(on.config, answer_suffix="", controls=(), generic_prompt=None)
    raw._token_cache, raw._prompt_cache = {}, {}
    for image, study in zip(imgs, scores, strict=True):
        _, rows = _image_ref(raw, image, GENERIC_PROMPT)
        generic = study[0].generic_attention
        assert all(s.generic_attention is generic for s in study), "one generic map per study"
        for j, layer in enumerate(study[0].layers):
            diff = np.abs(generic[j] - rows[layer]).max()
            assert diff <= TOL, f"layer {layer}: generic map differs from the eager reference by {diff:.2e}"
        assert np.abs(generic - study[0].attention).max() > 1e-6, "the generic map is the question's own map"


def test_packing_the_extras_changes_no_question_result(backends):
    on, off = backends
    imgs = images()
    items = [(imgs[0], QUESTIONS, None), (imgs[1], QUESTIONS[:2], None)]
    with_extras, plain = on.score_many(items), off.score_many(items)
    for a_study, b_study in zip(with_extras, plain, strict=True):
        for a, b in zip(a_study, b_study, strict=True):
            assert abs(a.p_yes - b.p_yes) <= 1e-6
            assert np.abs(a.attention - b.attention).max() <= 1e-6
            assert b.controls == {} and b.generic_attention is None


def test_uniform_grey_preprocesses_the_same_at_every_size(backends):
    """The blank control shares one prefix per pass: true because a uniform image gives the
    same pixels whatever its size (resize and crop of a constant are that constant)."""
    on, _ = backends
    ref = on.preprocess(blank_image((64, 48)))
    for size in ((300, 200), (48, 64), (1024, 1024), (37, 519)):
        assert np.array_equal(on.preprocess(blank_image(size)).numpy(), ref.numpy()), size


def test_the_memo_scores_each_control_prompt_once_and_reads_it_back(backends):
    """A control names no study, so a second pass asking the same questions computes no control
    prompt, and what it reads back equals a fresh computation, question by question."""
    on, _ = backends
    on.control_memo.clear()
    imgs = images()
    on.score_many([(imgs[0], QUESTIONS[:2], None), (imgs[1], QUESTIONS[:2], None)])
    assert on.control_memo.computed >= 4  # 2 unique prompts x 2 controls (the copies counted as reused)
    before = on.control_memo.computed
    read = on.score_many([(imgs[1], QUESTIONS, None)])[0]
    assert on.control_memo.computed - before == 2, "only the new question's two control prompts are computed"
    on.control_memo.clear()
    fresh = on.score_many([(imgs[1], QUESTIONS, None)])[0]
    for control in ("text_only", "blank"):
        a, b = (np.array([s.controls[control] for s in x]) for x in (read, fresh))
        assert np.abs(a - b).max() <= TOL, f"{control}: memo vs fresh differ by {np.abs(a - b).max():.2e}"
        assert np.ptp(b) > 1e-4, f"{control}: the questions' values are too close to tell a mix-up"


def test_the_memo_key_is_the_whole_prompt(backends):
    """A backend sharing the memo but with another answer suffix builds other prompts: it must
    compute them, not read the first template's values."""
    on, _ = backends
    imgs = images()
    on.score_many([(imgs[0], QUESTIONS[:1], None)])
    other = copy.copy(on)  # shares the memo (and the weights)
    other.config = dataclasses.replace(on.config, answer_suffix="Reply with one word.")
    other._token_cache, other._prompt_cache = {}, {}
    before = other.control_memo.computed
    s = other.score_many([(imgs[0], QUESTIONS[:1], None)])[0][0]
    assert other.control_memo.computed - before == 2
    assert abs(s.controls["text_only"] - _text_only_ref(other, s.question)) <= TOL
    assert abs(s.controls["text_only"] - on.score(imgs[0], QUESTIONS[:1])[0].controls["text_only"]) > 1e-6


def test_control_memo_resolve():
    from medvlm.core.backend import ControlMemo

    memo, calls = ControlMemo(limit=3), []

    def compute(idx):
        calls.append(list(idx))
        return [0.1 * (i + 1) for i in idx]

    got = memo.resolve("blank", ("f32",), [[1, 2], [3], [1, 2], [4]], compute)
    assert calls == [[0, 1, 3]], "each unknown prompt once, at its first index"
    assert got.tolist() == [0.1, 0.2, 0.1, 0.4]
    assert memo.resolve("blank", ("f32",), [[3], [1, 2]], compute).tolist() == [0.2, 0.1] and len(calls) == 1
    memo.resolve("text_only", ("f32",), [[3]], compute)  # another control: another key
    assert calls[-1] == [0] and len(memo) == 1, "past the limit the memo starts over"
    assert (memo.computed, memo.reused) == (4, 3)
    with pytest.raises(RuntimeError, match="expected 1 P\\(yes\\) values, got 2"):
        memo.resolve("blank", ("bf16",), [[9]], lambda idx: [0.5, 0.5])

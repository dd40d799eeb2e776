"""What both backends accept (issue #12, items 10 and 11), on the tiny random models:

- an image as a PIL image of any mode, a numpy array or a path (PNG, TIFF, DICOM), made 8-bit
  RGB by the CLI's own loader rules (medvlm.data.images): a 16-bit ("I;16") or float ("F") image
  scores exactly as the 8-bit image load_image makes from the same file, never clipped;
- a bare string question is one question; mismatched findings and malformed items are
  refused with a message that says what to pass;
- LLaVARadMedical.tiny() exists like MedGemmaMedical.tiny(), and the README's Python example
  runs with the tiny models in place of the weights.
"""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from llava_rad_medical_only import LLaVARadMedical
from medgemma_enhanced import MedGemmaMedical
from medvlm.data.images import load_image

QUESTIONS = ["Is there a pleural effusion?", "Is there a pneumothorax?"]
BACKENDS = ("llava_rad", "medgemma")
_MADE: dict = {}


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request):
    if request.param not in _MADE:
        cls = LLaVARadMedical if request.param == "llava_rad" else MedGemmaMedical
        _MADE[request.param] = cls.tiny()
    return _MADE[request.param]


def _grayscale16() -> np.ndarray:
    """[200, 300] uint16 over most of the 16-bit range (a gradient plus noise): RGB conversion
    would clip almost every pixel to 255."""
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 50_000, 300)[None, :] + np.linspace(0, 10_000, 200)[:, None]
    return (ramp + rng.integers(0, 5_000, (200, 300))).astype(np.uint16)


@pytest.fixture(scope="module")
def png16(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "cxr16.png"
    Image.fromarray(_grayscale16()).save(path)
    with Image.open(path) as im:
        assert im.mode == "I;16"
    return path


@pytest.fixture(scope="module")
def tiff_float(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "cxr_float.tif"
    Image.fromarray(_grayscale16().astype(np.float32) / 1000.0 - 7.0, "F").save(path)
    with Image.open(path) as im:
        assert im.mode == "F"
    return path


def _assert_same_scores(got, want):
    assert [s.question for s in got] == [s.question for s in want]
    for a, b in zip(got, want, strict=True):
        assert a.p_yes == b.p_yes and a.coverage == b.coverage
        np.testing.assert_array_equal(a.attention, b.attention)
        np.testing.assert_array_equal(a.image_mass, b.image_mass)


def test_sixteen_bit_pil_image_scores_as_the_cli_loader_makes_it(backend, png16):
    """MedGemma turned an I;16 image into RGB by clipping (almost all pixels 255) and
    returned a normal-looking result; LLaVA-Rad refused it. Both now score it as the CLI does."""
    want = backend.score(load_image(png16).image, QUESTIONS)
    with Image.open(png16) as im:
        got = backend.score(im, QUESTIONS)
        clipped = backend.score(im.convert("RGB"), QUESTIONS)
    _assert_same_scores(got, want)
    assert any(abs(a.p_yes - b.p_yes) > 1e-6 for a, b in zip(clipped, want, strict=True)), (
        "the clipped image scores like the windowed one: the test image does not tell them apart"
    )


def test_float_pil_image_scores_as_the_cli_loader_makes_it(backend, tiff_float):
    want = backend.score(load_image(tiff_float).image, QUESTIONS)
    with Image.open(tiff_float) as im:
        got = backend.score(im, QUESTIONS)
    _assert_same_scores(got, want)


@pytest.mark.parametrize("kind", ["str", "Path"])
def test_image_path_is_loaded_by_the_cli_loader(backend, png16, kind):
    want = backend.score(load_image(png16).image, QUESTIONS)
    _assert_same_scores(backend.score(str(png16) if kind == "str" else png16, QUESTIONS), want)


def test_dicom_path_is_windowed_as_the_cli_does(backend):
    from medvlm.data.demo_data import pydicom_data_file

    path = pydicom_data_file("693_UNCI.dcm")  # CT, rescale slope/intercept + window 40/100
    loaded = load_image(path)
    assert any("window center 40" in n for n in loaded.notes)
    _assert_same_scores(backend.score(path, QUESTIONS[:1]), backend.score(loaded.image, QUESTIONS[:1]))


def test_numpy_arrays(backend, png16):
    arr16 = _grayscale16()
    want16 = backend.score(load_image(png16).image, QUESTIONS[:1])
    _assert_same_scores(backend.score(arr16, QUESTIONS[:1]), want16)
    rgb = np.asarray(load_image(png16).image)
    _assert_same_scores(backend.score(rgb, QUESTIONS[:1]), want16)
    gray8 = (arr16 >> 8).astype(np.uint8)
    _assert_same_scores(backend.score(gray8, QUESTIONS[:1]), backend.score(Image.fromarray(gray8), QUESTIONS[:1]))


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((20, 30, 4), np.uint8),
        np.zeros((20, 30, 3), np.float32),
        np.zeros((20, 30), bool),
        np.zeros(30, np.uint8),
        np.zeros((0, 30), np.uint16),
    ],
    ids=["rgba", "float-rgb", "bool", "1-d", "empty"],
)
def test_unsupported_arrays_are_refused_saying_what_to_pass(backend, array):
    with pytest.raises(ValueError, match=r"is empty|pass a 2-D \[H, W\] grayscale array"):
        backend.score(array, QUESTIONS[:1])


def test_other_image_types_are_refused(backend):
    with pytest.raises(ValueError, match=r"\.numpy\(\)"):
        backend.score(torch.zeros(3, 20, 30, dtype=torch.uint8), QUESTIONS[:1])
    with pytest.raises(ValueError, match="a PIL image or a numpy array"):
        backend.score([[0, 1], [2, 3]], QUESTIONS[:1])


def test_preprocess_takes_the_same_images(backend, png16):
    with Image.open(png16) as im:
        got = backend.preprocess(im)
    assert torch.equal(got, backend.preprocess(load_image(png16).image))


def test_bare_string_question_is_one_question(backend, rgb_image):
    got = backend.score(rgb_image, QUESTIONS[0])
    assert len(got) == 1 and got[0].question == QUESTIONS[0]
    _assert_same_scores(got, backend.score(rgb_image, [QUESTIONS[0]]))
    # one finding for one question: a bare string too
    one = backend.score(rgb_image, QUESTIONS[0], "pleural effusion")
    _assert_same_scores(one, got)


def test_mismatched_findings_name_both_numbers(backend, rgb_image):
    """A bare string finding is one finding (it was counted as its characters: "expected 2
    findings, found 16")."""
    with pytest.raises(ValueError, match="2 questions but 1 findings: pass one finding per question"):
        backend.score(rgb_image, QUESTIONS, "pleural effusion")
    with pytest.raises(ValueError, match="1 questions but 2 findings"):
        backend.score(rgb_image, QUESTIONS[0], ["pleural effusion", "pneumothorax"])


@pytest.mark.parametrize(
    "items, message",
    [
        ("x", "list of \\(image, questions, findings\\) tuples"),
        ([("img", QUESTIONS)], "expected a tuple \\(image, questions, findings or None\\), got tuple of length 2"),
        ([("img", [], None)], "non-empty list of question strings"),
        ([("img", [QUESTIONS[0], 3], None)], "questions must be strings, found int"),
    ],
)
def test_malformed_items_are_refused_saying_what_to_pass(backend, items, message):
    with pytest.raises(ValueError, match=message):
        backend.score_many(items)


def test_score_many_mixes_input_kinds(backend, png16, rgb_image):
    """One pass over a 16-bit path, a uint16 array and an RGB image equals each study alone."""
    items = [(png16, QUESTIONS[0], None), (_grayscale16(), QUESTIONS, None), (rgb_image, QUESTIONS[1:], None)]
    together = backend.score_many(items)
    for (image, questions, _), got in zip(items, together, strict=True):
        alone = backend.score(image, questions)
        assert [s.question for s in got] == [s.question for s in alone]
        for a, b in zip(got, alone, strict=True):
            assert abs(a.p_yes - b.p_yes) <= 1e-5
            np.testing.assert_allclose(a.attention, b.attention, atol=1e-6)


def _readme_python_example() -> str:
    """The first python block under README's "## Python use"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python use", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, "README's Python use section has no python block"
    return blocks[0]


def test_readme_python_example_runs_on_the_tiny_models(tmp_path, monkeypatch):
    """README's example, verbatim, with the tiny random checkpoints standing in for the
    weights: load_model() loads what LLaVARadMedical.tiny() loads, load_medgemma() returns
    MedGemmaMedical.tiny()'s model and processor; its image is a 16-bit PNG."""
    import medgemma_enhanced
    from medvlm.core.tiny_llava_rad import write_tiny_llava_rad

    load_model = LLaVARadMedical.load_model

    def tiny_load_model(self, *args, **kwargs):
        return load_model(self, *write_tiny_llava_rad(tmp_path / "llava_rad"), device="cpu")

    def tiny_load_medgemma(*args, **kwargs):
        tiny = MedGemmaMedical.tiny()
        return tiny.model, tiny.processor

    monkeypatch.setattr(LLaVARadMedical, "load_model", tiny_load_model)
    monkeypatch.setattr(medgemma_enhanced, "load_medgemma", tiny_load_medgemma)
    Image.fromarray(_grayscale16()).save(tmp_path / "cxr.png")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_readme_python_example(), "README.md", "exec"), {"__name__": "readme_example"})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("llava_rad ") and lines[0].endswith("(3, 1369)")
    assert lines[1].startswith("medgemma ") and lines[1].endswith("(6, 256)")


# The README example in its weight-free form (what README's "Python use" should show beside
# the weights version; the lead's file, so kept here verbatim and run).
README_TINY_EXAMPLE = '''
from llava_rad_medical_only import LLaVARadMedical, MedicalAttentionConfig
from medgemma_enhanced import MedGemmaMedical

config = MedicalAttentionConfig(colormap="hot", attention_head_mode="mean")
llava_medical = LLaVARadMedical.tiny(config)    # tiny random weights: same interface, meaningless output
medgemma = MedGemmaMedical.tiny(config)

for backend in (llava_medical, medgemma):
    s = backend.score("cxr.png", "Is there a pleural effusion?")[0]
    print(backend.name, s.answer, s.p_yes, s.attention.shape, backend.describe()["random_weights"])
'''


def test_weight_free_example_runs(tmp_path, monkeypatch):
    Image.fromarray(_grayscale16()).save(tmp_path / "cxr.png")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(README_TINY_EXAMPLE, "README_TINY_EXAMPLE", "exec"), {"__name__": "readme_tiny"})
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["llava_rad", "medgemma"]
    assert all(line.endswith("True") for line in lines)


def test_pending_scores_wait_for_their_copies_then_build_once():
    from medvlm.core.backend import PendingScores

    log = []

    class Event:
        def synchronize(self):
            log.append("waited")

    pending = PendingScores(lambda: log.append("built") or [["scores"]], Event())
    assert log == [], "nothing is waited for or built before result()"
    assert pending.result() == [["scores"]] and pending.result() == [["scores"]]
    assert log == ["waited", "built"], f"expected one wait, then one build: {log}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a model on the CPU")
def test_overlap_tower_refuses_a_tower_off_cuda_and_is_recorded(backend):
    """overlap_tower needs a second CUDA stream: on the CPU it says where the tower is, and the
    manifest's tower_stream stays false (tests/test_gpu.py checks the stream itself)."""
    with pytest.raises(ValueError, match=rf"--overlap_tower needs the vision tower on a CUDA device; model "
                                         rf"'{backend.name}' has it on cpu"):  # fmt: skip
        backend.overlap_tower()
    assert backend.tower_stream is None and backend.describe()["tower_stream"] is False
    backend.overlap_tower(False)  # turning it off is always allowed
    assert backend.tower_stream is None

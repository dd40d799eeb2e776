"""MedGemma's host half of a pass (prepare): the pixels it makes without the processor's
per-image call (medgemma_enhanced.resized_pixels) are the processor's own, bit for bit, on real
inputs, and the path is taken only where that was checked."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import medgemma_enhanced as mg
from medvlm.core.backend import VLMBackend
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.tiny_medgemma import tiny_medgemma
from medvlm.data.demo_data import pydicom_data_file
from medvlm.data.images import load_image

ROOT = Path(__file__).resolve().parents[1]
PARAPHRASES = ["Is there a pleural effusion?", "Does this chest X-ray show a pleural effusion?",
               "Is pleural effusion present in this image?"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_parts():
    return tiny_medgemma()


def real_images() -> list[Image.Image]:
    """What the CLI's loader gives a backend: an NIH radiograph (PNG), DICOMs (CR chest,
    CT with windowing, ultrasound in color), and radiograph-sized grayscale images of the
    benchmark's aspect ratios, made RGB as the loader makes them."""
    out = [load_image(ROOT / "data" / "nih-cxr14" / "00000001_000.png").image]
    out += [load_image(pydicom_data_file(n)).image for n in ("RG1_UNCI.dcm", "693_UNCI.dcm", "US1_UNCI.dcm")]
    rng = np.random.default_rng(0)
    for w, h in [(1024, 1024), (1200, 1000), (900, 1100), (61, 47)]:
        base = rng.integers(0, 255, size=(max(h // 8, 2), max(w // 8, 2)), dtype=np.uint8)
        out.append(Image.fromarray(base).resize((w, h), Image.BILINEAR).convert("RGB"))
    return out


def processor_pixels(ip, images) -> torch.Tensor:
    """The processor's own 8-bit output, one call per image."""
    return torch.cat([ip(im, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
                      for im in images])  # fmt: skip


def at_size(ip, side: int, **changes):
    out = copy.deepcopy(ip)
    out.size = type(ip.size)(height=side, width=side)
    for name, value in changes.items():
        setattr(out, name, value)
    return out


@pytest.mark.parametrize("kind", ["tiny", "medgemma-4b", "bicubic"])
def test_resized_pixels_are_the_processors_own_on_real_images(tiny_parts, kind):
    ip = tiny_parts[1].image_processor
    if kind == "medgemma-4b":  # the real model's 896 px square resize
        ip = at_size(ip, 896)
    elif kind == "bicubic":  # another resampling: the processor's own is followed, not assumed
        ip = at_size(ip, 96, resample=Image.BICUBIC)
    imgs = real_images()
    if kind == "medgemma-4b":
        imgs.append(Image.fromarray(np.full((896, 896, 3), 7, np.uint8)))  # already the target size
    assert mg.resizes_like_processor(ip)
    got = mg.resized_pixels(ip, imgs)
    ref = processor_pixels(ip, imgs)
    assert got.dtype == ref.dtype == torch.uint8 and got.shape == ref.shape and got.is_contiguous()
    assert torch.equal(got, ref)


class Off:
    """An image processor seen through a wrapper; `shift` changes its 8-bit output by one level."""

    def __init__(self, ip, shift=False):
        self._ip, self._shift = ip, shift

    def __call__(self, *args, **kwargs):
        out = self._ip(*args, **kwargs)
        if self._shift and not kwargs.get("do_normalize", True):
            out["pixel_values"] = out["pixel_values"] ^ 1
        return out

    def __getattr__(self, name):
        return getattr(self._ip, name)


def test_the_direct_path_is_taken_only_where_it_was_checked(tiny_parts):
    ip = tiny_parts[1].image_processor
    assert mg.resizes_like_processor(Off(ip)), "the wrapper itself must not change the verdict"
    assert not mg.resizes_like_processor(Off(ip, shift=True)), "a processor whose resize differs"
    for changes in ({"do_pan_and_scan": True}, {"do_center_crop": True}, {"do_resize": False}):
        assert not mg.resizes_like_processor(at_size(ip, 128, **changes)), changes
    assert not mg.resizes_like_processor(at_size(ip, 128, size=type(ip.size)(height=128, width=96)))


def test_pixel_values_and_prepare_equal_the_processor_path(tiny_parts):
    """The backend's pixels equal preprocess() per image and the earlier path (one processor call
    per image, in threads); a pass prepared twice (caches warm) is the same pass."""
    backend = mg.MedGemmaMedical(*tiny_parts, MedicalAttentionConfig(controls=("text_only", "blank")))
    assert backend._direct_resize
    imgs = real_images()
    ref = VLMBackend.pixel_values(backend, imgs)
    assert torch.equal(backend.pixel_values(imgs), ref)
    assert torch.equal(backend.pixel_values(imgs), torch.stack([backend.preprocess(im) for im in imgs]))
    items = [(im, PARAPHRASES, None) for im in imgs[:4]]
    first, again = backend.prepare(items), backend.prepare(items)
    assert torch.equal(first["pixel_values"], ref[:4]) and torch.equal(again["pixel_values"], ref[:4])
    for key in ("suffixes", "queries", "rows", "owners", "text_only_ids", "blank"):
        assert first[key] == again[key], key
    assert [e["prompt"] for e in first["entries"]] == [e["prompt"] for e in again["entries"]]

    backend._direct_resize = False  # the processor path: the same prepared pass
    other = backend.prepare(items)
    assert torch.equal(other["pixel_values"], first["pixel_values"])


def test_a_processor_that_differs_keeps_the_processor_path(tiny_parts):
    model, processor = tiny_parts
    shifted = copy.copy(processor)
    shifted.image_processor = Off(processor.image_processor, shift=True)
    backend = mg.MedGemmaMedical(model, shifted, MedicalAttentionConfig())
    assert not backend._direct_resize
    imgs = real_images()[:3]
    assert torch.equal(backend.pixel_values(imgs), torch.stack([backend.preprocess(im) for im in imgs]))


def test_resized_pixels_refuses_what_is_not_8_bit_rgb(tiny_parts):
    with pytest.raises(ValueError, match="8-bit RGB"):
        mg.resized_pixels(tiny_parts[1].image_processor, [Image.new("L", (20, 20))])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_a_gpu_pass_is_prepared_in_pinned_memory():
    backend = mg.MedGemmaMedical.tiny(device="cuda")
    imgs = real_images()[:3]
    prep = backend.prepare([(im, PARAPHRASES, None) for im in imgs])
    assert prep["pixel_values"].is_pinned()
    assert torch.equal(prep["pixel_values"], VLMBackend.pixel_values(backend, imgs))

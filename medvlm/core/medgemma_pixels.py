"""MedGemma's pixels: the processor's work split at its last step (the 8-bit resize on the
host, its own rescale_and_normalize on the device) and its resize run directly on each image,
each used only where a probe shows it bit-identical to the processor's own output. Used by
medgemma_enhanced's prepare() and passes, medvlm.core.attribution and the faithfulness passes;
the names are importable from medgemma_enhanced too.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


def normalizes_on_device(image_processor, device=None) -> bool:
    """Whether the processor's work can be split at its last step: resize (and the rest) on
    the host, with rescale_and_normalize skipped so the pixels stay 8-bit, then the
    processor's own rescale_and_normalize run on the device. That halves the host's share
    of each image (the float pass and the float copies) and the bytes sent. Only when the
    split is exact: checked once on a probe image, run on `device` (the model's), against the
    processor's own output on the host, bit for bit."""
    if not callable(getattr(image_processor, "rescale_and_normalize", None)):
        return False
    rng = torch.Generator().manual_seed(0)
    probe = Image.fromarray(torch.randint(0, 256, (37, 29, 3), dtype=torch.uint8, generator=rng).numpy())
    try:
        full = image_processor(probe, return_tensors="pt")["pixel_values"]
        raw = image_processor(probe, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
        if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
            return False
        return torch.equal(normalize_pixels(image_processor, raw.to(device)).cpu(), full)
    except (TypeError, ValueError, AttributeError, RuntimeError):  # an option it lacks, a device it fails on
        return False


def normalize_pixels(image_processor, pixels: torch.Tensor) -> torch.Tensor:
    """[K, 3, S, S] uint8 (resized by the processor) -> float32, by the processor's own
    rescale_and_normalize, on whatever device the pixels are."""
    ip = image_processor
    return ip.rescale_and_normalize(pixels, ip.do_rescale, ip.rescale_factor, ip.do_normalize,
                                    tuple(ip.image_mean), tuple(ip.image_std))  # fmt: skip


def preprocessing_off(processor) -> dict:
    """apply_chat_template's keywords that turn the image processor's resize, rescale and
    normalisation off, as this transformers takes them (a processor_kwargs dict where it has
    one, else its own keywords)."""
    off = {"do_resize": False, "do_rescale": False, "do_normalize": False}
    params = inspect.signature(processor.apply_chat_template).parameters
    return {"processor_kwargs": off} if "processor_kwargs" in params else off


def _probe_images(size: int) -> list[Image.Image]:
    """Random RGB images around a square target of side `size`: enlarged, reduced, the target
    itself, one side up and one down, and a very thin one."""
    rng = np.random.default_rng(0)
    shapes = [(37, 29), (2 * size + 3, size + size // 2 + 1), (size, size), (size + 1, size - 3), (9, 3 * size + 2)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]


def resizes_like_processor(image_processor) -> bool:
    """Whether resized_pixels (below) gives the processor's own 8-bit pixels (its call with
    rescale and normalise off) bit for bit. Only for the processor this backend relies on: a
    resize to one fixed square and nothing else (no pan-and-scan, crop or pad), 8-bit output;
    then checked once on probe images of several sizes (enlarged, reduced, unchanged)."""
    ip = image_processor
    size = getattr(ip, "size", None)
    h, w = getattr(size, "height", None), getattr(size, "width", None)
    if not (h and w and h == w) or not getattr(ip, "do_resize", False) or not callable(getattr(ip, "resize", None)):
        return False
    if any(getattr(ip, name, False) for name in ("do_pan_and_scan", "do_center_crop", "do_pad")):
        return False
    try:
        for probe in _probe_images(int(h)):
            ref = ip(probe, do_rescale=False, do_normalize=False, return_tensors="pt")["pixel_values"]
            if not isinstance(ref, torch.Tensor) or ref.dtype != torch.uint8:
                return False
            if not torch.equal(resized_pixels(ip, [probe]), ref):
                return False
    except (TypeError, ValueError, AttributeError, RuntimeError):  # an option or a layout it does not take
        return False
    return True


def resized_pixels(image_processor, images: Sequence[Image.Image], pin: bool = False) -> torch.Tensor:
    """[K, 3, S, S] uint8: the processor's own resize (ip.resize, the function its call runs,
    with its size and resampling) on each 8-bit RGB image, written into one tensor (pinned
    memory when `pin`). Cheaper than K processor calls for the thread that prepares a pass
    while another launches the GPU's work: the image goes to the resize as a channels-last
    view of its pixels (no channels-first copy; the same values, checked by
    resizes_like_processor), without the call's per-image argument handling, and the
    resize itself releases the interpreter lock; what holds it per image is Pillow's
    export of the pixels (Image.tobytes, through numpy) and a few short calls."""
    ip = image_processor
    side = (int(ip.size.height), int(ip.size.width))
    out = torch.empty((len(images), 3, *side), dtype=torch.uint8, pin_memory=pin)
    for k, image in enumerate(images):
        if image.mode != "RGB":
            raise ValueError(f"expected an 8-bit RGB image, got mode {image.mode!r}")
        # [H, W, 3]: np.asarray takes Pillow's bytes (np.array(image) is several times slower), the copy
        # makes them writable (torch warns on a read-only array)
        hwc = torch.from_numpy(np.asarray(image).copy())
        out[k] = ip.resize(image=hwc.permute(2, 0, 1)[None], size=ip.size, resample=ip.resample)[0]
    return out

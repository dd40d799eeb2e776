"""LLaVA-Rad's prompt and pixels, as the official code makes them (without importing it):
the conv_vicuna_v1 template (llava/conversation.py; scripts/eval.sh uses conv_mode "v1"),
tokenizer_image_token's split at the image placeholder (llava/mm_utils.py), and open_clip's
eval transform (shortest side to the size, bicubic; center crop; CLIP mean and std).

Used by llava_rad_medical_only.LLaVARadMedical (which re-exports these names) and by the
references in archive/.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip OPENAI_DATASET_STD

# conv_vicuna_v1 (llava/conversation.py; scripts/eval.sh uses conv_mode "v1"): SeparatorStyle.TWO
SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"
IMAGE_PLACEHOLDER = "<image>"
IMAGE_TOKEN_INDEX = -200  # llava.constants.IMAGE_TOKEN_INDEX


def build_prompt(question_text: str, with_image: bool = True) -> str:
    """conv_vicuna_v1 with one user turn and an open assistant turn, as model_mimic_cxr.py
    builds it: "<system> USER: <image>\\n<question> ASSISTANT:" (image placeholder symbolic);
    with_image False: the same turn without "<image>\\n" (the text-only control)."""
    q = question_text.replace(IMAGE_PLACEHOLDER, "").strip()
    image = f"{IMAGE_PLACEHOLDER}\n" if with_image else ""
    return f"{SYSTEM_PROMPT}{SEP}{ROLES[0]}: {image}{q}{SEP}{ROLES[1]}:"


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision Resize(int): the shorter side becomes size, the longer int(size * long / short)."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def preprocess_image(image: Image.Image, size: int, mean, std) -> torch.Tensor:
    """open_clip's eval transform (Resize(size, bicubic), CenterCrop(size), ToTensor, Normalize)
    on the RGB image, written with PIL: [3, size, size] float32."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        raise ValueError(
            f"image mode {image.mode!r} is not 8-bit: make it 8-bit RGB first with medvlm.data.images.as_rgb8 "
            "(what LLaVARadMedical.preprocess and score do); RGB conversion would clip it"
        )
    img = image.convert("RGB")  # model_mimic_cxr.py: Image.open(...).convert("RGB")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ValueError(f"empty image {w} x {h}")
    nw, nh = _resized_size(w, h, size)
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class PromptTokens:
    """One prompt split at the image placeholder, as tokenizer_image_token splits it.

    prefix_ids      tokens before the placeholder (BOS + system + "USER: ")
    suffix_ids      tokens after it (the first chunk's BOS dropped, as the official code does)
    suffix_offsets  character offsets of suffix_ids in suffix_text (None without a fast tokenizer)
    suffix_text     the text after "<image>"
    prompt          the full prompt with "<image>" symbolic
    """

    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    suffix_offsets: tuple[tuple[int, int], ...] | None
    suffix_text: str
    prompt: str

    @property
    def placeholder_index(self) -> int:
        return len(self.prefix_ids)

    def input_ids(self) -> list[int]:
        """Pre-splice ids with the -200 placeholder, as the official tokenizer_image_token returns."""
        return [*self.prefix_ids, IMAGE_TOKEN_INDEX, *self.suffix_ids]


def tokenize_prompt(tokenizer, prompt: str, with_offsets: bool = True) -> PromptTokens:
    """tokenizer_image_token for a prompt with one "<image>": each chunk tokenised with the
    tokenizer's specials (BOS); if the first chunk starts with BOS, the first token of every
    later chunk is dropped."""
    chunks = prompt.split(IMAGE_PLACEHOLDER)
    if len(chunks) != 2:
        raise ValueError(f"the prompt must hold exactly one {IMAGE_PLACEHOLDER}, found {len(chunks) - 1}")
    first = tokenizer(chunks[0]).input_ids
    offset = 1 if first and first[0] == tokenizer.bos_token_id else 0
    if with_offsets:
        enc = tokenizer(chunks[1], return_offsets_mapping=True)
        offsets = tuple(tuple(int(v) for v in o) for o in enc["offset_mapping"][offset:])
    else:
        enc, offsets = tokenizer(chunks[1]), None
    return PromptTokens(tuple(first), tuple(enc["input_ids"][offset:]), offsets, chunks[1], prompt)

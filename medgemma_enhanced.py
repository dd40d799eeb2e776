"""MedGemma backend: google/medgemma-4b-it (Gemma3ForConditionalGeneration) with exact
question-to-image attention at SDPA's cost.

    from medgemma_enhanced import load_medgemma, MedGemmaMedical
    model, processor = load_medgemma()                      # google/medgemma-4b-it, bf16
    backend = MedGemmaMedical(model, processor)
    scores = backend.score(image, ["Is there a pleural effusion?"])
    scores[0].p_yes, scores[0].attention.shape              # float, (34, 256)

    # without weights: the tiny random-weight copy of the architecture
    backend = MedGemmaMedical.tiny()

Model facts (checked against the loaded config and processor by check_medgemma_facts):
SigLIP at 896 px, patch 14 -> 64 x 64 patches, average-pooled 4 x 4 -> 256 image tokens in
a row-major 16 x 16 grid (token j is cell (j // 16, j % 16)); the processor squashes the
image to a square without cropping; image soft tokens (config.image_token_id) sit between
<start_of_image> and <end_of_image>; 34 text layers, 8 query heads over 4 KV heads.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from medvlm.core.aggregate import resolve_layers
from medvlm.core.backend import GENERIC, PendingScores, QuestionScore, VLMBackend, question_scores
from medvlm.core.capture import attention_modules_of
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.engine import on_stream, score_packed, score_shared_prefix, to_device, to_host
from medvlm.core.fused_norms import fused_rms_norms, norm_modules
from medvlm.core.geometry import Geometry, square_resize_geometry
from medvlm.core.medgemma_pixels import (  # noqa: F401 - the pixel helpers, importable from here
    _probe_images,
    normalize_pixels,
    normalizes_on_device,
    preprocessing_off,
    resized_pixels,
    resizes_like_processor,
)
from medvlm.core.queries import suffix_query_positions
from medvlm.core.scoring import resolve_answer_tokens
from medvlm.core.siglip_fast import (  # noqa: F401 - the SigLIP fast path, importable from here
    _EPILOGUE_IS_TANH,
    GELU_TANH_ACTS,
    _fused_gelu_mlp,
    epilogue_gelu_is_tanh,
    siglip_fast_path,
)

DEFAULT_MODEL_ID = "google/medgemma-4b-it"
MIN_TRANSFORMERS = "4.55"

# The real model's facts (google/medgemma-4b-it); derived facts are checked for any Gemma3.
MM_TOKENS_PER_IMAGE = 256
GRID = (16, 16)
IMAGE_SIZE = 896
PATCH_SIZE = 14
NUM_TEXT_LAYERS = 34
TURN_MARKERS = ("<start_of_turn>user", "<start_of_turn>model")

QUANTIZATION = (None, "4bit", "8bit")


class FactError(ValueError):
    """A fact the code relies on does not hold for the loaded model or processor."""


@dataclass(frozen=True)
class MedGemmaFacts:
    """What check_medgemma_facts verified, for the manifest."""

    mm_tokens_per_image: int
    grid: tuple[int, int]
    image_size: int
    patch_size: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    layer_types: tuple[str, ...]
    sliding_window: int | None


#: the chat's image when the prompt's ids are checked against the processor (ids do not depend on it)
CHECK_IMAGE = Image.new("RGB", (8, 8), (128, 128, 128))


def check_medgemma_facts(model, processor, model_id: str = "") -> MedGemmaFacts:
    """Compare the facts the code relies on with the loaded config and processor.

    Raises FactError naming the fact, what was expected and what was found.
    """
    cfg = model.config
    text, vision = cfg.get_text_config(), cfg.vision_config
    tok = processor.tokenizer

    def need(ok: bool, fact: str, expected, found):
        if not ok:
            raise FactError(f"MedGemma fact does not hold: {fact}: expected {expected}, found {found}")

    n_img = int(cfg.mm_tokens_per_image)
    side = math.isqrt(n_img)
    need(side * side == n_img, "mm_tokens_per_image is a square grid", "a square number", n_img)
    patches = vision.image_size // vision.patch_size
    need(vision.image_size % vision.patch_size == 0, "image_size divisible by patch_size",
         f"{vision.image_size} % {vision.patch_size} == 0", vision.image_size % vision.patch_size)
    need(patches % side == 0, "patch grid pools evenly into the token grid",
         f"{patches} divisible by {side}", patches % side)
    need(getattr(processor, "image_seq_length", None) == n_img, "processor.image_seq_length",
         n_img, getattr(processor, "image_seq_length", None))
    need(tok.convert_tokens_to_ids(tok.image_token) == cfg.image_token_id, "image soft token id",
         cfg.image_token_id, tok.convert_tokens_to_ids(tok.image_token))
    need(tok.convert_tokens_to_ids(tok.boi_token) == cfg.boi_token_id, "<start_of_image> id",
         cfg.boi_token_id, tok.convert_tokens_to_ids(tok.boi_token))
    need(tok.convert_tokens_to_ids(tok.eoi_token) == cfg.eoi_token_id, "<end_of_image> id",
         cfg.eoi_token_id, tok.convert_tokens_to_ids(tok.eoi_token))
    seq = processor.full_image_sequence
    need(seq.count(tok.image_token) == n_img, "image tokens in the processor's image sequence",
         n_img, seq.count(tok.image_token))
    ip = processor.image_processor
    size = ip.size if isinstance(ip.size, dict) else dict(ip.size)
    need(size.get("height") == vision.image_size and size.get("width") == vision.image_size,
         "image processor resizes to the vision tower's square input",
         f"{vision.image_size} x {vision.image_size}", size)
    need(not getattr(ip, "do_pan_and_scan", False), "pan-and-scan off (one crop per image)", False, True)
    need(not getattr(ip, "do_center_crop", False), "no center crop (square resize)", False, True)
    need(text.attn_logit_softcapping is None, "no attention logit softcapping", None,
         text.attn_logit_softcapping)
    need(text.num_attention_heads % text.num_key_value_heads == 0, "heads divisible by KV heads",
         f"{text.num_attention_heads} % {text.num_key_value_heads} == 0",
         text.num_attention_heads % text.num_key_value_heads)
    probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}]
    rendered = processor.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
    for marker in (*TURN_MARKERS, tok.boi_token):
        need(marker in rendered, f"chat template marker {marker!r}", "present", "absent")
    if "medgemma-4b" in (model_id or getattr(cfg, "_name_or_path", "")):
        real = {"mm_tokens_per_image": (n_img, MM_TOKENS_PER_IMAGE), "grid": ((side, side), GRID),
                "vision image_size": (vision.image_size, IMAGE_SIZE),
                "vision patch_size": (vision.patch_size, PATCH_SIZE),
                "text layers": (text.num_hidden_layers, NUM_TEXT_LAYERS)}  # fmt: skip
        for fact, (found, expected) in real.items():
            need(found == expected, f"medgemma-4b {fact}", expected, found)
    return MedGemmaFacts(
        mm_tokens_per_image=n_img,
        grid=(side, side),
        image_size=int(vision.image_size),
        patch_size=int(vision.patch_size),
        image_token_id=int(cfg.image_token_id),
        boi_token_id=int(cfg.boi_token_id),
        eoi_token_id=int(cfg.eoi_token_id),
        n_layers=int(text.num_hidden_layers),
        n_heads=int(text.num_attention_heads),
        n_kv_heads=int(text.num_key_value_heads),
        layer_types=tuple(getattr(text, "layer_types", ()) or ()),
        sliding_window=getattr(text, "sliding_window", None),
    )


def load_medgemma(
    model_id_or_path: str = DEFAULT_MODEL_ID,
    dtype: torch.dtype | str | None = None,
    quantization: str | None = None,
    device_map: str | dict | None = "auto",
):
    """Load MedGemma and its processor: returns (model, processor).

    dtype         default bfloat16 on CUDA (fp16 overflows in Gemma3), float32 on CPU
    quantization  None, "4bit" or "8bit" (bitsandbytes, CUDA only)
    device_map    passed to from_pretrained ("auto" places on the GPU when there is one)
    The gated hub model needs `huggingface-cli login` after accepting its terms.
    """
    from transformers import AutoProcessor, Gemma3ForConditionalGeneration

    if quantization not in QUANTIZATION:
        raise ValueError(f"unknown quantization {quantization!r}; valid: 4bit, 8bit or None")
    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if dtype == torch.float16:
        raise ValueError("MedGemma overflows in float16; use bfloat16 (or float32)")
    kwargs = {"attn_implementation": "sdpa", "device_map": device_map if cuda else None}
    if quantization:
        if not cuda:
            raise ValueError(f"{quantization} quantization needs a CUDA GPU (bitsandbytes)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4")
            if quantization == "4bit"
            else BitsAndBytesConfig(load_in_8bit=True)
        )
    try:
        model = Gemma3ForConditionalGeneration.from_pretrained(model_id_or_path, dtype=dtype, **kwargs)
        processor = AutoProcessor.from_pretrained(model_id_or_path)
    except OSError as e:
        raise OSError(
            f"could not load MedGemma from {model_id_or_path!r}: {e}\n"
            "For the gated hub model: accept its terms on Hugging Face and run `huggingface-cli login`; "
            "or pass a local folder holding config.json, the weights and the processor files."
        ) from e
    model.eval()
    check_medgemma_facts(model, processor, model_id_or_path)
    return model, processor


class MedGemmaMedical(VLMBackend):
    """Scores yes/no questions about one image and captures question-to-image attention."""

    name = "medgemma"
    # eight 6-question studies per pass: within 1.15 x the weights' memory on an H200 (benchmarks/)
    default_batch_size = 48

    def __init__(self, model, processor, config: MedicalAttentionConfig | None = None, model_id: str = ""):
        self.config = config or MedicalAttentionConfig()
        self.model = model
        self.processor = processor
        self.model_id = model_id or getattr(model.config, "_name_or_path", "")
        self.facts = check_medgemma_facts(model, processor, self.model_id)
        self.random_weights = bool(getattr(model.config, "random_weights", False))
        self.answer_tokens = resolve_answer_tokens(processor.tokenizer)
        self.layers = resolve_layers(self.config.layers, self.facts.n_layers)
        self._decoder = model.model.language_model
        self._attention = attention_modules_of(self._decoder)
        tower = model.model.vision_tower
        self._vision_model = getattr(tower, "vision_model", tower)
        self._norms = norm_modules(model.model)  # fused in eager passes (medvlm.core.fused_norms)
        self.keep_logits = False  # tests: keep each question's next-token logits in extra["logits"]
        self._prompt_cache: dict[str, dict] = {}
        self._normalize_on_device = normalizes_on_device(processor.image_processor, next(model.parameters()).device)
        # a pass's images resized in one call of resized_pixels (else one processor call per image, in threads)
        self._direct_resize = self._normalize_on_device and resizes_like_processor(processor.image_processor)
        self._check_kwargs = preprocessing_off(processor)  # the prompt check's stand-in image is not resized

    # -- construction ------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str = DEFAULT_MODEL_ID,
        config: MedicalAttentionConfig | None = None,
        dtype=None,
        quantization: str | None = None,
        device_map="auto",
    ) -> MedGemmaMedical:
        model, processor = load_medgemma(model_id_or_path, dtype, quantization, device_map)
        return cls(model, processor, config, model_id_or_path)

    @classmethod
    def tiny(cls, config: MedicalAttentionConfig | None = None, seed: int = 0, device=None) -> MedGemmaMedical:
        """The tiny random-weight copy of the architecture (tests, demo, timing)."""
        from medvlm.core.tiny_medgemma import tiny_medgemma

        model, processor = tiny_medgemma(seed=seed)
        if device is not None:
            model.to(device)
        return cls(model, processor, config, model_id="tiny-random-medgemma")

    # -- contract ------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self.facts.grid

    def geometry(self, width: int, height: int) -> Geometry:
        return square_resize_geometry(width, height, self.facts.image_size, self.facts.grid)

    def describe(self) -> dict:
        text = self.model.config.get_text_config()
        return {
            "name": self.name,
            "model_id": self.model_id,
            "revision": getattr(self.model.config, "_commit_hash", None),
            "dtype": str(next(self.model.parameters()).dtype),
            "attention_implementation": "sdpa + medvlm_rows exact row capture",
            "prompt_template": self.prompt_text("{question}"),
            "answer_suffix": self.config.answer_suffix,
            "query_mode": self.config.query_mode,
            "layers": list(self.layers),
            "head_mode": self.config.attention_head_mode,
            "grid": list(self.grid),
            "n_image_tokens": self.facts.mm_tokens_per_image,
            "sliding_window": getattr(text, "sliding_window", None),
            "answer_token_ids": {"yes": list(self.answer_tokens.yes_ids), "no": list(self.answer_tokens.no_ids)},
            "random_weights": self.random_weights,
            "controls": list(self.config.controls),
            "text_only_template": self.prompt_text("{question}", with_image=False) if self.config.controls else None,
            "generic_prompt": self.config.generic_prompt,
            "compiled": self.compiled,
            "fused_rms_norms": bool(self._norms) and not self.compiled,
            "pixel_normalization": "device" if self._normalize_on_device else "host",
            "siglip_gelu_epilogue": epilogue_gelu_is_tanh(self.vision_device()),
            "tower_stream": self.tower_stream is not None,
        }

    def vision_device(self) -> torch.device:
        return self._vision_model.embeddings.patch_embedding.weight.device

    def compile_regions(self) -> list[tuple[torch.nn.Module, bool | None]]:
        """The SigLIP encoder layers (a fixed token count per image) and each decoder layer's
        MLP and six RMSNorms (token counts vary per pass: dynamic)."""
        if getattr(self.model, "hf_quantizer", None) is not None:
            raise ValueError("compile is not supported with 8-/4-bit weights")
        regions = [(layer, None) for layer in self._vision_model.encoder.layers]
        for layer in self._decoder.layers:
            parts = [layer.mlp, layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                     layer.post_feedforward_layernorm, layer.self_attn.q_norm, layer.self_attn.k_norm]  # fmt: skip
            regions += [(m, True) for m in parts]
        return regions

    def unload(self) -> None:
        device = next(self.model.parameters()).device
        del self.model, self._decoder, self._attention, self._vision_model, self._norms
        self.tower_stream = None
        self.control_memo.clear()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # -- prompts -------------------------------------------------------------------------
    def _messages(self, question: str, image=None, raw: bool = False, with_image: bool = True) -> list[dict]:
        """The chat: the image (unless with_image is False: the text-only control), then the
        question with the answer suffix (raw: as given, for the generic prompt)."""
        text = question.strip() if raw else self.config.full_question(question)
        img = [{"type": "image", "image": image} if image is not None else {"type": "image"}] if with_image else []
        return [{"role": "user", "content": [*img, {"type": "text", "text": text}]}]

    def prompt_text(self, question: str, raw: bool = False, with_image: bool = True) -> str:
        """The chat prompt with the image left as <start_of_image> (for records)."""
        return self.processor.apply_chat_template(self._messages(question, raw=raw, with_image=with_image),
                                                  add_generation_prompt=True, tokenize=False)  # fmt: skip

    def text_only_ids(self, question: str) -> list[int]:
        """The text-only control's full prompt ids: the same chat without the image."""
        hit = self._prompt_cache.get(("text_only", question))
        if hit is None:
            enc = self.processor.apply_chat_template(self._messages(question, with_image=False),
                                                     add_generation_prompt=True, tokenize=True, return_dict=True,
                                                     return_tensors="pt")  # fmt: skip
            hit = enc["input_ids"][0].tolist()
            if self.facts.image_token_id in hit or self.facts.boi_token_id in hit:
                raise FactError("the text-only prompt holds an image token")
            self._prompt_cache[("text_only", question)] = hit
        return hit

    def _tokenize(self, question: str, raw: bool = False) -> tuple[list[int], list[tuple[int, int]], str]:
        """Full prompt ids with the image sequence expanded, their char offsets, and the text."""
        tok = self.processor.tokenizer
        text = self.prompt_text(question, raw)
        if text.count(tok.boi_token) != 1:
            raise FactError(f"expected one {tok.boi_token} in the prompt, found {text.count(tok.boi_token)}")
        text = text.replace(tok.boi_token, self.processor.full_image_sequence)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], text

    def _image_span(self, ids: Sequence[int]) -> tuple[int, int]:
        pos = [i for i, t in enumerate(ids) if t == self.facts.image_token_id]
        n = self.facts.mm_tokens_per_image
        if len(pos) != n:
            raise FactError(f"expected {n} image tokens, found {len(pos)}")
        if pos[-1] - pos[0] + 1 != n:
            raise FactError(f"image tokens are not contiguous (span {pos[0]}..{pos[-1]} for {n} tokens)")
        return pos[0], pos[0] + n

    # -- scoring -------------------------------------------------------------------------
    def _prompt(self, question: str, raw: bool = False) -> dict:
        """Everything about one question's prompt that does not depend on the image, cached
        by question text: ids (image sequence expanded), offsets, text, image span, prefix
        length and the question's suffix with its query positions (by finding). raw: the
        question without the answer suffix (the generic prompt)."""
        hit = self._prompt_cache.get((raw, question))
        if hit is not None:
            return hit
        ids, offsets, text = self._tokenize(question, raw)
        start, end = self._image_span(ids)
        if ids[end] != self.facts.eoi_token_id:
            raise FactError(f"expected <end_of_image> right after the image tokens, found id {ids[end]}")
        prefix_len = end + 1
        base = offsets[prefix_len][0]
        entry = {
            "ids": ids,
            "prefix": ids[:prefix_len],
            "suffix": ids[prefix_len:],
            "suffix_offsets": [(a - base, b - base) for a, b in offsets[prefix_len:]],
            "suffix_text": text[base:],
            "span": (start, end),
            "prefix_len": prefix_len,
            "prompt": self.prompt_text(question, raw),
            "raw": raw,
            "checked": False,
        }
        if len(self._prompt_cache) >= 4096:
            self._prompt_cache.clear()
        self._prompt_cache[(raw, question)] = entry
        return entry

    def _check_against_processor(self, entry: dict, question: str) -> None:
        """Once per question text: our ids and image-token types equal the processor's own
        tokenisation of the chat (as the model card runs it). The chat's image is a small grey
        stand-in, passed through unresized: with pan-and-scan off (check_medgemma_facts) the
        ids do not depend on the image, and preprocessing the study's own at 896 px cost a
        new question 15-50 ms of the preparing thread (every question of a pass, where each
        study asks its own)."""
        if entry["checked"]:
            return
        ref = self.processor.apply_chat_template(
            self._messages(question, CHECK_IMAGE, raw=entry["raw"]), add_generation_prompt=True, tokenize=True,
            return_dict=True, return_tensors="pt", **self._check_kwargs,
        )  # fmt: skip
        if ref["input_ids"][0].tolist() != entry["ids"]:
            raise FactError("the prompt's token ids differ from the processor's own tokenisation")
        mine = [int(t == self.facts.image_token_id) for t in entry["ids"]]
        if "token_type_ids" in ref and ref["token_type_ids"][0].tolist() != mine:
            raise FactError("the image token types differ from the processor's token_type_ids")
        entry["checked"] = True

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """[3, S, S]: the processor's own preprocessing of one image (made 8-bit RGB first by
        model_image: 16-bit and float images scaled, never clipped): float32, or uint8 with
        its last step (rescale and normalise) left to the device half of the pass
        (normalizes_on_device)."""
        image = self.model_image(image)
        if self._normalize_on_device:
            out = self.processor.image_processor(image, do_rescale=False, do_normalize=False, return_tensors="pt")
        else:
            out = self.processor.image_processor(image, return_tensors="pt")
        return out["pixel_values"][0]

    def pixel_values(self, images: Sequence[Image.Image], pin: bool | None = None) -> torch.Tensor:
        """[K, 3, S, S]: preprocess() on K images, equal bit for bit; in pinned memory when `pin`
        (None: when the model is on a GPU, so that the pass's copy to it is asynchronous). Where
        the split holds (8-bit pixels normalised on the device, and resized_pixels equal to the
        processor's own resize: resizes_like_processor), the K images are resized in one call of
        resized_pixels, in this thread; else by the processor, one call per image."""
        if pin is None:
            pin = next(self.model.parameters()).device.type == "cuda"
        if self._direct_resize:
            return resized_pixels(self.processor.image_processor, [self.model_image(im) for im in images], pin)
        pixels = super().pixel_values(images)
        return pixels.pin_memory() if pin else pixels

    def score(self, image, questions: Sequence[str] | str, findings: Sequence[str] | None = None):
        return self.score_many([(image, questions, findings)])[0]

    @torch.no_grad()
    def score_many(self, items: Sequence[tuple]) -> list[list[QuestionScore]]:
        """Several studies in one pass: items are (image, questions, findings or None).

        One forward for the whole pass: a batch row per study, its prefix (image included)
        followed by its questions packed one after another (medvlm.core.engine.score_packed).
        Returns one list of QuestionScore per item, in order.
        """
        return self.score_prepared(self.prepare(items))

    def prepare(self, items: Sequence[tuple]) -> dict:
        """The host-side half of score_many (prompts, checks, pixel values): a runner can
        prepare the next pass in a thread while the GPU runs this one."""
        items = self.checked_items(items)  # images 8-bit RGB by the CLI loader's rules, questions a list
        images, suffixes, queries, rows, entries, owners = [], [], [], [], [], []
        for k, (image, questions, findings) in enumerate(items):
            images.append(image)
            for i, q in enumerate(questions):
                e = self._prompt(q)
                self._check_against_processor(e, q)
                if entries and e["prefix"] != entries[0]["prefix"]:
                    raise FactError(f"question {q!r} does not share the image prefix of the first question")
                finding = findings[i] if findings is not None else None
                query_q = self.config.full_question(q) if self.config.query_mode == "answer" else q.strip()
                queries.append(suffix_query_positions(self.config.query_mode, e["suffix_offsets"], e["suffix_text"],
                                                      query_q, finding, len(e["suffix"])))  # fmt: skip
                suffixes.append(e["suffix"])
                rows.append(k)
                entries.append(e)
                owners.append((k, i))
            generic = self.config.generic_prompt
            if generic is not None:  # once per study, packed with its questions
                e = self._prompt(generic, raw=True)
                self._check_against_processor(e, generic)
                mode = "answer" if self.config.query_mode == "answer" else "question"
                queries.append(suffix_query_positions(mode, e["suffix_offsets"], e["suffix_text"], generic.strip(),
                                                      None, len(e["suffix"])))  # fmt: skip
                suffixes.append(e["suffix"])
                rows.append(k)
                entries.append(e)
                owners.append((k, GENERIC))
        pixel_values = self.pixel_values(images)  # pinned for a GPU model (as LLaVA-Rad)
        if next(self.model.parameters()).device.type == "cuda" and not pixel_values.is_pinned():
            pixel_values = pixel_values.pin_memory()  # one made elsewhere (a placeholder: medvlm.analysis.faithfulness)
        prep = {"items": items, "entries": entries, "suffixes": suffixes, "queries": queries, "rows": rows,
                "owners": owners, "pixel_values": pixel_values}  # fmt: skip
        return {**prep, **self.prepare_controls(items)}

    def score_prepared(self, prep: dict) -> list[list[QuestionScore]]:
        """The device-side half of score_many, on what prepare() returned."""
        return self.launch_prepared(prep).result()

    @torch.no_grad()
    def launch_prepared(self, prep: dict) -> PendingScores:
        """score_prepared's device work launched, its results queued to the host; read with
        .result() (VLMBackend.launch_prepared)."""
        items, entries, suffixes, queries = prep["items"], prep["entries"], prep["suffixes"], prep["queries"]
        rows, owners, pixel_values = prep["rows"], prep["owners"], prep["pixel_values"]
        device = next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        first = entries[0]
        prefix_len, (start, end) = first["prefix_len"], first["span"]
        n_img = len(items)
        prefix = to_device(torch.tensor([first["prefix"]]), device)  # [1, P]; no host sync
        embed = self.model.model.get_input_embeddings()  # Gemma3's scaled embedding

        def features(host_pixels):
            """image_embeddings, the projector's norm fused as the decoder's are, and checked."""
            with fused_rms_norms(() if self.compiled else self._norms):
                image = self.image_embeddings(host_pixels)
            if image.shape[1] != end - start:
                raise FactError(f"expected {end - start} image embeddings per image, found {image.shape[1]}")
            return image

        def forward_with(image):
            def forward(suffix_ids, position_ids, mask):
                # The image features go into their span directly: the model's own merge (given
                # input_ids and pixel_values) formats a device tensor into its check message,
                # a host sync that would hold the decoder's launches until the tower finished.
                with fused_rms_norms(() if self.compiled else self._norms):
                    parts = [embed(prefix[:, :start]), image, embed(prefix[:, end:]), embed(suffix_ids)]
                    embeds = torch.cat([p.expand(image.shape[0], -1, -1) for p in parts], dim=1)
                    return self._language(embeds, mask, position_ids)

            return forward

        image = on_stream(self.tower_stream, lambda: features(pixel_values))  # beside the previous pass's decoder
        out = score_packed(
            forward=forward_with(image),
            head=self._head,
            attention_modules=self._attention,
            config=self.model.config.get_text_config(),
            n_studies=n_img,
            prefix_len=prefix_len,
            suffixes=suffixes,
            query_positions=queries,
            prefix_rows=rows,
            pad_id=self.processor.tokenizer.pad_token_id,
            image_span=(start, end),
            layers=self.layers,
            head_mode=self.config.attention_head_mode,
            answer_tokens=self.answer_tokens,
            bidirectional_span=(start, end),
            device=device,
            decoder_layers=self._decoder.layers,  # the image tokens' norms entering each layer read
        )
        controls = self._controls(prep, lambda host_pixels: forward_with(features(host_pixels)), device, dtype,
                                  (start, end), prefix_len)  # fmt: skip
        generated = {}
        if self.config.generate:
            for k, (image, questions, _) in enumerate(items):
                for i, text in enumerate(self.generate(image, questions)):
                    generated[(k, i)] = text
        extras = [
            {"image_span": [start, end], "prefix_len": prefix_len, "query_positions": queries[r],
             "suffix_len": len(suffixes[r])}
            for r in range(len(owners))
        ]  # fmt: skip
        host, ready = to_host(out, self.keep_logits)  # queued now: read without waiting for the next pass
        texts = [generated.get(o) for o in owners]
        return PendingScores(lambda: question_scores(host, items, owners, [e["prompt"] for e in entries], texts, extras,
                                                     self.keep_logits, controls), ready)  # fmt: skip

    def _language(self, embeds: torch.Tensor, mask, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder over input embeddings [K, T, d] under a packed pass's masks -> hidden [K, T, d]."""
        return self.model.model(
            inputs_embeds=embeds,
            attention_mask=mask,  # {layer type: mask}: the image block's two-way attention included
            position_ids=position_ids,
            use_cache=False,
        ).last_hidden_state

    def _controls(self, prep: dict, forward_for, device, dtype, span, prefix_len) -> dict:
        """{control: P(yes) [n_questions] float64}: each control's prompts not yet in
        self.control_memo are scored in one extra single-row pass holding a shared prefix (the
        grey image's, or the template's text without the image) and those questions packed
        after it; logits only. The rest are read from the memo (a control names no study).
        forward_for: host pixels [1, 3, S, S] -> the pass's forward with that image."""
        owners, suffixes = prep["owners"], prep["suffixes"]
        questions = [r for r, (_, i) in enumerate(owners) if i != GENERIC]
        common = {"head": self._head, "attention_modules": self._attention,
                  "config": self.model.config.get_text_config(), "pad_id": self.processor.tokenizer.pad_token_id,
                  "head_mode": self.config.attention_head_mode, "answer_tokens": self.answer_tokens,
                  "device": device}  # fmt: skip
        memo, context = self.control_memo, (str(dtype),)
        out = {}
        if prep.get("blank"):
            sfx = [suffixes[r] for r in questions]

            def blank(idx):
                part = [sfx[i] for i in idx]
                return score_shared_prefix(forward=forward_for(self.blank_pixels()), prefix_len=prefix_len,
                                           suffixes=part, bidirectional_span=span, **common)  # fmt: skip

            prefix = list(prep["entries"][0]["prefix"])  # the image's placeholder ids included
            out["blank"] = memo.resolve("blank", context, [[*prefix, *x] for x in sfx], blank)
        if "text_only_ids" in prep:
            ids = prep["text_only_ids"]
            embed = self.model.model.get_input_embeddings()

            def text_only(idx):
                head, rests = self.split_common_prefix([ids[i] for i in idx])
                prefix = to_device(torch.tensor([head]), device)

                def forward_text(suffix_ids, position_ids, mask):
                    with fused_rms_norms(() if self.compiled else self._norms):
                        return self._language(torch.cat([embed(prefix), embed(suffix_ids)], dim=1), mask,
                                              position_ids)  # fmt: skip

                return score_shared_prefix(forward=forward_text, prefix_len=len(head), suffixes=rests, **common)

            out["text_only"] = memo.resolve("text_only", context, ids, text_only)
        return out

    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Host pixels [K, 3, S, S] as prepare() makes them (8-bit, normalised here on the
        device, or float) -> [K, 256, hidden] in the model dtype: image_features on the SigLIP
        fast path. Every device input is made here (medvlm.core.engine.on_stream)."""
        param = next(self.model.parameters())
        pixels = pixel_values.to(device=param.device, non_blocking=True)  # pinned on a GPU: no host wait
        if pixels.dtype == torch.uint8:
            pixels = normalize_pixels(self.processor.image_processor, pixels)
        with siglip_fast_path(self._vision_model):
            return self.image_features(pixels.to(param.dtype)).to(param.dtype)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[K, 3, S, S] -> [K, 256, hidden]: the vision tower and the projector (the model's
        get_image_features, which returns the tensor or, in newer transformers, an output
        whose pooler_output holds it)."""
        out = self.model.model.get_image_features(pixel_values)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def generate(self, image: Image.Image, questions: Sequence[str]) -> list[str]:
        """Greedy free-text answers, batched over the questions (left-padded, KV cached); the
        image and questions as score() takes them."""
        ((image, questions, _),) = self.checked_items([(image, questions, None)])
        tok = self.processor.tokenizer
        old_side = tok.padding_side
        tok.padding_side = "left"
        try:
            batch = self.processor.apply_chat_template(
                [self._messages(q, image) for q in questions], add_generation_prompt=True,
                tokenize=True, return_dict=True, return_tensors="pt", padding=True,
            )  # fmt: skip
        finally:
            tok.padding_side = old_side
        device = next(self.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(next(self.model.parameters()).dtype)
        out = self.model.generate(**batch, max_new_tokens=self.config.max_new_tokens, do_sample=False)
        new = out[:, batch["input_ids"].shape[1]:]
        return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]

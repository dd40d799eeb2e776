"""LLaVA-Rad backend: the official checkpoint (microsoft/llava-rad on lmsys/vicuna-7b-v1.5),
loaded natively on modern transformers, with exact question-to-image attention at SDPA's cost.

    from llava_rad_medical_only import LLaVARadMedical, MedicalAttentionConfig
    llava = LLaVARadMedical(config=MedicalAttentionConfig(colormap="hot", attention_head_mode="mean"))
    llava.load_model()                                   # microsoft/llava-rad + lmsys/vicuna-7b-v1.5
    scores = llava.score(image, ["Is there a pleural effusion?"])
    scores[0].p_yes, scores[0].attention.shape           # float, (32, 1369)

    llava = LLaVARadMedical.tiny()                       # without weights: tiny random copy (tests, demo)

The official llava package pins transformers 4.31 and cannot be imported beside a modern
transformers, so this module rebuilds the model from the checkpoint's files, following the
official code (llava/model/builder.py, llava_arch.py, open_clip_encoder, mm_utils.py,
conversation.py, eval/model_mimic_cxr.py) without importing it:

  language model  LlamaForCausalLM (attn "sdpa") from the Vicuna base with the LLaVA-Rad
                  config.json's Llama fields, LoRA merged W + (alpha / r) B A
  vision tower    timm vit_base_patch14_dinov2 (the trunk of BiomedCLIP-CXR 518) with
                  weights module.visual.trunk.* of biomedclipcxr_518_checkpoint.pt; features =
                  [embeddings, block 1, ..., block N][mm_vision_select_layer] (no final norm),
                  CLS dropped ("patch")
  projector       mlp2x_gelu: Linear(mm_hidden, hidden), GELU, Linear(hidden, hidden), from
                  non_lora_trainables.bin
  prompt          conv_vicuna_v1, tokenised as tokenizer_image_token does (chunks split on
                  "<image>", BOS only on the first); the placeholder at index p becomes 1369
                  image embeddings, so image tokens occupy [p, p + 1369) of the real sequence
  preprocessing   open_clip's eval transform: shortest side -> 518 (bicubic), center crop
                  518, CLIP mean/std

Scoring: one forward per pass, a batch row per image: the prefix (BOS + system text + image
embeddings) followed by all of that image's questions packed one after another, a block mask
keeping each question to the prefix and its own tokens (medvlm.core.engine.score_packed); P(yes)
and the exact attention rows of the chosen query tokens (medvlm.core.capture) come from that
forward. archive/reference_llava_rad.py is the slow
eager reference the tests compare against; archive/llava_rad_official_compare.py compares
with the official code on the real weights. Reading the checkpoint's files, the LoRA merge, the
projector's weights and the quantization live in medvlm/core/llava_rad_loading.py, the prompt
and the pixels in medvlm/core/llava_rad_processing.py (their names importable from here).
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from medvlm.core.aggregate import resolve_layers
from medvlm.core.backend import GENERIC, PendingScores, QuestionScore, VLMBackend, question_scores
from medvlm.core.capture import attention_modules_of
from medvlm.core.config import MedicalAttentionConfig
from medvlm.core.engine import (
    cache_kwargs,
    new_cache,
    on_stream,
    score_packed,
    score_shared_prefix,
    select_cache,
    to_device,
    to_host,
)
from medvlm.core.fused_norms import fused_rms_norms, norm_modules
from medvlm.core.geometry import Geometry, shortest_side_center_crop_geometry
from medvlm.core.llava_rad_loading import (  # noqa: F401 - the checkpoint layout and loaders, importable from here
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHT_NAMES,
    NON_LORA_NAME,
    RANDOM_WEIGHTS_MARKER,
    VISION_CHECKPOINT_NAME,
    VISION_CONFIG_NAME,
    LLaVARadLoadError,
    _fail,
    _find_file,
    _is_random,
    _load_tensors,
    _read_json,
    _require_bitsandbytes,
    _revision_of,
    load_non_lora,
    merge_lora,
    quantize_linear_layers,
    resolve_folder,
    state_mismatch,
)
from medvlm.core.llava_rad_processing import (  # noqa: F401 - the prompt and pixels, importable from here
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    ROLES,
    SEP,
    SEP2,
    SYSTEM_PROMPT,
    PromptTokens,
    _resized_size,
    build_prompt,
    preprocess_image,
    tokenize_prompt,
)
from medvlm.core.queries import suffix_query_positions
from medvlm.core.scoring import resolve_answer_tokens

__all__ = [
    "LLaVARadMedical",
    "MedicalAttentionConfig",
    "LLaVARadLoadError",
    "DEFAULT_MODEL_ID",
    "DEFAULT_BASE",
    "build_prompt",
]

# -- model facts (checked against the loaded files; a mismatch refuses to load) -----------
DEFAULT_MODEL_ID = "microsoft/llava-rad"
DEFAULT_BASE = "lmsys/vicuna-7b-v1.5"
IMAGE_SIZE = 518
PATCH = 14
GRID = (37, 37)
N_IMAGE_TOKENS = 1369
VISION_ARCH = "vit_base_patch14_dinov2"
VISION_SELECT_LAYER = -2
VISION_SELECT_FEATURE = "patch"
PROJECTOR = "mlp2x_gelu"
# the prompt template (conv_vicuna_v1) and the CLIP normalisation: medvlm/core/llava_rad_processing.py

ATTN_DESCRIPTION = "sdpa + medvlm_rows capture"
# config.json keys that belong to LLaVA, not to the Llama language model
_LLAVA_ONLY_KEYS = {
    "model_type", "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype",
    "use_mm_proj", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "image_aspect_ratio",
    "image_grid_pinpoints", "mm_vision_tower", "mm_vision_tower_config", "mm_vision_tower_checkpoint",
}  # fmt: skip


_DEFAULT_CONFIG = MedicalAttentionConfig()  # frozen: safe to share as the default


# -- the pieces -----------------------------------------------------------------------------
class LLaVARadVisionTower(torch.nn.Module):
    """The official VisionTower + feature_select: patch_embed -> _pos_embed -> norm_pre ->
    blocks, hidden states [embeddings, block 1, ..., block N]; returns hidden_states[select_layer]
    without the trunk's final norm, CLS dropped for "patch". Blocks after the selected one are
    not run (their output is discarded by the official code)."""

    def __init__(self, trunk: torch.nn.Module, select_layer: int, select_feature: str):
        super().__init__()
        self.trunk = trunk
        n = len(trunk.blocks)
        if not -(n + 1) <= select_layer <= n:
            raise ValueError(f"mm_vision_select_layer {select_layer} outside the {n + 1} hidden states")
        self.n_blocks = select_layer % (n + 1)  # blocks to run: hidden_states[k] is after k blocks
        self.select_feature = select_feature
        self.n_prefix = int(getattr(trunk, "num_prefix_tokens", 1))

    @property
    def hidden_size(self) -> int:
        return int(self.trunk.embed_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        t = self.trunk
        h = t.patch_embed(pixel_values)
        h = t._pos_embed(h)
        h = t.norm_pre(h)
        for block in t.blocks[: self.n_blocks]:
            h = block(h)
        if self.select_feature == "patch":
            return h[:, 1:]
        if self.select_feature == "cls_patch":
            return h
        raise ValueError(f"unexpected mm_vision_select_feature {self.select_feature!r}")


def build_projector(projector_type: str, mm_hidden: int, hidden: int) -> torch.nn.Sequential:
    """mlpNx_gelu as the official build_vision_projector builds it (module indices 0, 1, 2, ...)."""
    m = re.fullmatch(r"mlp(\d+)x_gelu", projector_type)
    if not m:
        raise ValueError(f"projector type {projector_type!r} is not supported (expected {PROJECTOR!r})")
    layers: list[torch.nn.Module] = [torch.nn.Linear(mm_hidden, hidden)]
    for _ in range(1, int(m.group(1))):
        layers += [torch.nn.GELU(), torch.nn.Linear(hidden, hidden)]
    return torch.nn.Sequential(*layers)


# -- the backend --------------------------------------------------------------------------------
class LLaVARadMedical(VLMBackend):
    """LLaVA-Rad (microsoft/llava-rad) behind the VLMBackend contract."""

    name = "llava_rad"
    # eight 6-question studies per pass: within 1.15 x the weights' memory on an H200 (benchmarks/)
    default_batch_size = 48

    def __init__(self, config: MedicalAttentionConfig = _DEFAULT_CONFIG):
        if not isinstance(config, MedicalAttentionConfig):
            raise TypeError(f"config must be a MedicalAttentionConfig, got {type(config).__name__}")
        self.config = config
        self.keep_logits = False  # True: QuestionScore.extra["logits"] holds the next-token logits
        self._token_cache: dict[tuple, PromptTokens | list[int]] = {}
        self.model = None
        self.tokenizer = None
        self.vision: LLaVARadVisionTower | None = None
        self.projector: torch.nn.Sequential | None = None
        self.image_size = IMAGE_SIZE
        self.patch = PATCH
        self._grid = GRID
        self.mean, self.std = CLIP_MEAN, CLIP_STD
        self.random_weights = False
        self.quantization: str | None = None
        self.load_report: dict = {}

    # -- loading ------------------------------------------------------------------------------
    def load_model(
        self,
        model_path: str = DEFAULT_MODEL_ID,
        model_base: str | None = DEFAULT_BASE,
        load_8bit: bool = False,
        load_4bit: bool = False,
        device=None,
        dtype=None,
    ) -> LLaVARadMedical:
        """Load the checkpoint (hub id or folder in the official layout) on the Vicuna base.

        device  default "cuda" when available, else "cpu"
        dtype   default float16 on CUDA (as the official loader), float32 on CPU
        Returns self. Raises LLaVARadLoadError naming the file for a missing or corrupt file
        or a contradicted fact.
        """
        if load_8bit and load_4bit:
            raise ValueError("choose one of load_8bit and load_4bit")
        quantization = "8bit" if load_8bit else "4bit" if load_4bit else None
        if quantization:
            _require_bitsandbytes()
        if model_base is None:
            raise ValueError(f"LLaVA-Rad is a LoRA checkpoint: pass model_base (the official base is {DEFAULT_BASE!r})")
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.float16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype.replace("torch.", ""))
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")

        model_dir = resolve_folder(model_path, base=False)
        base_dir = resolve_folder(model_base, base=True)
        cfg_path = model_dir / "config.json"
        cfg = _read_json(cfg_path)
        self._check_config_facts(cfg, cfg_path)

        # vision tower + projector (small; built on CPU in float32, moved below)
        vjson_path = _find_file(model_dir, cfg.get("mm_vision_tower_config"), VISION_CONFIG_NAME, "vision config")
        vckpt_path = _find_file(
            model_dir, cfg.get("mm_vision_tower_checkpoint"), VISION_CHECKPOINT_NAME, "vision checkpoint"
        )
        vision, vision_report, (mean, std) = self._build_vision(_read_json(vjson_path), vjson_path, vckpt_path, cfg)
        if int(cfg["mm_hidden_size"]) != vision.hidden_size:
            _fail(cfg_path, f"mm_hidden_size: config says {cfg['mm_hidden_size']}, the vision tower "
                            f"({vjson_path.name}) has embed dim {vision.hidden_size}")  # fmt: skip
        hidden = int(cfg["hidden_size"])
        projector = build_projector(cfg["mm_projector_type"], vision.hidden_size, hidden)

        # language model: the Vicuna weights with LLaVA-Rad's config (LlavaLlamaForCausalLM
        # .from_pretrained(model_base, config=lora_cfg_pretrained) in the official builder)
        llama_cfg = LlamaConfig(
            **{k: v for k, v in cfg.items() if k not in _LLAVA_ONLY_KEYS and not k.startswith("mm_")}
        )
        # quantized: load and merge on the host, quantize while moving to the device
        load_kwargs = {"device_map": {"": str(device)}} if device.type == "cuda" and not quantization else {}
        try:
            lm, info = LlamaForCausalLM.from_pretrained(
                str(base_dir), config=llama_cfg, dtype=dtype, attn_implementation="sdpa",
                output_loading_info=True, trust_remote_code=False, **load_kwargs,
            )  # fmt: skip
        except Exception as e:  # noqa: BLE001
            raise LLaVARadLoadError(f"{base_dir}: the base language model did not load: {type(e).__name__}: {e}") from e
        missing = sorted(info.get("missing_keys", []))
        mismatched = sorted(str(k) for k in info.get("mismatched_keys", []))
        unexpected = sorted(k for k in info.get("unexpected_keys", []) if not k.endswith("rotary_emb.inv_freq"))
        if missing or mismatched or unexpected:
            _fail(base_dir, f"base weights do not match config.json's Llama: missing {missing[:5]}, "
                            f"mismatched {mismatched[:5]}, unexpected {unexpected[:5]}")  # fmt: skip
        lm.eval().requires_grad_(False)
        if lm.model.embed_tokens.weight.shape[1] != hidden:
            _fail(cfg_path, f"hidden_size: config says {hidden}, the base has {lm.model.embed_tokens.weight.shape[1]}")

        non_lora_report = load_non_lora(model_dir / NON_LORA_NAME, projector, lm)
        lora_report = merge_lora(lm, model_dir)
        if quantization:
            lora_report["quantized_after_merge"] = quantize_linear_layers(lm.model, quantization, dtype)
            lm.to(device)

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir), trust_remote_code=False)
        except Exception as e:  # noqa: BLE001
            raise LLaVARadLoadError(f"{base_dir}: the tokenizer did not load: {type(e).__name__}: {e}") from e
        if not getattr(tokenizer, "is_fast", False) and self.config.query_mode != "answer":
            raise LLaVARadLoadError(
                f"{base_dir}: the tokenizer gives no character offsets, so query mode "
                f"{self.config.query_mode!r} cannot locate the question; use query_mode='answer'"
            )
        if tokenizer.bos_token_id is None:
            _fail(base_dir, "the tokenizer has no BOS token (Vicuna's adds <s>)")

        answer_tokens = resolve_answer_tokens(tokenizer)
        layers = resolve_layers(self.config.layers, int(lm.config.num_hidden_layers))
        attention = attention_modules_of(lm.model)
        probe = tokenize_prompt(tokenizer, build_prompt("?"), with_offsets=False)

        # everything checked: the backend takes the model
        self.model = lm
        self.quantization = quantization
        self.tokenizer = tokenizer
        self.vision = vision.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.projector = projector.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.mean, self.std = mean, std
        self.answer_tokens = answer_tokens
        self.n_layers = int(lm.config.num_hidden_layers)
        self.layers = layers
        self._attention = attention
        self._norms = norm_modules(lm.model)  # fused in eager passes (medvlm.core.fused_norms)
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.unk_token_id, 0) if i is not None)
        self.model_path, self.model_base = str(model_path), str(model_base)
        self.model_dir, self.base_dir = model_dir, base_dir
        self.random_weights = _is_random(model_dir) or _is_random(base_dir)
        self.placeholder_index = probe.placeholder_index
        self.load_report = {
            "vision": vision_report,
            "non_lora_trainables": non_lora_report,
            "lora": lora_report,
            "config": str(cfg_path),
            "vision_config": str(vjson_path),
            "vision_checkpoint": str(vckpt_path),
        }
        self._cfg = cfg
        return self

    @classmethod
    def tiny(
        cls, config: MedicalAttentionConfig | None = None, seed: int = 0, device=None, dtype=torch.float32
    ) -> LLaVARadMedical:
        """A loaded backend on a tiny random-weight LLaVA-Rad (the real architecture, geometry,
        prompt and preprocessing; small sizes), as MedGemmaMedical.tiny(): for tests, the demo
        and timing only; describe() says random_weights. The checkpoint is written in the
        official layout (medvlm.core.tiny_llava_rad.write_tiny_llava_rad) to a temporary folder,
        loaded through load_model, and the folder removed.

        config  MedicalAttentionConfig (default: the defaults)
        seed    the random weights' seed (the same seed, the same weights)
        device  default "cpu"; dtype default float32
        """
        import tempfile

        from medvlm.core.tiny_llava_rad import write_tiny_llava_rad

        backend = cls(config=config or _DEFAULT_CONFIG)
        with tempfile.TemporaryDirectory(prefix="tiny_llava_rad_") as folder:
            paths = write_tiny_llava_rad(folder, seed=seed)
            backend.load_model(*paths, device=device or "cpu", dtype=dtype)
        backend.model_path, backend.model_base = "tiny-random-llava-rad", "tiny-random-vicuna"
        backend.model_dir = backend.base_dir = None  # the folder is gone
        return backend

    def _check_config_facts(self, cfg: dict, path: Path) -> None:
        def need(key: str, expected, default=None):
            found = cfg.get(key, default)
            if found != expected:
                _fail(path, f"{key}: expected {expected!r} (LLaVA-Rad), found {found!r}")

        for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "mm_hidden_size"):
            if key not in cfg:
                _fail(path, f"{key} missing: not a LLaVA-Rad config.json")
        need("mm_vision_select_layer", VISION_SELECT_LAYER)
        need("mm_vision_select_feature", VISION_SELECT_FEATURE, "patch")  # official default "patch"
        need("mm_projector_type", PROJECTOR, "linear")  # official default "linear"
        # official default True: it would add an <im_patch> token and resize the embeddings
        need("mm_use_im_patch_token", False, True)
        need("mm_use_im_start_end", False, False)

    def _build_vision(self, vjson: dict, vjson_path: Path, ckpt_path: Path, cfg: dict):
        import timm

        vc = vjson.get("vision_cfg")
        if not isinstance(vc, dict) or "timm_model_name" not in vc:
            _fail(vjson_path, "no vision_cfg.timm_model_name: not an open_clip timm model config")
        arch = vc["timm_model_name"]
        if arch != VISION_ARCH:
            _fail(vjson_path, f"timm_model_name: expected {VISION_ARCH!r}, found {arch!r}")
        size = vc.get("image_size", IMAGE_SIZE)
        size = tuple(size) if isinstance(size, list | tuple) else (size, size)
        if size != (IMAGE_SIZE, IMAGE_SIZE):
            _fail(vjson_path, f"image_size: expected {IMAGE_SIZE}, found {vc.get('image_size')}")
        pre = vjson.get("preprocess_cfg", {}) or {}
        if pre.get("interpolation", "bicubic") != "bicubic" or pre.get("resize_mode", "shortest") != "shortest":
            _fail(vjson_path, f"preprocess_cfg {pre}: only bicubic shortest-side resize is implemented")
        mean = tuple(float(v) for v in pre.get("mean", CLIP_MEAN))
        std = tuple(float(v) for v in pre.get("std", CLIP_STD))
        kwargs = dict(vc.get("timm_model_kwargs", {}) or {})  # this project's extension (tiny models)
        if vc.get("timm_drop_path") is not None:
            kwargs["drop_path_rate"] = vc["timm_drop_path"]  # no effect in eval
        try:
            trunk = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
        except Exception as e:  # noqa: BLE001
            _fail(vjson_path, f"timm.create_model({arch!r}, **{kwargs}) failed: {type(e).__name__}: {e}")
        # facts of the trunk: the official code runs it at its timm default size (open_clip does
        # not pass image_size to timm), so the trunk's own size must equal the JSON's
        pe = trunk.patch_embed
        facts = {
            "trunk image size": (tuple(pe.img_size), (IMAGE_SIZE, IMAGE_SIZE)),
            "patch size": (tuple(pe.patch_size), (PATCH, PATCH)),
            "grid": (tuple(pe.grid_size), GRID),
            "number of image tokens": (int(pe.num_patches), N_IMAGE_TOKENS),
            "prefix tokens (CLS only)": (int(getattr(trunk, "num_prefix_tokens", 1)), 1),
            "dynamic image size": (bool(getattr(trunk, "dynamic_img_size", False)), False),
        }
        for fact, (found, expected) in facts.items():
            if found != expected:
                _fail(vjson_path, f"{fact}: expected {expected}, the {arch} trunk has {found}")
        raw = _load_tensors(ckpt_path)
        state = raw["state_dict"] if "state_dict" in raw and isinstance(raw["state_dict"], dict) else raw
        state = {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
        trunk_state = {k[len("visual.trunk.") :]: v for k, v in state.items() if k.startswith("visual.trunk.")}
        if not trunk_state:
            _fail(ckpt_path, f"no visual.trunk.* weights (keys look like {sorted(state)[:3]})")
        ignored = sorted(k for k in trunk_state if k.startswith(("head.", "fc_norm.")))  # never used by features
        for k in ignored:
            trunk_state.pop(k)
        missing, unexpected, bad = state_mismatch(trunk.state_dict(), trunk_state)
        if missing or unexpected:
            _fail(ckpt_path, f"visual.trunk.* does not match timm {arch}: missing {missing[:5]} "
                             f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")  # fmt: skip
        if bad:
            _fail(ckpt_path, f"shape mismatch (key, file, model): {bad[:3]}")
        trunk.load_state_dict({k: v.float() for k, v in trunk_state.items()}, strict=True)
        tower = LLaVARadVisionTower(
            trunk, int(cfg["mm_vision_select_layer"]), cfg.get("mm_vision_select_feature", "patch")
        )
        report = {
            "arch": arch,
            "kwargs": kwargs,
            "trunk_keys": len(trunk_state),
            "ignored_trunk_keys": ignored,
            "other_clip_keys": sum(1 for k in state if not k.startswith("visual.trunk.")),
            "blocks_run": tower.n_blocks,
            "blocks_total": len(trunk.blocks),
        }
        return tower, report, (mean, std)

    # -- contract -----------------------------------------------------------------------------
    @property
    def grid(self) -> tuple[int, int]:
        return self._grid

    def geometry(self, width: int, height: int) -> Geometry:
        return shortest_side_center_crop_geometry(width, height, self.image_size, self._grid)

    @property
    def n_image_tokens(self) -> int:
        return self._grid[0] * self._grid[1]

    def prompt_template(self) -> str:
        return build_prompt("{question}")

    def describe(self) -> dict:
        loaded = self.model is not None
        model_dir, base_dir = getattr(self, "model_dir", None), getattr(self, "base_dir", None)  # None: tiny()
        d = {
            "name": self.name,
            "model_id": getattr(self, "model_path", DEFAULT_MODEL_ID),
            "model_base": getattr(self, "model_base", DEFAULT_BASE),
            "model_dir": str(model_dir) if loaded and model_dir else None,
            "base_dir": str(base_dir) if loaded and base_dir else None,
            "revision": _revision_of(model_dir) if loaded and model_dir else None,
            "base_revision": _revision_of(base_dir) if loaded and base_dir else None,
            "dtype": str(self.dtype).replace("torch.", "") if loaded else None,
            "quantization": self.quantization,
            "device": str(self.device) if loaded else None,
            "attention_implementation": ATTN_DESCRIPTION,
            "prompt_template": self.prompt_template(),
            "conv_mode": "vicuna_v1",
            "query_mode": self.config.query_mode,
            "layers": list(self.layers) if loaded else self.config.layers,
            "head_mode": self.config.attention_head_mode,
            "answer_suffix": self.config.answer_suffix,
            "grid": list(self._grid),
            "n_image_tokens": self.n_image_tokens,
            "image_size": self.image_size,
            "preprocessing": f"RGB; resize shortest side to {self.image_size} (bicubic); center crop "
            f"{self.image_size}; normalize mean {list(self.mean)} std {list(self.std)}",
            "vision_select_layer": VISION_SELECT_LAYER,
            "projector": PROJECTOR,
            "random_weights": self.random_weights,
            "controls": list(self.config.controls),
            "text_only_template": build_prompt("{question}", with_image=False) if self.config.controls else None,
            "generic_prompt": self.config.generic_prompt,
            "compiled": self.compiled,
            "fused_rms_norms": bool(self._norms) and not self.compiled,
            "tower_stream": self.tower_stream is not None,
        }
        if loaded:
            d["image_span"] = [self.placeholder_index, self.placeholder_index + self.n_image_tokens]
            d["lora"] = {k: self.load_report["lora"][k] for k in ("r", "lora_alpha", "scale", "merged_modules")}
            d["answer_token_ids"] = {"yes": list(self.answer_tokens.yes_ids), "no": list(self.answer_tokens.no_ids)}
        return d

    def compile_regions(self) -> list[tuple[torch.nn.Module, bool | None]]:
        """Each decoder layer's MLP and two RMSNorms (token counts vary per pass: dynamic)."""
        self._require_loaded()
        if self.quantization is not None:
            raise ValueError("compile is not supported with 8-/4-bit weights")
        parts = []
        for layer in self.model.model.layers:
            parts += [layer.mlp, layer.input_layernorm, layer.post_attention_layernorm]
        return [(m, True) for m in parts]

    def vision_device(self) -> torch.device | None:
        return None if self.vision is None else next(self.vision.parameters()).device

    def unload(self) -> None:
        on_cuda = self.model is not None and self.device.type == "cuda"
        self.model = self.vision = self.projector = None
        self._attention = self._norms = self.tower_stream = None
        self.control_memo.clear()
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

    # -- computation ---------------------------------------------------------------------------
    def _require_loaded(self) -> None:
        if self.model is None:
            raise RuntimeError("no model loaded: call load_model() first")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """[3, 518, 518] float32, open_clip's eval transform on the image made 8-bit RGB by
        model_image (16-bit and float images scaled, never clipped)."""
        return preprocess_image(self.model_image(image), self.image_size, self.mean, self.std)

    @torch.no_grad()
    def image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> projected image embeddings [B, N, hidden] in the model dtype
        (encode_images: vision tower then mm_projector)."""
        self._require_loaded()
        x = pixel_values.to(device=self.device, dtype=self.dtype, non_blocking=True)
        return self.projector(self.vision(x))

    def tokenize(self, question: str, raw: bool = False) -> PromptTokens:
        """The prompt for one question (answer suffix appended; raw: as given, for the generic
        prompt), split at the placeholder."""
        self._require_loaded()
        if IMAGE_PLACEHOLDER in question:
            raise ValueError(f"question contains the image placeholder {IMAGE_PLACEHOLDER!r}: {question!r}")
        want_offsets = self.config.query_mode != "answer"
        text = question.strip() if raw else self.config.full_question(question)
        return tokenize_prompt(self.tokenizer, build_prompt(text), want_offsets)

    def text_only_ids(self, question: str) -> list[int]:
        """The text-only control's full prompt ids (BOS included): the same turn without the image."""
        hit = self._token_cache.get(("text_only", question))
        if hit is None:
            hit = self._token_cache[("text_only", question)] = list(
                self.tokenizer(build_prompt(self.config.full_question(question), with_image=False)).input_ids
            )
        return hit

    @torch.no_grad()
    def prefix_cache(self, pixel_values: torch.Tensor, prefix_ids: Sequence[int]):
        """Run BOS + system text + image embeddings once per image: (cache, prefix_len), the
        KV cache that generation continues from. pixel_values [K, 3, S, S] gives a cache of batch K."""
        img = self.image_embeddings(pixel_values)
        return self._cache_prefix(torch.cat([self._text_embeddings(prefix_ids, img.shape[0]), img], dim=1))

    def _text_embeddings(self, ids: Sequence[int], n: int) -> torch.Tensor:
        """The embeddings of one token sequence, repeated for n rows: [n, len(ids), hidden]."""
        return self.model.model.embed_tokens(to_device(torch.tensor([list(ids)]), self.device)).expand(n, -1, -1)

    def _cache_prefix(self, embeds: torch.Tensor):
        """Run prefix embeddings [K, P, hidden] with use_cache: (cache, P)."""
        decoder = self.model.model
        cache = new_cache()
        decoder(inputs_embeds=embeds, use_cache=True, **cache_kwargs(decoder, cache))
        return cache, embeds.shape[1]

    def _tokens(self, question: str, raw: bool = False) -> PromptTokens:
        """tokenize(question), cached by question text (the same paraphrases recur across studies)."""
        hit = self._token_cache.get((raw, question))
        if hit is None:
            if len(self._token_cache) >= 4096:
                self._token_cache.clear()
            hit = self._token_cache[(raw, question)] = self.tokenize(question, raw)
        return hit

    @torch.no_grad()
    def score(self, image, questions: Sequence[str] | str, findings: Sequence[str] | None = None):
        return self.score_many([(image, questions, findings)])[0]

    @torch.no_grad()
    def score_many(self, items: Sequence[tuple]) -> list[list[QuestionScore]]:
        """Several studies in one pass: items are (image, questions, findings or None).

        One forward for the whole pass: a batch row per study, its prefix (image included)
        followed by its questions packed one after another. Returns one list of
        QuestionScore per item, in order.
        """
        return self.score_prepared(self.prepare(items))

    def prepare(self, items: Sequence[tuple]) -> dict:
        """The host-side half of score_many (prompts, pixel values): a runner can prepare
        the next pass in a thread while the GPU runs this one."""
        self._require_loaded()
        items = self.checked_items(items)  # images 8-bit RGB by the CLI loader's rules, questions a list
        toks, queries, rows, owners = [], [], [], []
        for k, (_, questions, findings) in enumerate(items):
            for i, q in enumerate(questions):
                t = self._tokens(q)
                if toks and t.prefix_ids != toks[0].prefix_ids:
                    raise RuntimeError(f"question {q!r} does not share the system prefix of the first question")
                finding = findings[i] if findings is not None else None
                queries.append(
                    suffix_query_positions(
                        self.config.query_mode, list(t.suffix_offsets or []), t.suffix_text,
                        q.strip(), finding, len(t.suffix_ids),
                    )
                )  # fmt: skip
                toks.append(t)
                rows.append(k)
                owners.append((k, i))
            generic = self.config.generic_prompt
            if generic is not None:  # once per study, packed with its questions
                t = self._tokens(generic, raw=True)
                mode = "answer" if self.config.query_mode == "answer" else "question"
                queries.append(suffix_query_positions(mode, list(t.suffix_offsets or []), t.suffix_text,
                                                      generic.strip(), None, len(t.suffix_ids)))  # fmt: skip
                toks.append(t)
                rows.append(k)
                owners.append((k, GENERIC))
        pixel_values = self.pixel_values([item[0] for item in items])
        if self.device.type == "cuda":
            pixel_values = pixel_values.pin_memory()
        prep = {"items": items, "toks": toks, "queries": queries, "rows": rows, "owners": owners,
                "pixel_values": pixel_values}  # fmt: skip
        return {**prep, **self.prepare_controls(items)}

    def score_prepared(self, prep: dict) -> list[list[QuestionScore]]:
        """The device-side half of score_many, on what prepare() returned."""
        return self.launch_prepared(prep).result()

    @torch.no_grad()
    def launch_prepared(self, prep: dict) -> PendingScores:
        """score_prepared's device work launched, its results queued to the host; read with
        .result() (VLMBackend.launch_prepared)."""
        self._require_loaded()
        items, toks, queries, rows, owners = prep["items"], prep["toks"], prep["queries"], prep["rows"], prep["owners"]
        prefix = toks[0].prefix_ids
        p, n_img = len(prefix), self.n_image_tokens
        span = (p, p + n_img)
        prefix_len = p + n_img
        decoder = self.model.model
        img = on_stream(self.tower_stream, lambda: self.image_embeddings(prep["pixel_values"]))  # beside the last pass
        if img.shape[1] != n_img:
            raise RuntimeError(f"expected {n_img} image embeddings per image, found {img.shape[1]}")
        text = self._text_embeddings(prefix, img.shape[0])

        def forward(suffix_ids, position_ids, mask):
            embeds = torch.cat([text, img, decoder.embed_tokens(suffix_ids)], dim=1)
            with fused_rms_norms(() if self.compiled else self._norms):
                return decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state  # fmt: skip

        suffixes = [t.suffix_ids for t in toks]
        out = score_packed(
            forward=forward,
            head=self.model.lm_head,
            attention_modules=self._attention,
            config=self.model.config,
            n_studies=len(items),
            prefix_len=prefix_len,
            suffixes=suffixes,
            query_positions=queries,
            prefix_rows=rows,
            pad_id=self.pad_id,
            image_span=span,
            layers=self.layers,
            head_mode=self.config.attention_head_mode,
            answer_tokens=self.answer_tokens,
            device=self.device,
            decoder_layers=decoder.layers,  # the image tokens' norms entering each layer read
        )
        controls = self._controls(prep, text, prefix_len)
        generated = [(None, None)] * len(toks)
        if self.config.generate:
            cache, cached_len = self._cache_prefix(torch.cat([text, img], dim=1))  # the image embedded once
            assert cached_len == prefix_len, f"prefix cache holds {cached_len} positions, expected {prefix_len}"
            generated = self._generate(cache, prefix_len, suffixes, rows)
        extras = [
            {
                "image_span": list(span),
                "prefix_len": prefix_len,
                "query_positions": list(queries[r]),  # within the suffix
                "n_tokens": prefix_len + len(t.suffix_ids),
                "suffix_len": len(t.suffix_ids),
                **({"generated_ids": generated[r][1]} if self.config.generate else {}),
            }
            for r, t in enumerate(toks)
        ]
        host, ready = to_host(out, self.keep_logits)  # queued now: read without waiting for the next pass
        return PendingScores(lambda: question_scores(host, items, owners, [t.prompt for t in toks],
                                                     [g[0] for g in generated], extras, self.keep_logits, controls),
                             ready)  # fmt: skip

    def _decode(self, embeds: torch.Tensor, mask, position_ids: torch.Tensor) -> torch.Tensor:
        """The decoder over input embeddings [K, T, d] under a packed pass's mask -> hidden [K, T, d]."""
        with fused_rms_norms(() if self.compiled else self._norms):
            return self.model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                    use_cache=False).last_hidden_state  # fmt: skip

    def _controls(self, prep: dict, text: torch.Tensor, prefix_len: int) -> dict:
        """{control: P(yes) [n_questions] float64}: each control's prompts not yet in
        self.control_memo are scored in one extra single-row pass holding a shared prefix (the
        grey image's, or the template's text without the image) and those questions packed
        after it; logits only. The rest are read from the memo (a control names no study)."""
        decoder = self.model.model
        questions = [r for r, (_, i) in enumerate(prep["owners"]) if i != GENERIC]
        common = {"head": self.model.lm_head, "attention_modules": self._attention, "config": self.model.config,
                  "pad_id": self.pad_id, "head_mode": self.config.attention_head_mode,
                  "answer_tokens": self.answer_tokens, "device": self.device}  # fmt: skip
        memo, context = self.control_memo, (str(self.model.lm_head.weight.dtype),)
        out = {}
        if prep.get("blank"):
            sfx = [prep["toks"][r].suffix_ids for r in questions]
            system = list(prep["toks"][0].prefix_ids)

            def blank(idx):
                grey = torch.cat([text[:1], self.image_embeddings(self.blank_pixels())], dim=1)

                def forward_blank(suffix_ids, position_ids, mask):
                    return self._decode(torch.cat([grey, decoder.embed_tokens(suffix_ids)], dim=1), mask, position_ids)

                return score_shared_prefix(forward=forward_blank, prefix_len=prefix_len, suffixes=[sfx[i] for i in idx],
                                           **common)  # fmt: skip

            # the grey image sits between the system ids and each suffix (-1 marks it in the key)
            out["blank"] = memo.resolve("blank", context, [[*system, -1, *x] for x in sfx], blank)
        if "text_only_ids" in prep:
            ids = prep["text_only_ids"]

            def text_only(idx):
                head, rests = self.split_common_prefix([ids[i] for i in idx])
                prefix = self._text_embeddings(head, 1)

                def forward_text(suffix_ids, position_ids, mask):
                    return self._decode(torch.cat([prefix, decoder.embed_tokens(suffix_ids)], dim=1), mask,
                                        position_ids)  # fmt: skip

                return score_shared_prefix(forward=forward_text, prefix_len=len(head), suffixes=rests, **common)

            out["text_only"] = memo.resolve("text_only", context, ids, text_only)
        return out

    @torch.no_grad()
    def _generate(
        self, cache, prefix_len: int, suffixes: Sequence[Sequence[int]], prefix_rows: Sequence[int] | None = None
    ) -> list[tuple[str, list[int]]]:
        """Greedy free text for a batch of suffixes on copies of the prefix cache: suffixes
        left-padded (pads masked, positions continue from the prefix), then one token per step
        for every row until EOS or max_new_tokens (official eval: greedy, stop at </s>).
        Returns (text, token ids without EOS) per suffix."""
        decoder, dev = self.model.model, self.device
        n, width = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width), dtype=torch.long, device=dev)
        for i, s in enumerate(suffixes):
            ids[i, width - len(s) :] = torch.tensor(list(s), device=dev)
            mask[i, width - len(s) :] = 1
        attn = torch.cat([torch.ones((n, prefix_len), dtype=torch.long, device=dev), mask], dim=1)
        pos = prefix_len + (mask.cumsum(1) - 1).clamp_min(0)
        kv = select_cache(cache, list(prefix_rows) if prefix_rows is not None else [0] * n)
        eos = self.tokenizer.eos_token_id
        out_tokens = torch.empty((n, 0), dtype=torch.long, device=dev)
        done = torch.zeros(n, dtype=torch.bool, device=dev)
        for _ in range(self.config.max_new_tokens):
            h = decoder(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                        **cache_kwargs(decoder, kv)).last_hidden_state[:, -1]  # fmt: skip
            nxt = self.model.lm_head(h).float().argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            out_tokens = torch.cat([out_tokens, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
            ids = nxt[:, None]
            attn = torch.cat([attn, torch.ones((n, 1), dtype=torch.long, device=dev)], dim=1)
            pos = pos[:, -1:] + 1
        results = []
        for row in out_tokens.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            text = self.tokenizer.decode(row, skip_special_tokens=True).strip()
            results.append((text[: -len(SEP2)].strip() if text.endswith(SEP2) else text, row))
        return results

"""A tiny random-weight LLaVA-Rad checkpoint in the official file layout.

    model_path, model_base = write_tiny_llava_rad(folder, seed=0)
    LLaVARadMedical().load_model(model_path, model_base, device="cpu")
    LLaVARadMedical.tiny()            # the same, loaded from a temporary folder that is then removed

What it writes (the names and key layouts of microsoft/llava-rad on lmsys/vicuna-7b-v1.5):

    <folder>/vicuna-tiny/            the "base": LlamaForCausalLM (hidden 64, 3 layers, 4 heads over
                                     2 KV heads) saved with save_pretrained, plus a sentencepiece BPE
                                     tokenizer.model trained here (byte fallback, dummy prefix, no
                                     normalisation, as Llama's) and Vicuna's tokenizer_config.json
    <folder>/llava-rad-tiny/
        config.json                  LlavaLlamaForCausalLM config: the Llama fields + mm_* fields
        adapter_config.json          peft LoRA (r 8, alpha 16, dropout 0.05) on q/k/v/o/gate/up/down
        adapter_model.bin            written by peft with random nonzero A and B (the merge matters)
        non_lora_trainables.bin      the mlp2x_gelu projector, keys base_model.model.model.mm_projector.*
        biomedclipcxr_518.json       open_clip model config naming timm vit_base_patch14_dinov2 at 518
        biomedclipcxr_518_checkpoint.pt  open_clip training checkpoint {"state_dict": {module.visual.trunk.*,
                                     module.visual.head.*, module.text.*, module.logit_scale}}
    RANDOM_WEIGHTS                   marker in both folders: everything loaded from them is random

The vision trunk keeps the real geometry (518 px, patch 14 -> 37 x 37 = 1369 patch tokens + CLS)
but is small (embed 32, depth 3, 2 heads): "timm_model_kwargs" in the vision JSON carries the
size overrides. That key is this project's extension; the official open_clip would not accept it,
so the official code cannot load this tiny checkpoint (archive/llava_rad_official_compare.py
compares on the real weights instead).
Deterministic for a given seed; takes about a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"
MODEL_DIRNAME = "llava-rad-tiny"
BASE_DIRNAME = "vicuna-tiny"
VISION_CONFIG_NAME = "biomedclipcxr_518.json"
VISION_CHECKPOINT_NAME = "biomedclipcxr_518_checkpoint.pt"

TINY_LLAMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    initializer_range=0.15,  # larger than 0.02 so attention and logits are far from uniform
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)
TINY_VISION = dict(embed_dim=32, depth=3, num_heads=2)
TINY_LORA = dict(r=8, lora_alpha=16)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TOKENIZER_VOCAB = 400

_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
_FINDINGS = (
    "pleural effusion", "pneumothorax", "cardiomegaly", "consolidation", "atelectasis", "edema",
    "pneumonia", "fracture", "lung opacity", "nodule", "mass", "support devices",
)  # fmt: skip
_QUESTIONS = (
    "Is there {f}?",
    "Is there evidence of {f} in this chest X-ray?",
    "Does the image show {f}?",
    "Can {f} be seen on this radiograph?",
    "Are there signs of {f}?",
    "Would you report {f} here?",
)
_ANSWERS = (
    "Yes.", "No.", "yes", "no", "Yes, there is {f}.", "No, there is no {f}.",
    "The heart size is normal. No acute cardiopulmonary process.",
    "Lungs are clear. There is no focal consolidation, effusion or pneumothorax.",
)  # fmt: skip


def _corpus() -> list[str]:
    """Radiology chat sentences; yes/no in all casings are frequent so each is one piece."""
    lines = [_SYSTEM]
    for i, f in enumerate(_FINDINGS):
        for j, q in enumerate(_QUESTIONS):
            a = _ANSWERS[(i + j) % len(_ANSWERS)].format(f=f)
            lines.append(f"USER: {q.format(f=f)} Answer yes or no. ASSISTANT: {a}")
    lines += ["Yes", "No", "yes", "no", "Yes.", "No.", "yes.", "no."] * 20
    return lines * 4


def train_tokenizer(vocab_size: int = TOKENIZER_VOCAB) -> bytes:
    """A sentencepiece BPE model trained on the corpus above, with Llama's normaliser settings
    (byte fallback, dummy prefix, whitespace kept, identity normalisation, digits split)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return buf.getvalue()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _write_marker(folder: Path, seed: int) -> None:
    (folder / RANDOM_WEIGHTS_MARKER).write_text(
        f"random weights (seed {seed}) written by medvlm.core.tiny_llava_rad for tests, the demo and timing; "
        "nothing computed from them is a model result\n"
    )


def _vision_json() -> dict:
    return {
        "embed_dim": 16,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch14_dinov2",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 518,
            "timm_model_kwargs": dict(TINY_VISION),
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    }


def cache_root() -> Path:
    """Where the tool keeps what it can rebuild: $MEDVLM_CACHE, else ~/.cache/medvlm."""
    return Path(os.environ.get("MEDVLM_CACHE") or Path.home() / ".cache" / "medvlm")


def cached_tiny_llava_rad(seed: int = 0) -> tuple[str, str]:
    """write_tiny_llava_rad's checkpoint, written once into the cache (cache_root()) and reused:
    the folder is named by a hash of this module's source, the seed and the versions of the
    packages that write it, so any change writes a new one. Returns (model_path, model_base)."""
    from importlib.metadata import version

    pkgs = "|".join(f"{n}={version(n)}" for n in ("torch", "transformers", "peft", "timm", "sentencepiece"))
    key = hashlib.sha1(Path(__file__).read_bytes() + f"|seed={seed}|{pkgs}".encode()).hexdigest()[:16]
    folder = cache_root() / f"tiny_llava_rad-{key}"
    if not (folder / "COMPLETE").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder.parent))
        write_tiny_llava_rad(tmp, seed)
        (tmp / "COMPLETE").write_text(pkgs + "\n")
        try:
            os.replace(tmp, folder)  # atomic; a concurrent writer that won leaves an equal folder
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder / MODEL_DIRNAME), str(folder / BASE_DIRNAME)


def write_tiny_llava_rad(folder, seed: int = 0) -> tuple[str, str]:
    """Write the tiny checkpoint under `folder`; returns (model_path, model_base)."""
    import sentencepiece as spm
    import timm
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    model_dir, base_dir = folder / MODEL_DIRNAME, folder / BASE_DIRNAME
    model_dir.mkdir(parents=True, exist_ok=True)
    base_dir.mkdir(parents=True, exist_ok=True)

    # -- tokenizer (Vicuna ships tokenizer.model + tokenizer_config.json, no tokenizer.json) ----
    sp_bytes = train_tokenizer()
    (base_dir / "tokenizer.model").write_bytes(sp_bytes)
    sp = spm.SentencePieceProcessor(model_proto=sp_bytes)
    for w in ("yes", "no", "Yes", "No"):
        pieces = sp.encode(w, out_type=str)  # the dummy prefix makes it "▁" + w
        if len(pieces) != 1:
            raise RuntimeError(f"tiny tokenizer splits {w!r} into {pieces}")
    _write_json(
        base_dir / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "pad_token": None,
            "model_max_length": 2048,
            "padding_side": "right",
            "clean_up_tokenization_spaces": False,
        },
    )
    _write_json(base_dir / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # -- base language model -----------------------------------------------------------
        lcfg = LlamaConfig(vocab_size=sp.vocab_size(), **TINY_LLAMA)
        lm = LlamaForCausalLM(lcfg).eval()
        with torch.no_grad():  # RMSNorm weights away from 1 so a wrong norm would show
            for name, p in lm.named_parameters():
                if name.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        lm.save_pretrained(base_dir)

        # -- vision tower: a small dinov2-family ViT at the real geometry --------------------
        trunk = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0, **TINY_VISION)
        with torch.no_grad():
            for name, p in trunk.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma")):  # dinov2 inits layer scale to 1e-5
                    p.uniform_(0.5, 1.5)
                elif name in ("pos_embed", "cls_token"):
                    p.normal_(0.0, 0.5)
        clip_state = {f"module.visual.trunk.{k}": v.clone() for k, v in trunk.state_dict().items()}
        clip_state["module.visual.head.proj.weight"] = torch.randn(16, TINY_VISION["embed_dim"]) * 0.1
        clip_state["module.text.transformer.embeddings.word_embeddings.weight"] = torch.randn(10, 8)
        clip_state["module.text.transformer.pooler.dense.weight"] = torch.randn(8, 8)
        clip_state["module.logit_scale"] = torch.tensor(4.6052)
        torch.save({"epoch": 1, "name": "tiny-biomedclipcxr-518", "state_dict": clip_state},
                   model_dir / VISION_CHECKPOINT_NAME)  # fmt: skip
        _write_json(model_dir / VISION_CONFIG_NAME, _vision_json())

        # -- projector mlp2x_gelu in non_lora_trainables.bin ---------------------------------
        mm_hidden, hidden = TINY_VISION["embed_dim"], TINY_LLAMA["hidden_size"]
        proj = torch.nn.Sequential(torch.nn.Linear(mm_hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden))
        torch.save(
            {f"base_model.model.model.mm_projector.{k}": v.clone() for k, v in proj.state_dict().items()},
            model_dir / "non_lora_trainables.bin",
        )

        # -- LoRA adapter, saved by peft (random nonzero B so the merge changes the weights) --
        lora_cfg = LoraConfig(
            r=TINY_LORA["r"],
            lora_alpha=TINY_LORA["lora_alpha"],
            target_modules=list(LORA_TARGETS),
            lora_dropout=0.05,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        peft_model = get_peft_model(lm, lora_cfg)
        peft_model.save_pretrained(model_dir, safe_serialization=False)

    # -- the LLaVA-Rad config.json, in the transformers-4.31 style the real one was saved in ----
    #    (LlavaConfig = LlamaConfig fields + mm_* fields; no rope_theta / head_dim keys)
    cfg = {
        "_name_or_path": "lmsys/vicuna-7b-v1.5",
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": lcfg.bos_token_id,
        "eos_token_id": lcfg.eos_token_id,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": "silu",
        "hidden_size": lcfg.hidden_size,
        "image_aspect_ratio": "square",
        "initializer_range": lcfg.initializer_range,
        "intermediate_size": lcfg.intermediate_size,
        "max_position_embeddings": lcfg.max_position_embeddings,
        "mm_hidden_size": mm_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": "biomedclip_cxr_518",
        "mm_vision_tower_config": "llava/model/multimodal_encoder/open_clip_encoder/model_configs/"
        "biomedclip_cxr_518.json",
        "mm_vision_tower_checkpoint": VISION_CHECKPOINT_NAME,
        "model_type": "llava",
        "num_attention_heads": lcfg.num_attention_heads,
        "num_hidden_layers": lcfg.num_hidden_layers,
        "num_key_value_heads": lcfg.num_key_value_heads,
        "pad_token_id": lcfg.pad_token_id,
        "pretraining_tp": 1,
        "rms_norm_eps": lcfg.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": lcfg.vocab_size,
    }
    _write_json(model_dir / "config.json", cfg)
    _write_marker(model_dir, seed)
    _write_marker(base_dir, seed)
    return str(model_dir), str(base_dir)


# The real shapes (lmsys/vicuna-7b-v1.5 + BiomedCLIP-CXR 518 ViT-B/14), for GPU timing.
VICUNA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)  # fmt: skip


def full_size_llava_rad(attention=None, device="cuda", dtype="bfloat16", full_size: bool = True, folder=None):
    """A LLaVARadMedical with random weights in the real shapes (Vicuna-7B, ViT-B/14 dinov2 at
    518 px, mlp2x_gelu 768 -> 4096), built in place on `device` (timing only).

    The tokenizer, prompt, preprocessing and every check come from loading the tiny checkpoint
    through the real loader (LLaVARadMedical.tiny, or written to `folder` when given and kept
    there); its modules are then replaced by full-size random ones. With full_size=False it is
    the tiny model (a CPU smoke test of the same path).
    """
    import timm
    from transformers import LlamaConfig, LlamaForCausalLM

    from llava_rad_medical_only import LLaVARadMedical, LLaVARadVisionTower, build_projector
    from medvlm.core.aggregate import resolve_layers
    from medvlm.core.capture import attention_modules_of
    from medvlm.core.config import MedicalAttentionConfig

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    config = attention or MedicalAttentionConfig()
    if folder is None:
        backend = LLaVARadMedical.tiny(config, device=device, dtype=dtype)
    else:
        model_path, model_base = write_tiny_llava_rad(Path(folder))
        backend = LLaVARadMedical(config=config).load_model(model_path, model_base, device=device, dtype=dtype)
    if not full_size:
        return backend
    backend.model = backend.vision = backend.projector = None
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    torch.manual_seed(0)  # the same random weights in every process of a sharded run
    try:
        with torch.device(device):
            lm = LlamaForCausalLM(LlamaConfig(**VICUNA_7B, attn_implementation="sdpa")).eval().requires_grad_(False)
            trunk = timm.create_model("vit_base_patch14_dinov2", pretrained=False, num_classes=0)
            vision = LLaVARadVisionTower(trunk, -2, "patch").eval().requires_grad_(False)
            projector = build_projector("mlp2x_gelu", vision.hidden_size, VICUNA_7B["hidden_size"]).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    backend.model, backend.vision, backend.projector = lm, vision, projector.requires_grad_(False)
    backend.n_layers = VICUNA_7B["num_hidden_layers"]
    backend.layers = resolve_layers(backend.config.layers, backend.n_layers)
    backend._attention = attention_modules_of(lm.model)
    backend.model_path = backend.model_base = "random-llava-rad-7b-shapes"
    backend.random_weights = True
    return backend

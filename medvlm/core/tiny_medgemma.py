"""A tiny random-weight MedGemma: the real Gemma3ForConditionalGeneration and Gemma3Processor
classes, built in memory with a tokenizer made here (no downloads).

The structural facts of the real model hold: 256 image tokens per image, pooled 4 x 4 from a
64 x 64 patch grid into a row-major 16 x 16 grid; image soft tokens between <start_of_image>
and <end_of_image>; sliding and global layers; GQA (2 query heads per KV head); the Gemma3
chat format. Only sizes shrink (SigLIP at 128 px with 2 px patches, a 64-wide text model).
For tests, the demo and timing only: its outputs mean nothing.

TINY_SHAPES (the default, MedGemmaMedical.tiny()) keeps the real 64 x 64 patch grid. The demo
and --tiny_random_models build DEMO_SHAPES: the same model with 4 px patches, a 32 x 32 grid
pooled 2 x 2 into the same 16 x 16 tokens (the pooling still runs), so that its vision tower
attends over 1,024 patches instead of 4,096 (a sixteenth of the attention; a perturbed image
of the demo's faithfulness curves costs about a sixth as much: 64 -> 11 ms on 2 CPU cores).
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessor,
    Gemma3Processor,
    PreTrainedTokenizerFast,
)

SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>",
)  # fmt: skip

# Words that become single tokens, so that answers and common question words are realistic.
WORDS = (
    "yes", "Yes", "YES", "no", "No", "NO", "user", "model", "Answer", "or", "is", "there",
    "Is", "Does", "the", "a", "an", "this", "image", "chest", "show", "lung", "heart",
    "effusion", "pneumothorax", "cardiomegaly", "view", "PA", "CT", "CR", "MR",
)  # fmt: skip

# The Gemma3 chat format: <bos><start_of_turn>user\n{system\n\n}{content}<end_of_turn>\n
# <start_of_turn>model\n ; images render as <start_of_image>.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def tiny_gemma_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-fallback BPE tokenizer in Gemma's style (spaces as "▁", no prefix space)."""
    vocab: dict[str, int] = {}
    for tok in SPECIALS:
        vocab[tok] = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    letters = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ?.,\n")
    chars = sorted({c for w in WORDS for c in w} | letters | {"▁"})
    for c in chars:
        vocab.setdefault(c, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in WORDS:  # build the word left to right, then "▁" + word
        cur = word[0]
        for c in word[1:]:
            nxt = cur + c
            if nxt not in vocab:
                vocab[nxt] = len(vocab)
                merges.append((cur, c))
            cur = nxt
        if "▁" + word not in vocab:
            vocab["▁" + word] = len(vocab)
            merges.append(("▁", word))
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="▁", behavior="merged_with_next")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        extra_special_tokens={
            "image_token": "<image_soft_token>",
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
        },
        add_bos_token=False,
    )


# Sizes: the tiny test model, and google/medgemma-4b-it's real shapes (for timing with
# random weights on a GPU; the real checkpoint cannot be downloaded here).
TINY_SHAPES = {
    "text": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 6, "num_attention_heads": 4,
             "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16, "global_every": 3,
             "vocab_size": None},
    "vision": {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 128, "patch_size": 2},
}  # fmt: skip
#: the demo's and --tiny_random_models' tiny MedGemma: TINY_SHAPES with 4 px patches (32 x 32 -> 16 x 16)
DEMO_SHAPES = {"text": dict(TINY_SHAPES["text"]), "vision": {**TINY_SHAPES["vision"], "patch_size": 4}}
MEDGEMMA_4B_SHAPES = {
    "text": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, "num_attention_heads": 8,
             "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256, "global_every": 6,
             "vocab_size": 262_208, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0},
    "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
               "image_size": 896, "patch_size": 14},
}  # fmt: skip


def tiny_medgemma(
    seed: int = 0, sliding_window: int = 512, shapes: dict | None = None, device=None, dtype=torch.float32
) -> tuple[Gemma3ForConditionalGeneration, Gemma3Processor]:
    """(model, processor): a random-weight Gemma3ForConditionalGeneration, eval mode.

    sliding_window  the local layers' window; smaller than the prompt (about 280 tokens) to
                    make the sliding mask matter in tests (the real model: 1024)
    shapes          TINY_SHAPES (default), DEMO_SHAPES or MEDGEMMA_4B_SHAPES; the text vocabulary is at
                    least the tokenizer's (the real size keeps the embedding and head costs real)
    device, dtype   where to build it (built in place: no float32 copy on the host)
    """
    shapes = shapes or TINY_SHAPES
    text, vision = dict(shapes["text"]), dict(shapes["vision"])
    tokenizer = tiny_gemma_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    every = text.pop("global_every")
    n_layers = text["num_hidden_layers"]
    text["vocab_size"] = max(len(tokenizer), text["vocab_size"] or 0)
    extra_rope = {k: text.pop(k) for k in ("rope_theta", "rope_local_base_freq") if k in text}
    config = Gemma3Config(
        text_config={
            **text,
            **extra_rope,
            "sliding_window": sliding_window,
            "layer_types": ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n_layers)],
            "max_position_embeddings": 4096,
            "pad_token_id": ids["<pad>"],
            "bos_token_id": ids["<bos>"],
            "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        },
        vision_config={"model_type": "siglip_vision_model", **vision, "vision_use_head": False},
        mm_tokens_per_image=256,
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"],
        pad_token_id=ids["<pad>"],
        bos_token_id=ids["<bos>"],
        eos_token_id=[ids["<eos>"], ids["<end_of_turn>"]],
    )
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device or "cpu"):
            model = Gemma3ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default_dtype)
    with torch.no_grad():  # the projector starts at zeros: give the image a real signal
        proj = model.model.multi_modal_projector.mm_input_projection_weight
        proj.normal_(0.0, 0.5 if shapes is TINY_SHAPES or shapes is DEMO_SHAPES else 0.02)
    model.eval()
    model.config.random_weights = True  # read by MedGemmaMedical.describe()
    size = vision["image_size"]
    image_processor = Gemma3ImageProcessor(
        size={"height": size, "width": size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=256,
    )
    return model, processor

"""Gradient maps, the slow obviously-correct way: one full prompt, eager attention with
output_attentions=True, torch.autograd on the whole graph, Chefer's T x T relevancy matrix.

Written along a different path from medvlm/core/attribution.py wherever one exists: the prompt and
image embeddings as the eager references build them (archive/reference_llava_rad.py: the
official splice, torchvision preprocessing, timm's forward_intermediates; archive/reference.py:
the MedGemma processor's own inputs, the model's own image merge), the model's own masks, no
batching, no checkpointing, no custom attention function, the full relevancy matrix R (T x T)
updated layer by layer as Chefer et al.'s code does (R = R + A_bar @ R), and a float64 finite
difference for gradient x input (margin_with_image_embeddings).

    ref = reference_attribution(backend, image, question)
    ref["gradxinput"], ref["relevancy"]       # [n_image] float64
"""

from __future__ import annotations

import contextlib

import torch

from archive.reference import _inputs, eager_text_attention
from archive.reference_llava_rad import (
    eager_attention,
    official_input_ids,
    reference_pixels,
    reference_vision_features,
)


def _margin(logits: torch.Tensor, tokens) -> torch.Tensor:
    """logits [vocab] -> logsumexp(yes) - logsumexp(no), in the logits' dtype (float64 stays)."""
    return torch.logsumexp(logits[list(tokens.yes_ids)], 0) - torch.logsumexp(logits[list(tokens.no_ids)], 0)


def _llava_rad_embeds(backend, image, question: str):
    """(embeds [1, T, d] (image rows from the reference vision path), image span)."""
    import llava_rad_medical_only as lr

    full_q = backend.config.full_question(question)
    prompt = lr.SYSTEM_PROMPT + " " + "USER" + ": " + "<image>\n" + full_q + " " + "ASSISTANT" + ":"
    ids = official_input_ids(backend.tokenizer, prompt)
    p = ids.index(-200)
    pixels = reference_pixels(image, backend.image_size, backend.mean, backend.std)[None]
    dev, dt = backend.device, backend.dtype
    with torch.no_grad():
        feats = reference_vision_features(backend.vision.trunk, pixels.to(dev, dt), lr.VISION_SELECT_LAYER)
        img = backend.projector(feats)[0]
        emb = backend.model.get_input_embeddings()
        before = emb(torch.tensor(ids[:p], device=dev))
        after = emb(torch.tensor(ids[p + 1 :], device=dev))
    return torch.cat([before, img, after], dim=0)[None], (p, p + img.shape[0])


@contextlib.contextmanager
def _medgemma_leaf(backend, replace=None):
    """Capture (and make a leaf of) the language model's inputs_embeds; `replace(embeds)` may
    return new embeddings to run instead."""
    box = {}

    def pre_hook(module, args, kwargs):
        e = kwargs["inputs_embeds"].detach()
        if replace is not None:
            e = replace(e)
        e.requires_grad_(True)
        box["embeds"] = e
        kwargs["inputs_embeds"] = e
        return args, kwargs

    handle = backend.model.model.language_model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield box
    finally:
        handle.remove()


def reference_attribution(backend, image, question: str, target: str | None = None) -> dict:
    """Full eager forward and backward of one question.

    target   "yes" / "no": the answer relevancy explains (default: the model's answer here)
    returns {
      "margin":     float, m = logsumexp(yes logits) - logsumexp(no logits) at the last token
      "gradxinput": [n_image] float64, (dm/de * e).sum(hidden) at the image positions
      "relevancy":  [n_image] float64, row T - 1 of R over the image columns, R = I and for
                    every layer in order R = R + A_bar @ R, A_bar = mean_h((s dm/dA * A)^+)
      "image_span": (start, end), "n_tokens": T
    }
    """
    model = backend.model
    if backend.name == "llava_rad":
        embeds, span = _llava_rad_embeds(backend, image, question)
        embeds = embeds.detach().requires_grad_(True)
        with torch.enable_grad(), eager_attention(model):
            out = model(inputs_embeds=embeds, output_attentions=True, use_cache=False)
        leaf = embeds
    else:
        inputs = _inputs(backend, image, question)
        with torch.enable_grad(), _medgemma_leaf(backend) as box, eager_text_attention(model):
            out = model(**inputs, output_attentions=True, use_cache=False)
        leaf = box["embeds"]
        span = backend._image_span(inputs["input_ids"][0].tolist())
    attentions = list(out.attentions)
    m = _margin(out.logits[0, -1], backend.answer_tokens)
    # autograd.grad, not backward(): no parameter's .grad is touched
    grads = torch.autograd.grad(m, [leaf, *attentions], allow_unused=True)
    if any(g is None for g in grads[1:]):
        raise RuntimeError("an attention map received no gradient: it is not the tensor the forward used")
    s, e = span
    gxi = (grads[0][0, s:e].double() * leaf[0, s:e].detach().double()).sum(-1)
    sign = (1.0 if m.item() >= 0 else -1.0) if target is None else (1.0 if target == "yes" else -1.0)
    n = leaf.shape[1]
    rel = torch.eye(n, dtype=torch.float64)
    for a, g in zip(attentions, grads[1:], strict=True):
        cam = (sign * g[0].double() * a[0].detach().double()).clamp(min=0).mean(0)  # [T, T]
        rel = rel + cam.cpu() @ rel
    return {"margin": m.item(), "gradxinput": gxi.cpu(), "relevancy": rel[-1, s:e].clone(), "image_span": span,
            "n_tokens": n}  # fmt: skip


@torch.no_grad()
def margin_with_image_embeddings(backend, image, question: str, change) -> float:
    """m of one full prompt (the model's own masks and attention implementation: SDPA, which
    unlike eager keeps float64 in float64) with the image rows of the decoder's input embeddings
    replaced by change(image rows [n_image, d]) -> [n_image, d]: the function a finite
    difference of gradient x input differentiates."""
    model = backend.model
    if backend.name == "llava_rad":
        embeds, (s, e) = _llava_rad_embeds(backend, image, question)
        embeds = embeds.clone()
        embeds[0, s:e] = change(embeds[0, s:e])
        logits = model(inputs_embeds=embeds, use_cache=False).logits[0, -1]
        return float(_margin(logits, backend.answer_tokens))
    inputs = _inputs(backend, image, question)
    s, e = backend._image_span(inputs["input_ids"][0].tolist())

    def replace(embeds):
        embeds = embeds.clone()
        embeds[0, s:e] = change(embeds[0, s:e])
        return embeds

    with _medgemma_leaf(backend, replace):
        logits = model(**inputs, use_cache=False).logits[0, -1]
    return float(_margin(logits, backend.answer_tokens))

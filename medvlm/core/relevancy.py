"""Chefer's relevancy pass machinery (medvlm.core.attribution runs it): the decoder's attention
on an eager function that hands each layer's probabilities to a recorder, and the recorder
that accumulates R's answering row from the probabilities' gradients during the backward.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface

from medvlm.core.capture import attention_installed, mask_never_skipped

RELEVANCY_ATTENTION = "medvlm_relevancy"
_RECORDER_ATTR = "_medvlm_relevancy_recorder"


def _relevancy_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Eager attention (transformers' eager_attention_forward: scores, mask, float32 softmax
    cast to the query dtype, probabilities x values) that hands each layer's probabilities
    to the module's relevancy recorder. Boolean masks (True = attend) and additive float masks
    are both accepted. query [b, h, q, d], key/value [b, kv_h, k, d] -> ([b, q, h, d], None)."""
    if kwargs.get("softcap") is not None:
        raise ValueError("attention logit softcapping is not supported by the relevancy pass")
    n_rep = query.shape[1] // key.shape[1]
    k, v = repeat_kv(key, n_rep), repeat_kv(value, n_rep)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, k.transpose(2, 3)) * scale
    if attention_mask is not None:
        mask = attention_mask[:, :, :, : k.shape[-2]]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    recorder = getattr(module, _RECORDER_ATTR, None)
    if recorder is not None:
        recorder.seen(module.layer_idx, probs)
    return torch.matmul(probs, v).transpose(1, 2).contiguous(), None


class RelevancyRecorder:
    """Accumulates Chefer's relevancy row during the backward of a checkpointed pass.

    r starts as e_a (the answering position a of each row) and becomes
    e_a^T (I + A_bar_L) ... (I + A_bar_1), the row a of R = (I + A_bar_L) ... (I + A_bar_1),
    which is what R = I; R = R + A_bar_l R over the layers in order gives: each layer's factor is
    applied when that layer's probability gradient arrives, last layer first (the backward's
    order; checked). The probabilities come from the checkpoint's recomputation of the layer
    (stashed by the attention function during the backward), so no layer's [H, T, T] outlives
    its own backward.

    answer_pos [R] long, n_tokens T, n_layers; kept: the layers run without checkpointing
    (their forward probabilities are the ones the backward uses) -> after the backward:
    row [R, T] float32
    """

    def __init__(self, answer_pos: torch.Tensor, n_tokens: int, n_layers: int, kept: Sequence[int] = ()):
        self.row = torch.nn.functional.one_hot(answer_pos, n_tokens).float()
        self.phase = "forward"
        self.kept = set(kept)
        self.stash: dict[int, torch.Tensor] = {}
        self.expected = n_layers - 1
        self.done: list[int] = []

    def seen(self, layer: int, probs: torch.Tensor) -> None:
        if self.phase == "forward":
            if probs.requires_grad:
                probs.register_hook(functools.partial(self._gradient, layer))
            if layer in self.kept:
                self.stash[layer] = probs.detach()
        else:  # the checkpoint recomputing this layer during the backward
            self.stash[layer] = probs.detach()

    def _gradient(self, layer: int, grad: torch.Tensor) -> None:
        if layer != self.expected:
            raise RuntimeError(f"relevancy: layer {layer}'s gradient arrived, expected layer {self.expected}")
        probs = self.stash.pop(layer, None)
        if probs is None:
            raise RuntimeError(f"relevancy: layer {layer} was not recomputed before its gradient arrived")
        # the product in the probabilities' dtype (float32 stays float32), the head mean accumulated in float32
        a_bar = torch.mul(grad, probs).clamp_min_(0).mean(1, dtype=torch.float32)  # [R, T, T]
        self.row = self.row + torch.bmm(self.row[:, None, :], a_bar)[:, 0]
        self.expected -= 1
        self.done.append(layer)


@contextlib.contextmanager
def relevancy_attention(attention_modules: Sequence[torch.nn.Module], recorder: RelevancyRecorder):
    """The decoder's attention on _relevancy_attention, reporting to recorder, for one block."""
    AttentionInterface.register(RELEVANCY_ATTENTION, _relevancy_attention)
    AttentionMaskInterface.register(RELEVANCY_ATTENTION, mask_never_skipped)
    attrs = [(m, _RECORDER_ATTR, recorder) for m in attention_modules]
    with attention_installed(RELEVANCY_ATTENTION, [m.config for m in attention_modules], attrs):
        yield recorder

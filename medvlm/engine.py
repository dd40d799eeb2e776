"""Shared-prefix scoring: the prefix (system text + image) runs once with use_cache; all
question suffixes of one image run as one right-padded batch against that one cache, shared
(broadcast layer by layer, never copied per question).

Both backends feed this the pieces of their own model:
    decoder            the text decoder (LlamaModel, Gemma3TextModel): input_ids -> hidden
    head               hidden [n, d] -> logits [n, vocab] (lm_head, plus any final softcap)
    attention_modules  decoder.layers[i].self_attn, for the row capture
From one forward pass over the suffixes it reads the next-token logits at the last real
token of each row and the attention rows of the chosen query tokens over the image span.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from medvlm.capture import CaptureSpec, capture_rows
from medvlm.scoring import AnswerTokens, yes_probability


@dataclass(frozen=True)
class SuffixScores:
    """One forward over Q question suffixes.

    logits      [Q, vocab] float32: next-token logits at each row's last real token
    p_yes       [Q] float64;  coverage [Q] float64
    attention   [Q, L, n_image] or [Q, L, H, n_image] float32: rows averaged over each
                question's valid query tokens (head mode "none" keeps heads)
    image_mass  [Q, L] float32: attention mass on the image span (mean over heads/queries)
    layers      the L layer indices
    n_query     [Q] number of query tokens averaged per question
    """

    logits: torch.Tensor
    p_yes: torch.Tensor
    coverage: torch.Tensor
    attention: torch.Tensor
    image_mass: torch.Tensor
    layers: tuple[int, ...]
    n_query: torch.Tensor


def new_cache(text_config):
    """An empty DynamicCache laid out for the text config (sliding layers where it has them)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=text_config)
    except TypeError:  # older transformers
        return DynamicCache()


def cache_kwargs(module: torch.nn.Module, cache) -> dict:
    """{"cache": cache} or {"past_key_values": cache}, whichever the forward takes
    (transformers renamed it in 5.x)."""
    params = inspect.signature(module.forward).parameters
    return {"cache": cache} if "cache" in params else {"past_key_values": cache}


def select_cache(cache, rows: Sequence[int]):
    """A copy of a prefix cache whose batch row i is the prefix's row rows[i] (for generation,
    where each row's cache grows). The original is untouched."""
    out = copy.deepcopy(cache)
    out.batch_select_indices(torch.tensor(list(rows), device=cache.layers[0].keys.device))
    return out


def repeat_cache(cache, n: int):
    """A copy of a batch-1 prefix cache repeated to batch n (see select_cache)."""
    return select_cache(cache, [0] * n)


def _shared_update(self, key_states, value_states, *args, **kwargs):
    """Keys/values of the shared prefix rows each suffix row reads, followed by the suffix's
    own; nothing is stored (the prefix cache is left as it was)."""
    if self._prefix_rows is None:  # one prefix for every row: a broadcast view, no copy
        n = key_states.shape[0]
        pk, pv = self.keys.expand(n, -1, -1, -1), self.values.expand(n, -1, -1, -1)
    else:
        pk, pv = self.keys.index_select(0, self._prefix_rows), self.values.index_select(0, self._prefix_rows)
    return torch.cat([pk, key_states], dim=-2), torch.cat([pv, value_states], dim=-2)


def shared_prefix_cache(cache, prefix_rows: torch.Tensor | None = None):
    """A view of a filled prefix cache that serves a batch of suffixes.

    prefix_rows  [Q] long: the prefix batch row each suffix row continues (several studies'
                 prefixes in one cache); None when the prefix has batch 1 (broadcast)
    Each layer answers update() with [its prefix rows | the suffix's keys] and stores nothing,
    so the prefix is never copied per question (a gathered copy lives only for the layer
    being computed) and the cache is left as it was. Mask sizes and offsets come from the
    prefix layer itself, sliding layers included.
    """
    view = copy.copy(cache)
    layers = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            raise ValueError("shared_prefix_cache needs a filled prefix cache")
        batch = layer.keys.shape[0]
        if prefix_rows is None and batch != 1:
            raise ValueError(f"a prefix cache of batch {batch} needs prefix_rows")
        if prefix_rows is not None and int(prefix_rows.max()) >= batch:
            raise ValueError(f"prefix row {int(prefix_rows.max())} outside a prefix batch of {batch}")
        cls = type(f"SharedPrefix{type(layer).__name__}", (type(layer),), {"update": _shared_update})
        shared = copy.copy(layer)
        shared.__class__ = cls
        shared._prefix_rows = prefix_rows
        layers.append(shared)
    view.layers = layers
    return view


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists -> (ids [Q, S] long, mask [Q, S] long), built on the host and
    moved in one copy."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every suffix needs at least one token")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids.to(device), mask.to(device)


def query_tensors(positions: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row query positions -> (index [Q, nq] long, valid [Q, nq] bool), padded with 0."""
    if any(len(p) == 0 for p in positions):
        raise ValueError("every question needs at least one query position")
    width = max(len(p) for p in positions)
    index = torch.zeros((len(positions), width), dtype=torch.long)
    valid = torch.zeros((len(positions), width), dtype=torch.bool)
    for i, p in enumerate(positions):
        index[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        valid[i, : len(p)] = True
    return index.to(device), valid.to(device)


@torch.no_grad()
def score_suffixes(
    *,
    decoder: torch.nn.Module,
    head: Callable[[torch.Tensor], torch.Tensor],
    attention_modules: Sequence[torch.nn.Module],
    prefix_cache,
    prefix_len: int,
    suffixes: Sequence[Sequence[int]],
    query_positions: Sequence[Sequence[int]],
    pad_id: int,
    image_span: tuple[int, int],
    layers: tuple[int, ...],
    head_mode: str,
    answer_tokens: AnswerTokens,
    prefix_rows: Sequence[int] | None = None,
) -> SuffixScores:
    """Score Q suffixes against one prefix cache in one forward.

    suffixes         Q token lists that follow the prefix
    query_positions  Q lists of positions within each suffix whose attention rows are kept
                     (the answering token is len(suffix) - 1)
    image_span       (start, end) absolute positions of the image tokens in the prefix
    prefix_rows      Q indices into the prefix cache's batch (several studies' prefixes in
                     one cache, all of prefix_len positions); None for a batch-1 prefix
    """
    device = next(decoder.parameters()).device
    n = len(suffixes)
    if len(query_positions) != n:
        raise ValueError(f"expected {n} query position lists, found {len(query_positions)}")
    for s, q in zip(suffixes, query_positions, strict=True):
        if max(q) >= len(s) or min(q) < 0:
            raise ValueError(f"query position {max(q)} outside a suffix of {len(s)} tokens")
    if not 0 <= image_span[0] < image_span[1] <= prefix_len:
        raise ValueError(f"image span {image_span} is not inside the {prefix_len}-token prefix")
    ids, mask = pad_right(suffixes, pad_id, device)
    width = ids.shape[1]
    attn_mask = torch.cat([torch.ones((n, prefix_len), dtype=torch.long, device=device), mask], dim=1)
    position_ids = (torch.arange(width, device=device) + prefix_len).unsqueeze(0).expand(n, -1)
    q_index, q_valid = query_tensors(query_positions, device)
    spec = CaptureSpec(
        layers=layers,
        query_index=q_index,
        query_valid=q_valid,
        key_span=image_span,
        n_keys=prefix_len + width,
        head_mode=head_mode,
    )
    rows = None
    if prefix_rows is not None:
        if len(prefix_rows) != n:
            raise ValueError(f"expected {n} prefix rows, found {len(prefix_rows)}")
        rows = torch.tensor(list(prefix_rows), dtype=torch.long, device=device)
    cache = shared_prefix_cache(prefix_cache, rows)
    with capture_rows(attention_modules, spec) as cap:
        out = decoder(
            input_ids=ids,
            attention_mask=attn_mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(decoder, cache),
        )
    last = mask.sum(1) - 1
    hidden = out.last_hidden_state[torch.arange(n, device=device), last]
    logits = head(hidden).float()
    p_yes, coverage = yes_probability(logits, answer_tokens)
    n_valid = q_valid.sum(1).clamp_min(1)
    per_layer, mass = [], []
    for layer in layers:
        pattern = cap.hook_pattern[layer]  # [Q, (H,) nq, n_image]
        q_axis = pattern.ndim - 2
        denom = n_valid.view(n, *([1] * (pattern.ndim - 1))).float()
        per_layer.append(pattern.sum(q_axis) / denom.squeeze(q_axis))
        mass.append(cap.hook_image_mass[layer].sum(1) / n_valid.float())
    return SuffixScores(
        logits=logits,
        p_yes=p_yes,
        coverage=coverage,
        attention=torch.stack(per_layer, dim=1),
        image_mass=torch.stack(mass, dim=1),
        layers=tuple(layers),
        n_query=n_valid,
    )

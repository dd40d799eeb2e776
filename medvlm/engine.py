"""Shared-prefix scoring: the prefix (system text + image) runs once with use_cache; all
question suffixes of a study are packed into one sequence after it (a block mask keeps each
question to the prefix and its own tokens), so the prefix is read once per study and never
copied per question. Several studies run as a batch, one row each.

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


def new_cache(text_config=None):
    """An empty DynamicCache whose layers keep every key (sliding layers too: the window is
    applied by the masks), so key columns are absolute positions in every layer."""
    from transformers import DynamicCache

    del text_config  # every layer full: see above
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


def _appending_update(self, key_states, value_states, *args, **kwargs):
    """The prefix's keys/values followed by the new ones; nothing is stored."""
    return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def appending_view(cache):
    """A view of a filled prefix cache for one forward of new tokens with the same batch:
    each layer answers update() with [prefix | new] and keeps nothing, so the prefix cache
    can serve any number of passes."""
    view = copy.copy(cache)
    layers = []
    for layer in cache.layers:
        if not getattr(layer, "is_initialized", False) or layer.keys is None or layer.keys.numel() == 0:
            raise ValueError("appending_view needs a filled prefix cache")
        shared = copy.copy(layer)
        shared.__class__ = type(f"Appending{type(layer).__name__}", (type(layer),), {"update": _appending_update})
        layers.append(shared)
    view.layers = layers
    return view


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
def _suffix_masks(decoder, rows_tokens, prefix_len: int, width: int, device):
    """The 4D boolean masks [K, 1, width, prefix_len + width] of a packed suffix pass.

    rows_tokens  per study k, the list of (row id, offset t) of each packed token (pads absent)
    A packed token (row r, offset t) sits at position prefix_len + t and sees every prefix key
    and the keys of its own row at offsets <= t; sliding layers also keep only keys within
    the window (transformers' own causal and sliding-window mask functions decide). Pads see
    the prefix only. Returns a tensor, or {layer type: tensor} when the model has sliding layers.
    """
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    k_studies = len(rows_tokens)
    row = torch.full((k_studies, width), -1, dtype=torch.long)
    off = torch.zeros((k_studies, width), dtype=torch.long)
    for k, toks in enumerate(rows_tokens):
        if toks:
            row[k, : len(toks)] = torch.tensor([r for r, _ in toks])
            off[k, : len(toks)] = torch.tensor([t for _, t in toks])
    row, off = row.to(device), off.to(device)
    q_pos = (prefix_len + off)[:, :, None]  # [K, W, 1]
    kv_prefix = torch.arange(prefix_len, device=device)[None, None, :]  # [1, 1, P]
    kv_suffix = (prefix_len + off)[:, None, :]  # [K, 1, W]
    same_row = (row[:, :, None] == row[:, None, :]) & (row[:, None, :] >= 0)
    base_prefix = causal_mask_function(None, None, q_pos, kv_prefix).expand(k_studies, width, prefix_len)
    base_suffix = same_row & causal_mask_function(None, None, q_pos, kv_suffix)

    def build(window):
        pre, suf = base_prefix, base_suffix
        if window is not None:
            overlay = sliding_window_overlay(window)
            pre = pre & overlay(None, None, q_pos, kv_prefix)
            suf = suf & overlay(None, None, q_pos, kv_suffix)
        return torch.cat([pre, suf], dim=-1)[:, None]  # [K, 1, W, P + W]

    cfg = decoder.config
    types = list(getattr(cfg, "layer_types", None) or [])
    if "sliding_attention" in types:
        return {"full_attention": build(None), "sliding_attention": build(cfg.sliding_window)}
    if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True) and types == []:
        raise ValueError("a sliding-window model without layer_types is not supported by the packed pass")
    return build(None)


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
    """Score Q suffixes against a prefix cache in one forward.

    suffixes         Q token lists that follow the prefix
    query_positions  Q lists of positions within each suffix whose attention rows are kept
                     (the answering token is len(suffix) - 1)
    image_span       (start, end) absolute positions of the image tokens in the prefix
    prefix_rows      Q indices into the prefix cache's batch (several studies' prefixes in
                     one cache, all of prefix_len positions); None for a batch-1 prefix

    The suffixes of one study are packed into one sequence after its prefix: a batch row per
    study, not per question, so the prefix keys are read once per study and never copied per
    question. A block mask keeps every question to the prefix and its own earlier tokens, at
    its own positions (prefix_len + offset), so each row computes exactly what a separate
    forward of prefix + that suffix would.
    """
    device = next(decoder.parameters()).device
    n = len(suffixes)
    if len(query_positions) != n:
        raise ValueError(f"expected {n} query position lists, found {len(query_positions)}")
    for s, q in zip(suffixes, query_positions, strict=True):
        if not s:
            raise ValueError("every suffix needs at least one token")
        if max(q) >= len(s) or min(q) < 0:
            raise ValueError(f"query position {max(q)} outside a suffix of {len(s)} tokens")
    if not 0 <= image_span[0] < image_span[1] <= prefix_len:
        raise ValueError(f"image span {image_span} is not inside the {prefix_len}-token prefix")
    batch = prefix_cache.layers[0].keys.shape[0]
    rows = [0] * n if prefix_rows is None else [int(r) for r in prefix_rows]
    if len(rows) != n:
        raise ValueError(f"expected {n} prefix rows, found {len(rows)}")
    if max(rows) >= batch or min(rows) < 0:
        raise ValueError(f"prefix row {max(rows)} outside a prefix batch of {batch}")
    # pack: study k's suffixes one after another; where each question's tokens landed
    packed: list[list[int]] = [[] for _ in range(batch)]
    tokens: list[list[tuple[int, int]]] = [[] for _ in range(batch)]
    start_of: list[int] = []
    for r, (s, k) in enumerate(zip(suffixes, rows, strict=True)):
        start_of.append(len(packed[k]))
        packed[k].extend(int(t) for t in s)
        tokens[k].extend((r, t) for t in range(len(s)))
    width = max(len(p) for p in packed)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    offsets = torch.zeros((batch, width), dtype=torch.long)
    for k, p in enumerate(packed):
        if p:
            ids[k, : len(p)] = torch.tensor(p)
            offsets[k, : len(p)] = torch.tensor([t for _, t in tokens[k]])
    ids, position_ids = ids.to(device), (offsets + prefix_len).to(device)
    mask = _suffix_masks(decoder, tokens, prefix_len, width, device)
    # capture: every question's query tokens, gathered per study row
    per_study_q: list[list[int]] = [[] for _ in range(batch)]
    q_owner: list[list[int]] = [[] for _ in range(batch)]
    for r, (k, q) in enumerate(zip(rows, query_positions, strict=True)):
        per_study_q[k].extend(start_of[r] + int(t) for t in q)
        q_owner[k].extend([r] * len(q))
    q_index, q_valid = query_tensors([q or [0] for q in per_study_q], device)
    q_valid &= torch.tensor([[bool(q)] for q in per_study_q], device=device)
    spec = CaptureSpec(
        layers=layers,
        query_index=q_index,
        query_valid=q_valid,
        key_span=image_span,
        n_keys=prefix_len + width,
        head_mode=head_mode,
    )
    cache = appending_view(prefix_cache)
    with capture_rows(attention_modules, spec) as cap:
        out = decoder(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            use_cache=True,
            **cache_kwargs(decoder, cache),
        )
    last_k = torch.tensor(rows, device=device)
    last_t = torch.tensor([start_of[r] + len(suffixes[r]) - 1 for r in range(n)], device=device)
    logits = head(out.last_hidden_state[last_k, last_t]).float()
    p_yes, coverage = yes_probability(logits, answer_tokens)
    # average each question's query rows: a [Q, batch * nq] averaging matrix
    nq = q_index.shape[1]
    avg = torch.zeros((n, batch * nq))  # built on the host: one copy, not a launch per entry
    for k in range(batch):
        for j, r in enumerate(q_owner[k]):
            avg[r, k * nq + j] = 1.0
    n_query = avg.sum(1).to(device)
    avg = (avg / avg.sum(1, keepdim=True)).to(device)
    per_layer, mass = [], []
    for layer in layers:
        pattern = cap.hook_pattern[layer]  # [K, (H,) nq, n_image]
        if pattern.ndim == 4:
            flat = pattern.transpose(1, 2).reshape(batch * nq, -1)  # [(K nq), H * n_image]
            per_layer.append((avg @ flat).view(n, pattern.shape[1], pattern.shape[-1]))
        else:
            per_layer.append(avg @ pattern.reshape(batch * nq, -1))
        mass.append(avg @ cap.hook_image_mass[layer].reshape(batch * nq))
    return SuffixScores(
        logits=logits,
        p_yes=p_yes,
        coverage=coverage,
        attention=torch.stack(per_layer, dim=1),
        image_mass=torch.stack(mass, dim=1),
        layers=tuple(layers),
        n_query=n_query.long(),
    )

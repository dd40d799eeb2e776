"""Packed scoring: one forward per pass. Each study is one batch row: its prefix (system
text + image) followed by all of its question suffixes packed one after another. A block
mask keeps every question to the prefix and its own earlier tokens, at its own positions
(prefix_len + offset), so each question computes exactly what a separate forward of prefix
+ that question would, while the prefix runs once per study, is never copied per question,
and no KV cache outlives the layer that made it.

Both backends feed this the pieces of their own model:
    forward            (suffix_ids [K, W], position_ids [K, P + W], mask) -> hidden [K, P + W, d]:
                       the backend puts the prefix (image included) in front of the suffixes
    head               hidden [n, d] -> logits [n, vocab] (lm_head, plus any final softcap)
    attention_modules  decoder.layers[i].self_attn, for the row capture (and the causal fast path)
    decoder_layers     decoder.layers, for the image tokens' residual norms (optional)
From that one forward it reads the next-token logits at the last token of each question, the
attention rows of the chosen query tokens over the image span and, given the decoder layers,
the norm of each image token's hidden state entering each layer read (one per study: the
image sits in the prefix, which no question changes).

When every row holds one question (pads after it), no prefix span is bidirectional and no
layer slides (LLaVA-Rad's Llama decoder; not MedGemma), the block mask is plain causal
attention at every real token: pass_masks then hands no mask, position ids 0 .. T - 1 and a
context running the decoder on SDPA's is_causal kernels (flash / cuDNN, forward and
backward) instead of the masked memory-efficient kernel. score_packed takes it for control
passes (no rows captured: the faithfulness curves' one-question passes), medvlm.core.attribution
for its gradient rows.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

from medvlm.core.capture import CaptureSpec, attention_installed, capture_resid_norms, capture_rows
from medvlm.core.scoring import AnswerTokens, yes_probability


@dataclass(frozen=True)
class PackedScores:
    """One forward over Q questions.

    logits      [Q, vocab] float32: next-token logits at each row's last real token (None in
                a host copy made without keep_logits: to_host)
    p_yes       [Q] float64;  coverage [Q] float64
    attention   [Q, L, n_image] or [Q, L, H, n_image] float32: rows averaged over each
                question's valid query tokens (head mode "none" keeps heads)
    image_mass  [Q, L] float32: attention mass on the image span (mean over heads/queries)
    layers      the L layer indices
    n_query     [Q] number of query tokens averaged per question
    image_norms [K, L, n_image] float32 per study: the L2 norm of each image token's hidden
                state entering each layer read (hook_resid_pre_norm), or None when not captured
    """

    logits: torch.Tensor | None
    p_yes: torch.Tensor
    coverage: torch.Tensor
    attention: torch.Tensor
    image_mass: torch.Tensor
    layers: tuple[int, ...]
    n_query: torch.Tensor
    image_norms: torch.Tensor | None = None


def to_host(out: PackedScores, keep_logits: bool = False) -> tuple[PackedScores, torch.cuda.Event | None]:
    """(out's tensors on the host, a CUDA event recorded after their copies; None off CUDA).

    Called where a pass's launches end, it queues the copies of what question_scores reads
    (logits only when keep_logits; else None) behind the pass and ahead of anything launched
    later: waiting on the event waits for this pass alone, so a runner can launch the next pass
    first and read this one while the GPU runs it (a plain .cpu() would wait for both). On
    CUDA the copies land in pinned host memory, asynchronously; the host tensors must not be
    read before event.synchronize()."""
    if not out.p_yes.is_cuda:
        return replace(out, logits=out.logits if keep_logits else None), None

    def host(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        dst = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return dst.copy_(t, non_blocking=True)

    moved = replace(out, logits=host(out.logits) if keep_logits else None, p_yes=host(out.p_yes),
                    coverage=host(out.coverage), attention=host(out.attention), image_mass=host(out.image_mass),
                    n_query=host(out.n_query), image_norms=host(out.image_norms))  # fmt: skip
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(out.p_yes.device))  # the copies' stream, whatever the current device
    return moved, event


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on the device without a host synchronisation: a plain .to(cuda) waits
    for every kernel already queued (the copy is made blocking), so a pass that copies index
    tensors after launching its vision tower stalls the host until the tower finishes and
    then launches the decoder one kernel at a time behind an idle GPU. On CUDA the tensor is
    staged in pinned memory (the caching host allocator keeps it until the copy is done)
    and copied asynchronously, in stream order."""
    if device is None or torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def on_stream(stream: torch.cuda.Stream | None, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    """fn()'s tensor with fn's kernels queued on `stream` (None: run fn as is, on the current
    stream). The current stream waits for them before anything queued on it later, and the
    tensor's memory is held for the current stream's use (record_stream), so the caller reads
    it as if fn had run in line; what changes is that fn's work need not wait behind what the
    current stream already holds (the previous pass: a vision tower overlapping the previous
    pass's decoder). fn must make its device inputs itself (from host tensors or weights):
    a tensor written on the current stream before the call may not be written yet when fn's
    kernels run. The results are the same kernels' on the same inputs, so the same values."""
    if stream is None:
        return fn()
    current = torch.cuda.current_stream(stream.device)
    with torch.cuda.stream(stream):
        out = fn()
    current.wait_stream(stream)
    out.record_stream(current)
    return out


def new_cache():
    """An empty DynamicCache for generation: built without a config, every layer keeps every
    key (sliding layers too: the window is applied by the masks), so key columns are absolute
    positions in every layer."""
    from transformers import DynamicCache

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
    return to_device(index, device), to_device(valid, device)


@dataclass(frozen=True)
class PackedLayout:
    """Where each question's tokens sit in a packed pass of K studies (host side).

    suffix_ids  [K, W] long: each study's suffixes one after another, right-padded
    owner       [K, W] long: the question (index into the pass's list) of each packed token, -1 for pads
    offset      [K, W] long: each token's offset within its own question (0 for pads)
    start_of    per question, where its first token sits in its study's packed row
    """

    suffix_ids: torch.Tensor
    owner: torch.Tensor
    offset: torch.Tensor
    start_of: tuple[int, ...]


def pack_suffixes(suffixes: Sequence[Sequence[int]], rows: Sequence[int], n_studies: int, pad_id: int) -> PackedLayout:
    """Pack each study's question suffixes one after another (study rows[r] owns suffix r)."""
    packed: list[list[int]] = [[] for _ in range(n_studies)]
    owner: list[list[int]] = [[] for _ in range(n_studies)]
    offset: list[list[int]] = [[] for _ in range(n_studies)]
    start_of = []
    for r, (s, k) in enumerate(zip(suffixes, rows, strict=True)):
        start_of.append(len(packed[k]))
        packed[k].extend(int(t) for t in s)
        owner[k].extend([r] * len(s))
        offset[k].extend(range(len(s)))
    width = max(len(p) for p in packed)
    ids = torch.full((n_studies, width), pad_id, dtype=torch.long)
    own = torch.full((n_studies, width), -1, dtype=torch.long)
    off = torch.zeros((n_studies, width), dtype=torch.long)
    for k in range(n_studies):
        n = len(packed[k])
        if n:
            ids[k, :n] = torch.tensor(packed[k])
            own[k, :n] = torch.tensor(owner[k])
            off[k, :n] = torch.tensor(offset[k])
    return PackedLayout(ids, own, off, tuple(start_of))


@torch.no_grad()
def packed_masks(config, layout: PackedLayout, prefix_len: int, device, bidirectional_span=None):
    """The boolean masks [K, 1, T, T] (T = prefix_len + W, True = attend) of a packed pass, and
    the position ids [K, T].

    Prefix tokens attend causally within the prefix; with bidirectional_span (start, end), the
    prefix tokens in that span also see each other (Gemma3's image block). A packed token
    (question r, offset t) sits at position prefix_len + t and sees every prefix key and the
    keys of question r at offsets <= t; pads see the prefix only. Sliding layers also keep
    only keys inside the window (transformers' own causal and sliding-window functions
    decide, as transformers composes them for Gemma3: AND(window, OR(causal, block))).
    Returns (mask or {layer type: mask}, position_ids).
    """
    from transformers.masking_utils import causal_mask_function, sliding_window_overlay

    k_studies, width = layout.owner.shape
    prefix_owner = torch.full((k_studies, prefix_len), -2, dtype=torch.long)  # -2: prefix, -1: pad
    owner = to_device(torch.cat([prefix_owner, layout.owner], dim=1), device)
    pos = torch.cat([torch.arange(prefix_len).expand(k_studies, -1), prefix_len + layout.offset], dim=1)
    pos = to_device(pos, device)
    q_pos, kv_pos = pos[:, :, None], pos[:, None, :]
    in_prefix = owner == -2
    same_question = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
    allowed = causal_mask_function(None, None, q_pos, kv_pos) & (in_prefix[:, None, :] | same_question)
    if bidirectional_span is not None:
        start, end = bidirectional_span
        if not 0 <= start < end <= prefix_len:
            raise ValueError(f"bidirectional span {bidirectional_span} is not inside the {prefix_len}-token prefix")
        block = in_prefix & (pos >= start) & (pos < end)
        allowed = allowed | (block[:, :, None] & block[:, None, :])

    def with_window(window):
        m = allowed if window is None else allowed & sliding_window_overlay(window)(None, None, q_pos, kv_pos)
        return m[:, None]

    types = list(getattr(config, "layer_types", None) or [])
    if "sliding_attention" in types:
        masks = {"full_attention": with_window(None), "sliding_attention": with_window(config.sliding_window)}
    elif getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and types == []:
        raise ValueError("a sliding-window model without layer_types is not supported by the packed pass")
    else:
        masks = with_window(None)
    return masks, pos


#: take the pure-causal fast path (pass_masks) whenever it is provably exact; tests switch
#: it off to compare with the masked path
CAUSAL_FAST_PATH = True
CAUSAL_ATTENTION = "medvlm_causal"
SPLIT_ATTENTION = "medvlm_split"
_SPLIT_ATTR = "_medvlm_split_prefix_len"


def causal_prefix(config, bidirectional_span=None) -> bool:
    """True when packed_masks' prefix block is plain causal attention whatever the packing: no
    bidirectional span, every layer full attention (no sliding window, no other layer type)."""
    types = list(getattr(config, "layer_types", None) or [])
    return not (bidirectional_span is not None or getattr(config, "sliding_window", None)
                or set(types) - {"full_attention"})  # fmt: skip


def pure_causal(config, layout: PackedLayout, bidirectional_span=None) -> bool:
    """True when packed_masks' mask equals plain causal attention at every real (non-pad)
    token: every row holds at most one question, its pads after its last real token (so
    under causal attention no real token sees a pad, and the prefix + question are positions
    0 .. n - 1 as the mask has them), no bidirectional span and every layer full attention
    (no sliding window, no other layer type). Host-side, no device work."""
    if not causal_prefix(config, bidirectional_span):
        return False
    owner = layout.owner  # [K, W], -1 for pads
    real = owner >= 0
    one_question = ((owner == owner[:, :1]) | ~real).all()
    pads_last = (real[:, 1:] <= real[:, :-1]).all()  # no real token after a pad
    return bool(one_question and pads_last)


def _causal_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' SDPA attention with is_causal=True (flash / cuDNN kernels, forward and
    backward). No mask function is registered under CAUSAL_ATTENTION, so transformers builds
    no mask (nor inspects the position ids: no host sync) and hands None. query [b, h, T, d],
    key/value [b, kv_h, T, d] -> ([b, T, h, d], None)."""
    if attention_mask is not None or key.shape[2] != query.shape[2]:
        raise RuntimeError("the causal fast path received a mask or a cache: it is not a pure-causal pass")
    return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True,
                                  **kwargs)  # fmt: skip


@contextlib.contextmanager
def causal_attention(configs: Sequence) -> Iterator[None]:
    """Every config's attention on _causal_attention for the block (each restored after)."""
    AttentionInterface.register(CAUSAL_ATTENTION, _causal_attention)
    if CAUSAL_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        raise RuntimeError(f"a mask function is registered under {CAUSAL_ATTENTION!r}: masks would be built")
    with attention_installed(CAUSAL_ATTENTION, configs):
        yield


def _split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Packed rows whose prefix attends plainly causally (causal_prefix): the P prefix queries
    on SDPA's is_causal kernel over the prefix keys (flash / cuDNN, forward and backward), the
    W packed question queries under their rows of the block mask over all keys. The same as
    SDPA under the whole mask (prefix queries never see a packed key). query [b, h, T, d],
    key/value [b, kv_h, T, d], attention_mask [b, 1, T, T] bool -> ([b, T, h, d], None)."""
    p = getattr(module, _SPLIT_ATTR)
    if attention_mask is None or attention_mask.dtype != torch.bool or key.shape[2] != query.shape[2]:
        raise RuntimeError("the split attention needs the packed pass's boolean mask and no cache")
    head, _ = sdpa_attention_forward(module, query[:, :, :p], key[:, :, :p], value[:, :, :p], None, dropout=dropout,
                                     scaling=scaling, is_causal=True, **kwargs)  # fmt: skip
    tail, _ = sdpa_attention_forward(module, query[:, :, p:], key, value, attention_mask[:, :, p:], dropout=dropout,
                                     scaling=scaling, is_causal=False, **kwargs)  # fmt: skip
    return torch.cat([head, tail], dim=1), None


@contextlib.contextmanager
def split_attention(configs: Sequence, attention_modules: Sequence[torch.nn.Module], prefix_len: int) -> Iterator[None]:
    """Every config's attention on _split_attention (prefix of prefix_len tokens) for the
    block; the 4-D boolean mask the caller passes reaches it unchanged. Each restored after."""
    AttentionInterface.register(SPLIT_ATTENTION, _split_attention)
    AttentionMaskInterface.register(SPLIT_ATTENTION, sdpa_mask)
    with attention_installed(SPLIT_ATTENTION, configs, [(m, _SPLIT_ATTR, prefix_len) for m in attention_modules]):
        yield


def pass_masks(config, layout: PackedLayout, prefix_len: int, device, bidirectional_span=None,
               attention_modules: Sequence[torch.nn.Module] = (), split: bool = False):  # fmt: skip
    """packed_masks, or one of its fast paths. -> (mask, position_ids [K, T], context): run the
    decoder (its backward too, where checkpointed layers recompute) inside context.

    The fast paths are taken when CAUSAL_FAST_PATH and config and every module of
    attention_modules (the decoder's self-attention; none given: never) run on "sdpa". With
    pure_causal(...): mask is None, the position ids are 0 .. T - 1 in every row (the pads' own
    positions change; no real token sees a pad) and context puts the decoder on
    _causal_attention. Else, with split and causal_prefix(...): packed_masks' mask and
    position ids, and context puts the decoder on _split_attention. Otherwise packed_masks'
    (mask, position_ids) and a null context."""
    configs = [config, *(m.config for m in attention_modules)]
    sdpa = CAUSAL_FAST_PATH and len(configs) > 1 and all(c._attn_implementation == "sdpa" for c in configs)
    fast = sdpa and pure_causal(config, layout, bidirectional_span)
    if not fast:
        mask, pos = packed_masks(config, layout, prefix_len, device, bidirectional_span)
        if sdpa and split and causal_prefix(config, bidirectional_span):
            return mask, pos, split_attention(configs, attention_modules, prefix_len)
        return mask, pos, contextlib.nullcontext()
    k_studies, width = layout.owner.shape
    pos = to_device(torch.arange(prefix_len + width).repeat(k_studies, 1), device)
    return None, pos, causal_attention(configs)


def score_packed(
    *,
    forward: Callable,
    head: Callable[[torch.Tensor], torch.Tensor],
    attention_modules: Sequence[torch.nn.Module],
    config,
    n_studies: int,
    prefix_len: int,
    suffixes: Sequence[Sequence[int]],
    query_positions: Sequence[Sequence[int]],
    prefix_rows: Sequence[int],
    pad_id: int,
    image_span: tuple[int, int] | None,
    layers: tuple[int, ...],
    head_mode: str,
    answer_tokens: AnswerTokens,
    bidirectional_span: tuple[int, int] | None = None,
    device=None,
    decoder_layers: Sequence[torch.nn.Module] = (),
) -> PackedScores:
    """Score Q questions of K studies in one forward.

    forward          (suffix_ids [K, W], position_ids [K, T], mask) -> hidden [K, T, d], T = P + W:
                     runs the decoder on each study's prefix (P tokens, image included)
                     followed by its packed suffixes (see the module docstring). mask is None
                     in a control pass (layers ()) that pass_masks finds pure causal (one
                     question per study, no image block, no sliding layer): the decoder then
                     runs under pass_masks' context (plain causal SDPA)
    config           the text config (layer_types, sliding_window)
    suffixes         Q token lists that follow the prefix
    query_positions  Q lists of positions within each suffix whose attention rows are kept
                     (the answering token is len(suffix) - 1)
    prefix_rows      Q study indices in [0, K): which study each question belongs to
    image_span       (start, end) absolute positions of the image tokens in the prefix; None
                     with layers == () (a control pass: logits only, no attention captured)
    bidirectional_span  prefix positions that attend to each other both ways (Gemma3's image)
    decoder_layers   the decoder's layers: when given (and layers), PackedScores.image_norms
                     holds each study's image-token norms entering each layer read
    """
    n = len(suffixes)
    if len(query_positions) != n:
        raise ValueError(f"expected {n} query position lists, found {len(query_positions)}")
    for s, q in zip(suffixes, query_positions, strict=True):
        if not s:
            raise ValueError("every suffix needs at least one token")
        if max(q) >= len(s) or min(q) < 0:
            raise ValueError(f"query position {max(q)} outside a suffix of {len(s)} tokens")
    if layers and (image_span is None or not 0 <= image_span[0] < image_span[1] <= prefix_len):
        raise ValueError(f"image span {image_span} is not inside the {prefix_len}-token prefix")
    rows = [int(r) for r in prefix_rows]
    if len(rows) != n:
        raise ValueError(f"expected {n} prefix rows, found {len(rows)}")
    if max(rows) >= n_studies or min(rows) < 0:
        raise ValueError(f"prefix row {max(rows)} outside a pass of {n_studies} studies")
    layout = pack_suffixes(suffixes, rows, n_studies, pad_id)
    width = layout.suffix_ids.shape[1]
    # a control pass (no rows captured) of one question per study may run plain causal attention
    modules = () if layers else attention_modules
    mask, position_ids, causal = pass_masks(config, layout, prefix_len, device, bidirectional_span, modules)
    # capture: every question's query tokens, gathered per study row (absolute positions)
    per_study_q: list[list[int]] = [[] for _ in range(n_studies)]
    q_owner: list[list[int]] = [[] for _ in range(n_studies)]
    for r, (k, q) in enumerate(zip(rows, query_positions, strict=True)):
        per_study_q[k].extend(prefix_len + layout.start_of[r] + int(t) for t in q)
        q_owner[k].extend([r] * len(q))
    # everything the reading-out needs is on the device before the forward is launched: the
    # host never waits on the GPU until the caller reads the results (tests/test_gpu.py checks)
    last_k = to_device(torch.tensor(rows), device)
    last_t = to_device(torch.tensor([prefix_len + layout.start_of[r] + len(suffixes[r]) - 1 for r in range(n)]), device)
    suffix_ids = to_device(layout.suffix_ids, device)
    if not layers:  # a control pass: the answers' logits only
        with causal:
            hidden = forward(suffix_ids, position_ids, mask)
        logits = head(hidden[last_k, last_t]).float()
        p_yes, coverage = yes_probability(logits, answer_tokens)
        none = torch.zeros((n, 0), device=logits.device)
        return PackedScores(logits, p_yes, coverage, none[:, :, None], none, (), torch.zeros(n, dtype=torch.long))
    q_index, q_valid = query_tensors([q or [0] for q in per_study_q], device)
    q_valid &= to_device(torch.tensor([[bool(q)] for q in per_study_q]), device)
    spec = CaptureSpec(
        layers=layers,
        query_index=q_index,
        query_valid=q_valid,
        key_span=image_span,
        n_keys=prefix_len + width,
        head_mode=head_mode,
        causal_prefix=prefix_len if bidirectional_span is None and _window_covers(config, prefix_len) else 0,
    )
    # average each question's query rows: a [Q, K * nq] averaging matrix
    nq = q_index.shape[1]
    avg = torch.zeros((n, n_studies * nq))  # built on the host: one copy, not a launch per entry
    for k in range(n_studies):
        for j, r in enumerate(q_owner[k]):
            avg[r, k * nq + j] = 1.0
    n_query = to_device(avg.sum(1), device)
    avg = to_device(avg / avg.sum(1, keepdim=True), device)
    norms = capture_resid_norms(decoder_layers, layers, image_span) if decoder_layers else contextlib.nullcontext()
    with capture_rows(attention_modules, spec) as cap, norms as norm_cap:
        hidden = forward(suffix_ids, position_ids, mask)
    logits = head(hidden[last_k, last_t]).float()
    p_yes, coverage = yes_probability(logits, answer_tokens)
    image_norms = None  # [K, L, n_image]
    if norm_cap is not None:
        image_norms = torch.stack([norm_cap.hook_resid_pre_norm[i] for i in layers], dim=1)
    per_layer, mass = [], []
    for layer in layers:
        pattern = cap.hook_pattern[layer]  # [K, (H,) nq, n_image]
        if pattern.ndim == 4:
            flat = pattern.transpose(1, 2).reshape(n_studies * nq, -1)  # [(K nq), H * n_image]
            per_layer.append((avg @ flat).view(n, pattern.shape[1], pattern.shape[-1]))
        else:
            per_layer.append(avg @ pattern.reshape(n_studies * nq, -1))
        mass.append(avg @ cap.hook_image_mass[layer].reshape(n_studies * nq))
    return PackedScores(
        logits=logits,
        p_yes=p_yes,
        coverage=coverage,
        attention=torch.stack(per_layer, dim=1),
        image_mass=torch.stack(mass, dim=1),
        layers=tuple(layers),
        n_query=n_query.long(),
        image_norms=image_norms,
    )


def score_shared_prefix(*, forward: Callable, prefix_len: int, suffixes: Sequence[Sequence[int]], **common):
    """[n] float64 P(yes) of n suffixes packed one after another behind one shared prefix in a
    single row, logits only (a control pass: no attention captured). forward and the other
    keywords (head, attention_modules, config, pad_id, head_mode, answer_tokens, device,
    bidirectional_span) as score_packed takes them; each suffix's answer is its last token."""
    return score_packed(
        forward=forward, n_studies=1, prefix_len=prefix_len, suffixes=suffixes,
        query_positions=[[len(x) - 1] for x in suffixes], prefix_rows=[0] * len(suffixes), image_span=None,
        layers=(), **common,
    ).p_yes.double().cpu().numpy()  # fmt: skip


def _window_covers(config, prefix_len: int) -> bool:
    """True when no layer's sliding window cuts into a prefix of prefix_len tokens."""
    types = list(getattr(config, "layer_types", None) or [])
    window = getattr(config, "sliding_window", None)
    return "sliding_attention" not in types or window is None or window >= prefix_len

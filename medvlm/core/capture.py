"""Exact attention rows at SDPA's cost.

Eager attention with output_attentions=True materialises every layer's full T x T matrix
and forbids SDPA. Instead, a custom attention function registered with transformers'
AttentionInterface returns SDPA's output and, for the chosen query rows only, computes

    softmax(q_sel . repeat_kv(k)^T * scaling + mask_sel)          in fp32

which is exactly the row eager attention would report. Pitfalls handled here:
- a mask function is registered under the same name (AttentionMaskInterface); without it
  the function silently receives attention_mask=None (no causal mask, no padding);
- the mask function never takes SDPA's "is_causal" shortcut, so the mask always arrives;
- GQA: key/value arrive un-repeated (head h reads KV head h // n_groups);
- sliding-window caches that dropped old keys: rows are left-padded with zeros (those
  keys are masked anyway) so key columns stay absolute positions.

Use:
    with capture_rows(attention_modules, spec) as cap:
        decoder(...)
    cap.hook_pattern[layer]   # [batch, head', query, key_span]  fp32
    cap.hook_image_mass[layer]  # [batch, query]: mass on the key span, mean over heads

and the residual stream's norm over the image span, by forward pre-hooks on the decoder layers:
    with capture_resid_norms(decoder_layers, layers, (start, end)) as norms:
        decoder(...)
    norms.hook_resid_pre_norm[layer]  # [batch, n_span] fp32: ||hidden entering layer `layer`||_2
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from medvlm.core.aggregate import aggregate_heads, check_head_mode

ATTN_IMPLEMENTATION = "medvlm_rows"
_CAPTURE_ATTR = "_medvlm_row_capture"
_CAUSAL_PREFIX_ATTR = "_medvlm_causal_prefix"


def mask_never_skipped(*args, **kwargs):
    """sdpa_mask that always materialises the boolean mask (no is_causal shortcut)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def _row_capture_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # [batch, head, query_pos, head_dim]
    key: torch.Tensor,  # [batch, kv_head, key_pos, head_dim]
    value: torch.Tensor,  # [batch, kv_head, key_pos, head_dim]
    attention_mask: torch.Tensor | None,  # [batch, 1, query_pos, key_pos] bool, True = attend
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA's output; records selected rows when the module carries a RowCapture.

    With a causal prefix P set by capture_rows (the mask's first P rows are plain causal
    over the first P keys and see nothing else), those rows run on SDPA's causal kernel and
    only the remaining rows use the mask: the same attention, without the masked kernel's
    cost over the whole prefix.
    """
    prefix = getattr(module, _CAUSAL_PREFIX_ATTR, 0)
    if prefix and attention_mask is not None and query.shape[2] > prefix:
        assert key.shape[2] == query.shape[2], f"causal prefix needs one key per query, got {key.shape[2]} keys"
        kv_prefix = (key[:, :, :prefix], value[:, :, :prefix])
        head, _ = sdpa_attention_forward(
            module, query[:, :, :prefix], *kv_prefix, None, scaling=scaling, dropout=dropout, is_causal=True, **kwargs
        )
        tail, _ = sdpa_attention_forward(
            module, query[:, :, prefix:], key, value, attention_mask[:, :, prefix:], scaling=scaling, dropout=dropout,
            **kwargs,
        )  # fmt: skip
        out = torch.cat([head, tail], dim=1)  # [batch, query_pos, head, head_dim]
    else:
        out, _ = sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    capture = getattr(module, _CAPTURE_ATTR, None)
    if capture is not None:
        capture._record(module, query, key, attention_mask, scaling)
    return out, None


def register() -> str:
    """Register the attention and mask functions (idempotent). Returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, _row_capture_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, mask_never_skipped)
    return ATTN_IMPLEMENTATION


@dataclass(frozen=True)
class CaptureSpec:
    """What to capture in one forward pass.

    layers        layer indices (module.layer_idx) whose rows are recorded
    query_index   [batch, n_query] long: query positions (in this forward's query axis)
    query_valid   [batch, n_query] bool: which entries of query_index are real
    key_span      (start, end) absolute key positions kept (e.g. the image span), or None
                  for all keys
    n_keys        total key length of this forward (cache + new tokens), so rows from a
                  sliding-window layer whose cache dropped old keys are left-padded
    head_mode     "mean", "max", "entropy" or "none" (see aggregate.aggregate_heads)
    causal_prefix P > 0 promises that the forward's first P query rows attend causally to the
                  first P keys and to nothing else (a packed pass whose prefix mask is plain
                  causal): every layer then runs those rows on SDPA's causal kernel
    """

    layers: tuple[int, ...]
    query_index: torch.Tensor
    query_valid: torch.Tensor
    key_span: tuple[int, int] | None
    n_keys: int
    head_mode: str = "mean"
    causal_prefix: int = 0

    def __post_init__(self):
        check_head_mode(self.head_mode)
        if self.query_index.shape != self.query_valid.shape or self.query_index.ndim != 2:
            raise ValueError(
                f"query_index {tuple(self.query_index.shape)} and query_valid "
                f"{tuple(self.query_valid.shape)} must both be [batch, n_query]"
            )
        if not 0 <= self.causal_prefix < self.n_keys:
            raise ValueError(f"causal prefix {self.causal_prefix} outside [0, {self.n_keys})")
        if self.key_span is not None:
            start, end = self.key_span
            if not 0 <= start < end <= self.n_keys:
                raise ValueError(f"key span {self.key_span} outside [0, {self.n_keys})")


class RowCapture:
    """Holds what the attention function records during one forward pass."""

    def __init__(self, spec: CaptureSpec):
        self.spec = spec
        self.hook_pattern: dict[int, torch.Tensor] = {}  # layer -> [batch, head', query, key_span]
        self.hook_image_mass: dict[int, torch.Tensor] = {}  # layer -> [batch, query]

    def _record(self, module, query, key, attention_mask, scaling) -> None:
        spec = self.spec
        layer = module.layer_idx
        if layer in self.hook_pattern:
            raise RuntimeError(f"layer {layer} recorded twice in one capture")
        if attention_mask is None:
            raise RuntimeError(
                "row capture received no attention mask; the mask function for "
                f"{ATTN_IMPLEMENTATION!r} is not registered"
            )
        if attention_mask.dtype != torch.bool:
            raise RuntimeError(f"expected a boolean mask, got {attention_mask.dtype}")
        batch, n_heads, _, head_dim = query.shape
        idx = spec.query_index.to(query.device)
        q_sel = torch.gather(query, 2, idx[:, None, :, None].expand(batch, n_heads, idx.shape[1], head_dim))
        k_full = repeat_kv(key, n_heads // key.shape[1])
        scale = scaling if scaling is not None else head_dim**-0.5
        scores = torch.matmul(q_sel.float(), k_full.float().transpose(-1, -2)) * scale
        m = attention_mask
        if m.shape[0] != batch:
            m = m.expand(batch, -1, -1, -1)
        m_sel = torch.gather(m, 2, idx[:, None, :, None].expand(batch, 1, idx.shape[1], m.shape[-1]))
        scores = scores.masked_fill(~m_sel, torch.finfo(torch.float32).min)
        probs = torch.softmax(scores, dim=-1)  # [batch, head, n_query, kv_len]
        probs = probs * spec.query_valid.to(probs.device)[:, None, :, None]
        kv_len = probs.shape[-1]
        offset = spec.n_keys - kv_len  # keys a sliding cache dropped: all masked
        assert offset >= 0, f"more keys ({kv_len}) than the forward's total ({spec.n_keys})"
        start, end = spec.key_span if spec.key_span is not None else (0, spec.n_keys)
        lo, hi = max(start - offset, 0), max(end - offset, 0)
        span = probs[..., lo:hi]
        missing = (end - start) - span.shape[-1]
        if missing:
            span = torch.nn.functional.pad(span, (missing, 0))
        self.hook_image_mass[layer] = span.sum(-1).mean(1)
        self.hook_pattern[layer] = aggregate_heads(span, spec.head_mode) if spec.head_mode != "none" else span


@contextlib.contextmanager
def attention_installed(name: str, configs: Sequence, attrs: Sequence[tuple] = ()) -> Iterator[None]:
    """For one block: every distinct config of configs on the registered attention `name`, and
    each (module, attribute, value) of attrs set; all restored after, even when the block fails."""
    unique = list({id(c): c for c in configs}.values())
    saved = [c._attn_implementation for c in unique]
    done = []
    try:
        for c in unique:
            c._attn_implementation = name
        for module, attr, value in attrs:
            setattr(module, attr, value)
            done.append((module, attr))
        yield
    finally:
        for module, attr in done:
            if attr in vars(module):
                delattr(module, attr)
        for c, impl in zip(unique, saved, strict=True):
            c._attn_implementation = impl


@contextlib.contextmanager
def capture_rows(
    attention_modules: Sequence[torch.nn.Module], spec: CaptureSpec
) -> Iterator[RowCapture]:
    """Install row capture on the attention modules of the chosen layers for one forward.

    attention_modules  the decoder's attention modules, each with .layer_idx and .config
                       (the text config whose _attn_implementation they read)
    Always uninstalls, even when the forward fails.
    """
    register()
    by_layer = {m.layer_idx: m for m in attention_modules}
    missing = [i for i in spec.layers if i not in by_layer]
    if missing:
        raise ValueError(f"no attention module for layers {missing}; the model has {len(by_layer)}")
    capture = RowCapture(spec)
    attrs = [(by_layer[i], _CAPTURE_ATTR, capture) for i in spec.layers]
    if spec.causal_prefix:
        attrs += [(m, _CAUSAL_PREFIX_ATTR, spec.causal_prefix) for m in attention_modules]
    with attention_installed(ATTN_IMPLEMENTATION, [m.config for m in attention_modules], attrs):
        yield capture
    got = sorted(capture.hook_pattern)
    if got != sorted(spec.layers):
        raise RuntimeError(f"capture recorded layers {got}, expected {sorted(spec.layers)}")


def attention_modules_of(decoder: torch.nn.Module, attr: str = "self_attn") -> list[torch.nn.Module]:
    """The attention module of each decoder layer (LlamaModel, Gemma3TextModel: .layers[i].self_attn)."""
    mods = [getattr(layer, attr) for layer in decoder.layers]
    for i, m in enumerate(mods):
        if getattr(m, "layer_idx", None) != i:
            raise ValueError(f"attention module {i} has layer_idx {getattr(m, 'layer_idx', None)}")
    return mods



class ResidNormCapture:
    """What capture_resid_norms records during one forward pass.

    hook_resid_pre_norm  layer -> [batch, n_span] float32: the L2 norm over the model dimension
                         of the residual stream entering decoder layer `layer` (its input, the
                         layer's pre-hook; = output_hidden_states' hidden_states[layer]) at each
                         position of the span (the image tokens): the high-norm outliers of
                         "Vision Transformers Need Registers" (Darcet et al., ICLR 2024)
    """

    def __init__(self, layers: Sequence[int], span: tuple[int, int]):
        self.layers = tuple(int(i) for i in layers)
        self.span = span
        self.hook_resid_pre_norm: dict[int, torch.Tensor] = {}

    def _record(self, layer: int, hidden: torch.Tensor) -> None:
        """hidden [batch, T, d] entering the layer -> its span rows' norms [batch, n_span], on the
        device, accumulated in float32 without a float32 copy of the hidden states."""
        if layer in self.hook_resid_pre_norm:
            raise RuntimeError(f"layer {layer} entered twice in one norm capture")
        start, end = self.span
        if hidden.shape[1] < end:
            raise RuntimeError(f"layer {layer} got {hidden.shape[1]} positions, fewer than the span's end {end}")
        self.hook_resid_pre_norm[layer] = torch.linalg.vector_norm(hidden[:, start:end], dim=-1, dtype=torch.float32)


@contextlib.contextmanager
def capture_resid_norms(
    decoder_layers: Sequence[torch.nn.Module], layers: Sequence[int], span: tuple[int, int]
) -> Iterator[ResidNormCapture]:
    """Record each image token's residual-stream norm entering the chosen decoder layers, for one
    forward (hook_resid_pre_norm[layer]  # [batch, n_span]).

    decoder_layers  the decoder's layers in order (LlamaModel / Gemma3TextModel .layers): index i
                    is layer i; each is called with the hidden states [batch, T, d] first
    layers          the layer indices to record
    span            (start, end) positions whose norms are kept (the image tokens)
    The pre-hooks read the input only (no output changes, no host sync) and are always
    removed, even when the forward fails; a layer that did not run is an error.
    """
    start, end = span
    if not 0 <= start < end:
        raise ValueError(f"bad span {span}")
    bad = [i for i in layers if not 0 <= i < len(decoder_layers)]
    if bad:
        raise ValueError(f"no decoder layer {bad}; the decoder has {len(decoder_layers)}")
    capture = ResidNormCapture(layers, span)

    def pre_hook(layer: int):
        def hook(module, args, kwargs):
            capture._record(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    handles = []
    try:
        for i in capture.layers:
            handles.append(decoder_layers[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
        yield capture
    finally:
        for h in handles:
            h.remove()
    got = sorted(capture.hook_resid_pre_norm)
    if got != sorted(capture.layers):
        raise RuntimeError(f"norm capture recorded layers {got}, expected {sorted(capture.layers)}")

"""Gradient-based maps over the image tokens: gradient x input and generic attention relevancy.

Both explain the answer margin at the answering position,

    m = logsumexp(logits[yes ids]) - logsumexp(logits[no ids]) = log(P(yes) / P(no)),

the logit of the renormalised P(yes) the scorer reports (medvlm.core.scoring.yes_probability). With
one yes and one no token id it is the issue's logit(yes) - logit(no); with several (casings,
leading-space forms) the log-sum-exp over each set is what P(yes) itself sums.

gradxinput   (grad_e m * e).sum(hidden) at each image position of the decoder's input
             embeddings e (the projected image features the decoder reads): one signed value
             per image token, stored signed. Positive = raising that token's embedding along
             itself raises P(yes). Toward the answer the model gave, the value is s * gradxinput
             (s = +1 for "yes", -1 for "no"): medvlm.analysis.faithfulness ranks by that.
relevancy    Chefer, Gur and Wolf, "Generic attention-model explainability for interpreting
             bi-modal and encoder-decoder transformers", ICCV 2021, self-attention rule, as
             their code computes it: R = I; for each decoder layer l in order,
             A_bar_l = mean over heads of (grad_A m_t * A)^+ and R = R + A_bar_l R; the map is
             R's row at the answering position over the image columns. The target m_t = s * m
             is the margin of the answer the model gave (their default target: the predicted
             class). Non-negative.

Both are whole-model maps, stored with one layer entry ([1, n_image]; MapReader.get averages
stored layers, which would be a different map had we stored one per layer): gradxinput with
layer index 0 (it is taken at the input of decoder layer 0), relevancy with n_layers - 1
(accumulated through the last layer).

How it is computed (exact, not sampled): one batch row per question, each row its study's
prefix (text, image embeddings, text) and the question's suffix, under the packed pass's masks
(medvlm.core.engine.pass_masks: one question per row). The image embeddings of each row are their
own leaf tensor, so the gradient of sum_r m_r splits into each question's own gradient: rows
never share a leaf. With share_prefix (gradient x input; LLaVA-Rad's default), a pass is one
row instead: one study's prefix once, its questions packed after it under the block mask (as
the scorer packs them), and one backward per question (the prefix's gradient differs per
question, so one backward of the sum would mix them): the forward is paid once per study,
the recomputation and the backward once per question. With questions_per_backward = n > 1, n
of those backwards run as one, vmapped over the questions (torch.autograd.grad with
is_grads_batched=True, the identity as the batched grad_outputs; the backward is linear in
them, so each question's gradient is its own): the graph is walked, and each checkpointed layer
recomputed, once per n questions; the backward's matmuls run on n gradients at once, which is
also the memory it adds. LLaVA-Rad's shared row runs its prefix
queries on SDPA's causal kernel and only the packed questions under the mask
(engine.split_attention). Every decoder layer but the last `uncheckpointed` runs under activation
checkpointing (non-reentrant torch.utils.checkpoint, installed for the pass and removed): the
forward keeps each layer's input only; the backward recomputes one layer at a time. Model
parameters are frozen for the pass (requires_grad restored after), so no weight gradient is
computed or saved for. The answering position is the prompt's last token whatever the
config's query_mode (which chooses the attention rows, not the answer). Two exact speed-ups,
as in the backend's own scoring pass: LLaVA-Rad's rows (one question each, a causal decoder
without sliding layers) need no mask, so gradient x input and the forward-only margins run on
SDPA's is_causal kernels (flash / cuDNN, forward and backward; engine.pass_masks; never
MedGemma's, whose image block attends both ways, nor relevancy's eager attention); and the
decoder's RMS norms run fused (medvlm.core.fused_norms; not for a compiled or float64 model).

Defaults by backend (backend.name), chosen by benchmarks/bench_faithfulness.py's sweep on an
H200 (bf16, full-size random weights; goals: gradient x input <= 3x the same rows' forward
alone, peak memory <= 1.15 x the weights):
    DEFAULT_ROWS             questions per pass: LLaVA-Rad gradient x input 6 (one study's six
                             paraphrases in one shared row, DEFAULT_SHARED_PREFIX; one row per
                             question, 2 were best: T ~1434 is compute-bound already at one
                             row, memory-bound beyond two);
                             MedGemma 8 (T ~300: its forward is host/launch-bound, so more rows
                             per pass bring the gradient pass to compute-bound; 16 rows exceed
                             the memory goal); relevancy 1
    DEFAULT_QUESTIONS_PER_BACKWARD  1 for both (a backward per question: the measured way; the
                             vmapped backward is exact, tested on the CPU, and not yet timed)
    DEFAULT_UNCHECKPOINTED   layers at the end run without checkpointing, per kind: 1 (each
                             further layer saves 1/L of a forward per pass, for one layer's
                             activations per row; the memory goal leaves no room for more at
                             two rows), but 4 for LLaVA-Rad's shared row (one row per pass)
    Measured in two runs on 2026-11-30 (benchmarks/results/2026-11-30-nvidia-h200-faithfulness
    .json and -faithfulness-sweep.json): LLaVA-Rad (R 2, u 1) 3.00x and 3.01x its forward, peak
    1.12x the weights ((1, 6): 2.97x and 3.70x, too unsteady to choose; (2, 6): 2.88x but
    1.26x); MedGemma (8, 1) 2.91x and 2.53x, 1.12x ((16, 1): 2.20x / 2.36x but 1.22x).
    On one H100 on 2026-12-08 (benchmarks/results/2026-12-08-nvidia-h100-x1.log): LLaVA-Rad's
    shared row of 6 questions with 4 layers uncheckpointed took 127.3, 142.7 and 141.1 ms per
    question at 1.12x the weights, one row per question (2, 1) 146.4 ms at 1.12x (beside the
    third; 145.8-147.1 in the day's earlier leases);
    against the forward of one question per row at 6 rows (45.2-45.5 ms) that is 2.80x-3.15x.
    MedGemma (8, 1) 3.24x and 3.37x (26.6 and 27.3 ms, one call 39.6 ms), its forward faster
    since the cast-free bf16 norms (8.1-8.2 ms per question, was 10.2); a shared row is 16x
    there (six small backwards, launch-bound).
Only speed and memory depend on them; every value is the same whatever they are.

Cost per question (T = prefix + suffix tokens, F = one forward of those T tokens):
    gradxinput  forward F + recompute (1 - u/L) F (u = uncheckpointed) + input-only backward
                (about F: every matmul's weight-gradient half is skipped; attention's backward
                costs about 2.5x its forward) = about 3F
    relevancy   the same, with eager attention in every layer (the full [H, T, T] probabilities
                are needed), plus the A_bar product (a row vector times a T x T matrix per layer)
Memory per row (activations, besides the weights): every checkpointed layer's input ([T, d],
in the model dtype) + each uncheckpointed layer's activations + one layer's recomputed
activations (a layer's activations for one row, bf16: LLaVA-Rad about 185 MiB, MedGemma about
38 MiB). An uncheckpointed layer keeps less than autograd would: its RMS norms and its gated
MLP product keep their inputs only and run again in the backward (_Recomputed: the same
kernels, so the same gradient): a Llama layer's kept tensors fall from about 126 to about
88 KiB per token (two float32 norm inputs kept as bf16, the MLP's activation not kept).
The recomputation of a checkpointed layer stops at its last kept tensor (torch's early stop):
LLaVA-Rad's layers are not recomputed past the MLP product, so the down projection (22% of a
layer's matmul work) never runs twice; Gemma3's post-feedforward norm keeps the projection's
output, so MedGemma's are recomputed whole.
Relevancy adds, for the layer being differentiated, the [H, T, T] probabilities (model dtype,
plus the float32 softmax output autograd keeps, plus their gradient and their product):
LLaVA-Rad (H 32, T ~1434) about 0.8 GiB per row; MedGemma (H 8, T ~300) about 20 MiB per row.
Gradient x input per row: LLaVA-Rad about 0.4 GiB of layer inputs + 0.2 GiB per layer not
checkpointed or being recomputed (so 2 rows per pass stay within 1.15 x the weights; estimates,
benchmarks/bench_faithfulness.py measures them); MedGemma about 0.05 GiB of layer inputs +
0.04 GiB per such layer. Images go through the vision tower IMAGE_CHUNK at a time.

    att = attribution_maps(backend, [(image, questions, findings), ...], ("gradxinput", "relevancy"))
    att["gradxinput"]          # [Q, 1, n_image] float32, questions in item order
    att.layers["gradxinput"]   # (0,)
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from medvlm.core.engine import PackedLayout, pack_suffixes, pass_masks, to_device
from medvlm.core.fused_norms import FUSED, fused_rms_norms, module_forward, patched_forwards
from medvlm.core.relevancy import RelevancyRecorder, relevancy_attention
from medvlm.core.store import map_key

#: what --attribution accepts: the scoring pass's own attention plus the gradient maps
ATTRIBUTION_KINDS = ("attention", "gradxinput", "relevancy")
GRADIENT_KINDS = ("gradxinput", "relevancy")
#: rows (questions) per gradient pass when the caller does not say, by backend name
DEFAULT_ROWS = {"llava_rad": {"gradxinput": 6, "relevancy": 1}, "medgemma": {"gradxinput": 8, "relevancy": 1}}
#: decoder layers run without activation checkpointing when the caller does not say, by backend name
DEFAULT_UNCHECKPOINTED = {"llava_rad": {"gradxinput": 4, "relevancy": 1}, "medgemma": {"gradxinput": 1, "relevancy": 1}}
#: gradient x input's passes share each study's prefix among its questions (one row, one
#: backward per question) when the caller does not say, by backend name
DEFAULT_SHARED_PREFIX = {"llava_rad": True, "medgemma": False}
#: gradient x input's questions of one shared row differentiated in one vmapped backward when
#: the caller does not say, by backend name (1: a backward each, the measured default; the
#: vmapped backward is exact, tested, and waits for its GPU timing)
DEFAULT_QUESTIONS_PER_BACKWARD = {"llava_rad": 1, "medgemma": 1}
#: images through the vision tower at once (its activations are the pass's other memory peak)
IMAGE_CHUNK = 8


def parse_attribution(spec: str | Sequence[str]) -> tuple[str, ...]:
    """--attribution's value ("attention,gradxinput" or a list) -> the kinds, in
    ATTRIBUTION_KINDS order. "attention" is always computed by the scoring pass; naming it is
    optional. ValueError for an unknown kind."""
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    unknown = sorted(set(parts) - set(ATTRIBUTION_KINDS))
    if unknown:
        raise ValueError(f"unknown attribution kind(s) {unknown}; valid: {', '.join(ATTRIBUTION_KINDS)}")
    return tuple(k for k in ATTRIBUTION_KINDS if k in parts or k == "attention")


def answer_margin(logits: torch.Tensor, tokens) -> torch.Tensor:
    """logits [n, vocab] -> m [n] = logsumexp(yes logits) - logsumexp(no logits), in float32 or
    wider (float64 stays float64): the logit of medvlm.core.scoring.yes_probability's P(yes)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    yes = to_device(torch.tensor(tokens.yes_ids), x.device)
    no = to_device(torch.tensor(tokens.no_ids), x.device)
    return torch.logsumexp(x.index_select(1, yes), dim=-1) - torch.logsumexp(x.index_select(1, no), dim=-1)


@dataclass(frozen=True)
class Attribution:
    """What attribution_maps returns for Q questions (in item order, questions within items).

    maps     {kind: [Q, 1, n_image] float32}
    layers   {kind: the stored layer index tuple} (gradxinput (0,), relevancy (n_layers - 1,))
    margin   [Q] float64: m = log(P(yes) / P(no)) from the gradient pass's own forward
    p_yes    [Q] float64: sigmoid(margin)
    target   Q "yes" / "no": the answer relevancy explains (given, else from this pass's P(yes))
    """

    maps: dict[str, np.ndarray]
    layers: dict[str, tuple[int, ...]]
    margin: np.ndarray
    p_yes: np.ndarray
    target: tuple[str, ...] = field(default=())

    def __getitem__(self, kind: str) -> np.ndarray:
        return self.maps[kind]

    def select(self, questions: Sequence[int] | slice) -> Attribution:
        """The same for some of the questions (e.g. one study's, to write its maps file)."""
        idx = np.arange(len(self.margin))[questions]
        return Attribution(maps={k: m[idx] for k, m in self.maps.items()}, layers=self.layers,
                           margin=self.margin[idx], p_yes=self.p_yes[idx],
                           target=tuple(self.target[i] for i in idx) if self.target else ())  # fmt: skip

    def store_entries(self, keys: Sequence[tuple[str, int]]) -> dict[str, tuple[tuple[int, ...], np.ndarray]]:
        """{map_key(finding, variant, kind): (layers, map [1, n_image])} for ResultsStore.write_study,
        keys = the Q questions' (finding, variant_id)."""
        if len(keys) != len(self.margin):
            raise ValueError(f"{len(keys)} keys for {len(self.margin)} questions")
        return {map_key(f, v, kind): (self.layers[kind], m[q]) for kind, m in self.maps.items()
                for q, (f, v) in enumerate(keys)}  # fmt: skip


# -- the two backends' pieces ---------------------------------------------------------------
class _Pieces:
    """What a gradient pass needs from one backend: prompt pieces, image embeddings, the
    decoder, the head. The only backend-specific code of this module."""

    def __init__(self, backend):
        self.backend = backend
        self.answer_tokens = backend.answer_tokens

    @property
    def norms(self) -> Sequence[torch.nn.Module]:
        """The decoder's RMS norms to run fused (medvlm.core.fused_norms), as the backend's own
        scoring pass does: none for a compiled backend (compile fuses them) or a float64 model
        (the fused forwards compute in float32)."""
        b = self.backend
        if getattr(b, "compiled", False) or self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return ()
        return getattr(b, "_norms", None) or ()

    def prompt(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(ids before the image, ids after the image within the prefix, suffix ids)."""
        raise NotImplementedError

    def image_embeddings(self, images) -> torch.Tensor:
        """8-bit RGB PIL images -> [K, n_image, d] in the model dtype, no graph: the backend's
        own image_embeddings on its own pixel_values."""
        with torch.no_grad():
            return self.backend.image_embeddings(self.backend.pixel_values(images))


class _LLaVARadPieces(_Pieces):
    def __init__(self, backend):
        super().__init__(backend)
        backend._require_loaded()
        self.device, self.dtype = backend.device, backend.dtype
        self.config = backend.model.config
        self.pad_id = backend.pad_id
        self.decoder_layers = list(backend.model.model.layers)
        self.attention = backend._attention
        self.n_image = backend.n_image_tokens
        self.bidirectional = False

    def prompt(self, question):
        t = self.backend._tokens(question)
        return tuple(t.prefix_ids), (), tuple(t.suffix_ids)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backend.model.model.embed_tokens(ids)

    def decode(self, embeds, mask, position_ids):
        return self.backend.model.model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                        use_cache=False).last_hidden_state  # fmt: skip

    def head(self, hidden):
        return self.backend.model.lm_head(hidden)

    def frozen(self):
        b = self.backend
        return [b.model, b.vision, b.projector]


class _MedGemmaPieces(_Pieces):
    def __init__(self, backend):
        super().__init__(backend)
        param = next(backend.model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.config = backend.model.config.get_text_config()
        self.pad_id = backend.processor.tokenizer.pad_token_id
        self.decoder_layers = list(backend._decoder.layers)
        self.attention = backend._attention
        self.n_image = backend.facts.mm_tokens_per_image
        self.bidirectional = True

    def prompt(self, question):
        e = self.backend._prompt(question)
        start, end = e["span"]
        return tuple(e["prefix"][:start]), tuple(e["prefix"][end:]), tuple(e["suffix"])

    def check(self, question: str) -> None:
        """The backend's own once-per-question check of our ids against the processor's."""
        self.backend._check_against_processor(self.backend._prompt(question), question)

    def embed(self, ids):
        return self.backend.model.model.get_input_embeddings()(ids)

    def decode(self, embeds, mask, position_ids):
        return self.backend._language(embeds, mask, position_ids)

    def head(self, hidden):
        return self.backend._head(hidden)

    def frozen(self):
        return [self.backend.model]


def pieces_of(backend) -> _Pieces:
    """The gradient pass's view of a loaded backend (LLaVA-Rad or MedGemma)."""
    kinds = {"llava_rad": _LLaVARadPieces, "medgemma": _MedGemmaPieces}
    if getattr(backend, "name", None) not in kinds:
        raise ValueError(f"gradient maps are implemented for {sorted(kinds)}, not {getattr(backend, 'name', None)!r}")
    return kinds[backend.name](backend)


# -- machinery --------------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_parameters(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """requires_grad False on every parameter for the block, each flag restored after."""
    params = [p for m in modules if m is not None for p in m.parameters()]
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)


def _checkpointed(forward):
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=False,
                                                 **kwargs)  # fmt: skip

    return run


def checkpointed_layers(layers: Sequence[torch.nn.Module]):
    """Each decoder layer's forward under non-reentrant activation checkpointing, for one block."""
    return patched_forwards((layer, _checkpointed(layer.forward)) for layer in layers)


class _Recomputed(torch.autograd.Function):
    """fn(*xs) whose backward keeps only xs and runs fn again under autograd to differentiate
    it: the same gradient as autograd's (the same kernels on the same inputs), without the
    intermediates autograd would keep (a fused RMS norm's float32 copy of its input, the
    MLP's activation beside the two projections it multiplies), for one more elementwise
    pass in the backward. Used in the layers run without checkpointing, so that each costs
    less memory and more of them fit."""

    @staticmethod
    def forward(ctx, fn, *xs):
        ctx.fn = fn
        ctx.save_for_backward(*xs)
        return fn(*xs)

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[1:]
        xs = [x.detach().requires_grad_(need) for x, need in zip(ctx.saved_tensors, needs, strict=True)]
        wanted = [x for x in xs if x.requires_grad]
        with torch.enable_grad():
            out = ctx.fn(*xs)
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return (None, *(next(grads) if x.requires_grad else None for x in xs))


def _lean_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # the float32 form in the forward too (which runs without a gradient recorded), so that the
    # backward's recomputation is the same function on the same input
    return _Recomputed.apply(functools.partial(FUSED[type(norm).__name__], norm, cast_free=False), x)


def _gated_product(mlp: torch.nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return mlp.act_fn(gate) * up


def _lean_mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP / Gemma3MLP.forward, down(act(gate(x)) * up(x)), with the product recomputed."""
    product = _Recomputed.apply(functools.partial(_gated_product, mlp), mlp.gate_proj(x), mlp.up_proj(x))
    return mlp.down_proj(product)


def lean_layers(layers: Sequence[torch.nn.Module], norms: Sequence[torch.nn.Module]):
    """For one block: in each of layers, its fused RMS norms (those of norms inside it) and its
    gated MLP keep only their inputs for the backward (_Recomputed). -> (context, the norms
    outside layers, left to the caller to fuse)."""
    inside = {id(m) for layer in layers for m in layer.modules()}
    patches = [(n, module_forward(n, _lean_norm)) for n in norms if id(n) in inside]
    for layer in layers:
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            patches.append((mlp, module_forward(mlp, _lean_mlp)))
    return patched_forwards(patches), [n for n in norms if id(n) not in inside]


# -- the pass -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rows:
    """Q questions in K batch rows: their ids and each row's study's image embeddings. owner:
    the row of each question (packed one after another after the row's prefix); () for one
    question per row (K = Q)."""

    before: tuple[int, ...]
    after: tuple[int, ...]
    suffixes: list[tuple[int, ...]]
    image: torch.Tensor  # [K, n_image, d]
    owner: tuple[int, ...] = ()

    def owners(self) -> list[int]:
        return list(self.owner) if self.owner else list(range(len(self.suffixes)))


@dataclass(frozen=True)
class _RowPass:
    """The packed pass's inputs for R rows (one question per row) and the context the
    decoder runs in (forward and backward): the pure-causal fast path's, or a null one."""

    layout: PackedLayout
    prefix_len: int
    mask: object  # [R, 1, T, T] bool, {layer type: mask}, or None (pure causal)
    position_ids: torch.Tensor  # [R, T]
    context: contextlib.AbstractContextManager


def _row_pass(pc: _Pieces, rows: _Rows, fast: bool = True) -> _RowPass:
    """The masks of R rows (engine.pass_masks: with fast, plain causal attention when the
    rows' mask is provably that, e.g. LLaVA-Rad's rows; never for MedGemma's image block)."""
    start = len(rows.before)
    prefix_len = start + pc.n_image + len(rows.after)
    layout = pack_suffixes(rows.suffixes, rows.owners(), rows.image.shape[0], pc.pad_id)
    span = (start, start + pc.n_image) if pc.bidirectional else None
    mask, pos, context = pass_masks(pc.config, layout, prefix_len, pc.device, span, pc.attention if fast else (),
                                    split=fast)  # fmt: skip
    return _RowPass(layout, prefix_len, mask, pos, context)


def _forward_rows(pc: _Pieces, rows: _Rows, leaf: torch.Tensor, rp: _RowPass):
    """Logits margin of each question: the decoder over each row's [before, image (leaf), after,
    its questions' suffixes] under the row pass's masks (run inside rp.context).
    -> (margin [Q], answer positions [Q] within their rows, T)."""
    n_rows = leaf.shape[0]
    layout, prefix_len, mask, position_ids = rp.layout, rp.prefix_len, rp.mask, rp.position_ids
    ids = lambda x: to_device(torch.tensor([list(x)], dtype=torch.long), pc.device)  # noqa: E731
    parts = [pc.embed(ids(rows.before)).expand(n_rows, -1, -1), leaf.to(pc.dtype)]
    if rows.after:
        parts.append(pc.embed(ids(rows.after)).expand(n_rows, -1, -1))
    parts.append(pc.embed(to_device(layout.suffix_ids, pc.device)))
    embeds = torch.cat(parts, dim=1)
    answer = [prefix_len + layout.start_of[q] + len(s) - 1 for q, s in enumerate(rows.suffixes)]
    answer = to_device(torch.tensor(answer), pc.device)
    owners = to_device(torch.tensor(rows.owners()), pc.device)
    hidden = pc.decode(embeds, mask, position_ids)
    logits = pc.head(hidden[owners, answer])
    return answer_margin(logits, pc.answer_tokens), answer, embeds.shape[1]


def _gradient_rows(pc: _Pieces, rows: _Rows, kind: str | None, target: torch.Tensor | None = None,
                   uncheckpointed: int = 1, together: int = 1):  # fmt: skip
    """One pass over R rows. kind None: margins only (no graph); "gradxinput": [R, n_image];
    "relevancy" (target [R] of +-1, or None for the sign of each row's margin): [R, n_image].
    The last `uncheckpointed` decoder layers keep their activations (no recomputation);
    together: gradient x input's slots per backward (_gradxinput_backwards).
    Returns (margin [R], map or None)."""
    start = len(rows.before)
    if kind is None:
        rp = _row_pass(pc, rows)
        with torch.no_grad(), rp.context, fused_rms_norms(pc.norms):
            return _forward_rows(pc, rows, rows.image, rp)[0], None
    leaf = rows.image.detach().clone().requires_grad_(True)
    n_layers = len(pc.decoder_layers)
    split = n_layers - min(max(int(uncheckpointed), 0), n_layers)
    rp = _row_pass(pc, rows, fast=kind == "gradxinput")  # relevancy's eager attention needs the mask
    lean, other_norms = lean_layers(pc.decoder_layers[split:], pc.norms)
    with (frozen_parameters(pc.frozen()), torch.enable_grad(), rp.context, fused_rms_norms(other_norms), lean,
          checkpointed_layers(pc.decoder_layers[:split])):  # fmt: skip
        if kind == "gradxinput":
            m, _, _ = _forward_rows(pc, rows, leaf, rp)
            return m.detach(), _gradxinput_backwards(m, leaf, rows.owners(), together)
        if kind != "relevancy":
            raise ValueError(f"unknown gradient map kind {kind!r}; valid: {', '.join(GRADIENT_KINDS)}")
        prefix_len = start + pc.n_image + len(rows.after)
        t = prefix_len + max(len(s) for s in rows.suffixes)  # the packed rows' length
        answer = torch.tensor([prefix_len + len(s) - 1 for s in rows.suffixes])
        recorder = RelevancyRecorder(answer.to(pc.device), t, n_layers, kept=range(split, n_layers))
        with relevancy_attention(pc.attention, recorder):
            m, answer_fwd, t_fwd = _forward_rows(pc, rows, leaf, rp)
            if t_fwd != t or not torch.equal(answer_fwd.cpu(), answer):
                raise RuntimeError("relevancy: the answer positions differ from the forward's layout")
            sign = target.to(m.device, m.dtype) if target is not None else torch.where(m >= 0, 1.0, -1.0).to(m.dtype)
            recorder.phase = "backward"
            torch.autograd.grad((sign * m).sum(), leaf)
        if recorder.done != list(range(len(pc.decoder_layers)))[::-1]:
            raise RuntimeError(f"relevancy: layers {recorder.done} were differentiated, expected all, last first")
        return m.detach(), recorder.row[:, start : start + pc.n_image]


def _gradxinput_backwards(m: torch.Tensor, leaf: torch.Tensor, owner: list[int], together: int = 1) -> torch.Tensor:
    """Each question's (grad_e m_q * e).sum(hidden) over its row's image embeddings e (leaf
    [K, n_image, d]; m [Q], owner [Q] its row). Slot j is the j-th question of every row; one
    slot's gradient is one backward of the sum of its margins (rows never share a leaf, so each
    row's gradient is its own question's; questions of one row share it, hence a slot each).
    together: slots differentiated in one backward, vmapped over them
    (torch.autograd.grad(is_grads_batched=True): one output per slot, the identity as the
    batched grad_outputs): the graph, and under checkpointing its recomputation, is walked once
    for those slots instead of once per slot, at the memory of `together` gradients at a time.
    The same gradients as one backward each (the backward is linear in its grad_outputs).
    -> [Q, n_image]."""
    slot, seen = [], {}
    for r in owner:
        slot.append(seen.get(r, 0))
        seen[r] = slot[-1] + 1
    acc = torch.promote_types(leaf.dtype, torch.float32)
    out = torch.empty((len(owner), leaf.shape[1]), dtype=acc, device=leaf.device)
    n_slots = max(slot) + 1
    together = max(1, min(int(together), n_slots))
    for lo in range(0, n_slots, together):
        group = range(lo, min(lo + together, n_slots))
        # index tensors on the device (a Python list as an index is copied there blocking: a host sync)
        qs = [[q for q, s in enumerate(slot) if s == j] for j in group]
        index = [to_device(torch.tensor(x), leaf.device) for x in qs]
        sums = [m.index_select(0, q_index).sum() for q_index in index]
        retain = group[-1] < n_slots - 1
        if len(group) == 1:
            grads = torch.autograd.grad(sums[0], leaf, retain_graph=retain)[0][None]
        else:
            eye = torch.eye(len(group), dtype=m.dtype, device=m.device)
            (grads,) = torch.autograd.grad(torch.stack(sums), leaf, eye, retain_graph=retain, is_grads_batched=True)
        for grad, x, q_index in zip(grads, qs, index, strict=True):
            rows = to_device(torch.tensor([owner[q] for q in x]), leaf.device)
            out.index_copy_(0, q_index, (grad[rows].to(acc) * leaf.detach()[rows].to(acc)).sum(-1))
    return out


def _image_embeddings(pc: _Pieces, images) -> torch.Tensor:
    """[K, n_image, d] of K images, IMAGE_CHUNK at a time through the vision tower."""
    image = torch.cat([pc.image_embeddings(images[i : i + IMAGE_CHUNK]) for i in range(0, len(images), IMAGE_CHUNK)])
    if image.shape[1] != pc.n_image:
        raise RuntimeError(f"expected {pc.n_image} image embeddings per image, found {image.shape[1]}")
    return image


def _images_of(image: torch.Tensor, study: list[int], idx: list[int]) -> torch.Tensor:
    """[len(idx), n_image, d]: the image embeddings of questions idx (study[i]: question i's
    image), indexed without a host sync."""
    return image[to_device(torch.tensor([study[i] for i in idx]), image.device)]


def attribution_maps(
    backend,
    items: Sequence[tuple],
    kinds: Sequence[str] = ("gradxinput",),
    *,
    rows_per_pass: int | dict | None = None,
    answers: Sequence[str] | None = None,
    uncheckpointed: int | None = None,
    share_prefix: bool | None = None,
    questions_per_backward: int | None = None,
) -> Attribution:
    """Gradient maps for every question of several studies.

    backend        a loaded LLaVARadMedical or MedGemmaMedical (its prompts, image embeddings,
                   decoder and head are used as they are; nothing is changed on it, parameters'
                   requires_grad flags are restored)
    items          as score_many: [(image, questions, findings or None), ...]
    kinds          a non-empty subset of GRADIENT_KINDS (each computed in its own passes, so a
                   map never depends on which other kinds were asked for)
    rows_per_pass  questions per gradient pass (an int for every kind, or {kind: int});
                   default DEFAULT_ROWS[backend.name]. Only memory and speed change, never a value.
    answers        the Q answers ("yes"/"no") relevancy explains, e.g. the scoring pass's; by
                   default the sign of this pass's own margin
    uncheckpointed the last decoder layers run without activation checkpointing (default
                   DEFAULT_UNCHECKPOINTED[backend.name][kind]; at least the last layer, whose
                   recomputation would follow its forward at once): each saves one layer's
                   recomputation per pass and costs one layer's activations per row. Values
                   never change.
    share_prefix   gradient x input only: each pass is one batch row holding up to
                   rows_per_pass questions of one study after one copy of its prefix, with one
                   backward per question (default DEFAULT_SHARED_PREFIX[backend.name]); else one
                   row per question. Values never change.
    questions_per_backward  gradient x input with share_prefix: that many of a row's questions
                   differentiated in one backward, vmapped over them (is_grads_batched), so the
                   graph and its checkpointed layers' recomputation are walked once for them
                   instead of once per question; memory: that many gradients at a time
                   (default DEFAULT_QUESTIONS_PER_BACKWARD[backend.name]). Values never change.
    returns        Attribution: maps {kind: [Q, 1, n_image] float32}, margin, p_yes, target
    """
    kinds = tuple(dict.fromkeys(kinds))
    bad = sorted(set(kinds) - set(GRADIENT_KINDS))
    if not kinds or bad:
        raise ValueError(f"kinds must be a non-empty subset of {GRADIENT_KINDS}, got {list(kinds)}")
    pc = pieces_of(backend)
    items = backend.checked_items(items)
    questions = [(k, q) for k, (_, qs, _) in enumerate(items) for q in qs]
    if answers is not None:
        answers = [str(a) for a in answers]
        if len(answers) != len(questions) or set(answers) - {"yes", "no"}:
            raise ValueError(f"answers must be {len(questions)} values 'yes' / 'no', one per question")
    prompts = []
    for _, q in questions:
        if isinstance(pc, _MedGemmaPieces):
            pc.check(q)
        prompts.append(pc.prompt(q))
    before, after = prompts[0][0], prompts[0][1]
    for (_, q), p in zip(questions, prompts, strict=True):
        if p[:2] != (before, after):
            raise ValueError(f"question {q!r} does not share the image prefix of the first question")
    image = _image_embeddings(pc, [im for im, _, _ in items])
    study = [k for k, _ in questions]
    maps, margin = {}, None
    for kind in kinds:
        u = DEFAULT_UNCHECKPOINTED[backend.name][kind] if uncheckpointed is None else uncheckpointed
        size = rows_per_pass.get(kind) if isinstance(rows_per_pass, dict) else rows_per_pass
        size = int(size or DEFAULT_ROWS[backend.name][kind])
        if size < 1:
            raise ValueError(f"rows_per_pass must be >= 1, got {size}")
        shared = kind == "gradxinput" and (DEFAULT_SHARED_PREFIX[backend.name] if share_prefix is None
                                           else bool(share_prefix))  # fmt: skip
        together = int(questions_per_backward or DEFAULT_QUESTIONS_PER_BACKWARD[backend.name])
        if together < 1:
            raise ValueError(f"questions_per_backward must be >= 1, got {together}")
        out, ms = [], []
        for idx in _passes([k for k, _ in questions], size, shared):
            suffixes = [prompts[i][2] for i in idx]
            if shared:
                rows = _Rows(before, after, suffixes, _images_of(image, study, idx[:1]), owner=(0,) * len(idx))
            else:
                rows = _Rows(before, after, suffixes, _images_of(image, study, idx))
            target = None
            if answers is not None:
                target = torch.tensor([1.0 if answers[i] == "yes" else -1.0 for i in idx])
            m, value = _gradient_rows(pc, rows, kind, target, u, together)
            out.append(value.float())  # read once after the last pass: no pass waits on the GPU
            ms.append(m.double())
        maps[kind] = torch.cat(out)[:, None, :].cpu().numpy()
        margin = torch.cat(ms).cpu().numpy() if margin is None else margin
    layers = {"gradxinput": (0,), "relevancy": (len(pc.decoder_layers) - 1,)}
    target = tuple(answers) if answers is not None else tuple("yes" if x >= 0 else "no" for x in margin)
    return Attribution(maps=maps, layers={k: layers[k] for k in kinds}, margin=margin,
                       p_yes=1.0 / (1.0 + np.exp(-margin)), target=target)  # fmt: skip


def _passes(study: list[int], size: int, shared: bool) -> list[list[int]]:
    """Question indices of each pass: consecutive runs of at most size questions; with shared,
    never two studies in one pass."""
    cuts = [i for i in range(1, len(study)) if shared and study[i] != study[i - 1]]
    out = []
    for lo, hi in zip([0, *cuts], [*cuts, len(study)], strict=True):
        out += [list(range(a, min(a + size, hi))) for a in range(lo, hi, size)]
    return out


def attribution_margins(backend, items: Sequence[tuple], rows_per_pass: int = 4) -> np.ndarray:
    """[Q] float64: each question's margin m from the gradient pass's forward alone (no graph,
    the same rows and masks): the forward-only cost the benchmark compares with, and a check
    that the rows reproduce the scorer's P(yes)."""
    pc = pieces_of(backend)
    items = backend.checked_items(items)
    questions = [(k, q) for k, (_, qs, _) in enumerate(items) for q in qs]
    prompts = [pc.prompt(q) for _, q in questions]
    image = _image_embeddings(pc, [im for im, _, _ in items])
    study = [k for k, _ in questions]
    out = []
    for lo in range(0, len(questions), rows_per_pass):
        idx = list(range(lo, min(lo + rows_per_pass, len(questions))))
        rows = _Rows(prompts[0][0], prompts[0][1], [prompts[i][2] for i in idx], _images_of(image, study, idx))
        out.append(_gradient_rows(pc, rows, None)[0].double())
    return torch.cat(out).cpu().numpy()

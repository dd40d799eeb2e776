"""Fused RMSNorm forwards for the eager decoders, installed for one pass and always removed.

transformers' Gemma3RMSNorm and LlamaRMSNorm run as six to eight elementwise kernels each
(cast, pow, mean, add, rsqrt, two muls, cast): on an H200 a quarter of MedGemma's non-matmul
decoder time. torch.nn.functional.rms_norm computes the same normalisation in one kernel; the
weight is applied as each class applies it (Gemma3: x_hat * (1 + w) in float32, then cast;
Llama: w * x_hat cast to the input dtype), so the functions are the same up to float32
rounding in the reduction (checked against the modules in tests/test_fused_norms.py).
`--compile` fuses these norms itself, so the compiled path does not install them.

Differentiated (the attribution passes), F.rms_norm falls back to its composite form (pow,
mean, add, rsqrt, mul, each recorded with its backward); _FusedRMSNorm keeps the one fused
kernel forward, which also returns rstd, and gives x its gradient in closed form from x and
rstd. (torch also has a fused backward kernel on CUDA, aten._fused_rms_norm_backward: not used
until it has run against this closed form on a GPU, tests/test_gpu.py.)

    with fused_rms_norms(norm_modules(model)):
        model(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F


def _gemma_weight(norm: torch.nn.Module) -> torch.Tensor:
    """1 + w in float32, cached until the weight changes (one kernel less per call)."""
    w = norm.weight
    key = (w.data_ptr(), w._version, w.device, w.dtype)
    cached = getattr(norm, "_medvlm_one_plus_w", None)
    if cached is None or cached[0] != key:
        cached = (key, 1.0 + w.detach().float())
        norm._medvlm_one_plus_w = cached
    return cached[1]


class _FusedRMSNorm(torch.autograd.Function):
    """y = x * rstd (* weight), rstd = rsqrt(mean(x^2, -1) + eps), differentiable in x only
    (weight frozen or None). x [..., d]; rstd [..., 1] is kept for the backward, with x.
    dx = rstd * (g - x_hat * mean(g * x_hat, -1)), g = dy (* weight), x_hat = x * rstd."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)
        ctx.save_for_backward(x, rstd.reshape(*x.shape[:-1], 1), weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, rstd, weight = ctx.saved_tensors
        g = dy if weight is None else dy * weight
        x_hat = x * rstd
        return rstd * (g - x_hat * (g * x_hat).mean(-1, keepdim=True)), None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """F.rms_norm over the last dimension; where autograd records it (x needs a gradient, the
    weight none), through _FusedRMSNorm instead of F.rms_norm's composite form."""
    if torch.is_grad_enabled() and x.requires_grad and (weight is None or not weight.requires_grad):
        return _FusedRMSNorm.apply(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def gemma_rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma3RMSNorm.forward: (x_hat * (1 + w)) in float32, cast to x's dtype. x [..., d]."""
    return rms_norm(x.float(), _gemma_weight(norm), norm.eps).type_as(x)


def llama_rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward: w * (x_hat cast to x's dtype). x [..., d]."""
    return norm.weight * rms_norm(x.float(), None, norm.variance_epsilon).to(x.dtype)


FUSED: dict[str, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {
    "Gemma3RMSNorm": gemma_rms_norm,
    "LlamaRMSNorm": llama_rms_norm,
}


def norm_modules(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The RMSNorm modules under root that have a fused forward (float weights only)."""
    return [m for m in root.modules() if type(m).__name__ in FUSED and m.weight.is_floating_point()]


def module_forward(module: torch.nn.Module, fn: Callable) -> Callable:
    """x -> fn(module, x) as module's forward, made once per module and function and kept on
    the module (compiled callers then see the same forward object on every pass)."""
    cache = vars(module).setdefault("_medvlm_forwards", {})
    if fn not in cache:
        cache[fn] = lambda x: fn(module, x)
    return cache[fn]


@contextlib.contextmanager
def patched_forwards(patches: Iterable[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Give each module the paired forward for the duration of the block; always restores
    the class's forward, even when the block fails."""
    done = []
    try:
        for module, forward in patches:
            module.forward = forward
            done.append(module)
        yield
    finally:
        for module in done:
            if "forward" in vars(module):
                del module.forward


def fused_rms_norms(norms: Iterable[torch.nn.Module]) -> contextlib.AbstractContextManager:
    """The fused forward on each of norms (see norm_modules) for one block."""
    return patched_forwards((m, module_forward(m, FUSED[type(m).__name__])) for m in norms)

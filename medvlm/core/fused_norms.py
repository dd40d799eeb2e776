"""Fused RMSNorm forwards for the eager decoders, installed for one pass and always removed.

transformers' Gemma3RMSNorm and LlamaRMSNorm run as six to eight elementwise kernels each
(cast, pow, mean, add, rsqrt, two muls, cast): on an H200 a quarter of MedGemma's non-matmul
decoder time. torch.nn.functional.rms_norm computes the same normalisation in one kernel; the
weight is applied as each class applies it (Gemma3: x_hat * (1 + w) in float32, then cast;
Llama: w * x_hat cast to the input dtype), so the functions are the same up to float32
rounding in the reduction (checked against the modules in tests/test_fused_norms.py).
`--compile` fuses these norms itself, so the compiled path does not install them.

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


def gemma_rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma3RMSNorm.forward: (x_hat * (1 + w)) in float32, cast to x's dtype. x [..., d]."""
    return F.rms_norm(x.float(), norm.weight.shape, _gemma_weight(norm), norm.eps).type_as(x)


def llama_rms_norm(norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward: w * (x_hat cast to x's dtype). x [..., d]."""
    return norm.weight * F.rms_norm(x.float(), norm.weight.shape, None, norm.variance_epsilon).to(x.dtype)


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

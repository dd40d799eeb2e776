"""Fused RMSNorm forwards for the eager decoders, installed for one pass and always removed.

transformers' Gemma3RMSNorm and LlamaRMSNorm run as six to eight elementwise kernels each
(cast, pow, mean, add, rsqrt, two muls, cast): on an H200 a quarter of MedGemma's non-matmul
decoder time. torch.nn.functional.rms_norm computes the same normalisation in one kernel; the
weight is applied as each class applies it (Gemma3: x_hat * (1 + w) in float32, then cast;
Llama: w * x_hat cast to the input dtype), so the functions are the same up to float32
rounding in the reduction (checked against the modules in tests/test_fused_norms.py).
`--compile` fuses these norms itself, so the compiled path does not install them.

A half-precision input with no gradient recorded (every scoring pass) goes to the kernel as it
is: the kernel reads bf16, reduces and scales in float32 and rounds once on writing, so the
float32 copy of the hidden states and the cast back (two full-size kernels per norm, 408 per
MedGemma pass) are not needed. Llama's x_hat is then the same as the module's up to the
reduction's rounding; Gemma3's 1 + w is rounded to the input dtype before it scales in float32
(the module scales by the float32 1 + w and rounds once): within bf16's own rounding of the
output (tests/test_fused_norms.py bounds it against the float32 function). With a gradient
recorded (the attribution passes), the float32 copy is kept, as in the modules.

    with fused_rms_norms(norm_modules(model)):
        model(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

_HALF = (torch.bfloat16, torch.float16)


def _cast_free(x: torch.Tensor) -> bool:
    """Whether x goes to the kernel in its own dtype: half precision and no gradient recorded."""
    return x.dtype in _HALF and not (torch.is_grad_enabled() and x.requires_grad)


def _kernel(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """torch's fused RMS norm kernel itself (F.rms_norm may take its composite form, which
    computes on a float32 copy). x [..., d], weight [d] of x's dtype or None."""
    return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)[0]


def _gemma_weight(norm: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """1 + w computed in float32 (then rounded to dtype), cached until the weight changes (one
    kernel less per call)."""
    w = norm.weight
    key = (w.data_ptr(), w._version, w.device, w.dtype, dtype)
    cached = getattr(norm, "_medvlm_one_plus_w", None)
    if cached is None or cached[0] != key:
        cached = (key, (1.0 + w.detach().float()).to(dtype))
        norm._medvlm_one_plus_w = cached
    return cached[1]


def gemma_rms_norm(norm: torch.nn.Module, x: torch.Tensor, cast_free: bool | None = None) -> torch.Tensor:
    """Gemma3RMSNorm.forward: (x_hat * (1 + w)) in float32, cast to x's dtype. x [..., d];
    cast_free: whether x goes to the kernel in its own dtype (default _cast_free(x))."""
    if _cast_free(x) if cast_free is None else cast_free:
        return _kernel(x, _gemma_weight(norm, x.dtype), norm.eps)
    return F.rms_norm(x.float(), norm.weight.shape, _gemma_weight(norm), norm.eps).type_as(x)


def llama_rms_norm(norm: torch.nn.Module, x: torch.Tensor, cast_free: bool | None = None) -> torch.Tensor:
    """LlamaRMSNorm.forward: w * (x_hat cast to x's dtype). x [..., d]; cast_free as above."""
    if _cast_free(x) if cast_free is None else cast_free:
        return norm.weight * _kernel(x, None, norm.variance_epsilon)
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

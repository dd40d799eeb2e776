"""Kernel-level measurements behind MedGemma's pass (GPU): which SigLIP attention kernel,
whether the MLP's GELU can ride on the matmul, and where the pass's kernel time goes.

    python benchmarks/bench_kernels.py                 # all three parts, MedGemma-4B shapes
    python benchmarks/bench_kernels.py --parts attention gelu
    python benchmarks/bench_kernels.py --smoke         # tiny shapes on the CPU: checks the script

attention  SigLIP's self-attention at 896 px (K images x 16 heads x 4096 patches x head size 72),
           q/k/v laid out as SiglipAttention makes them (projection output viewed and
           transposed): SDPA as transformers calls it, each SDPA backend forced, and the head
           size zero-padded (exact: padded columns add 0 to q.k and give 0 output columns).
           Median ms over repeats (CUDA events), TFLOP/s of the unpadded work, max |diff|
           against an fp32 reference.
gelu       fc1 + tanh-GELU (SigLIP's MLP): linear then gelu, cuBLASLt's GELU epilogue
           (torch._addmm_activation), and torch.compile of the pair.
patch      the patch-embedding convolution: cuDNN's default choice, cudnn.benchmark, unfold + matmul.
rmsnorm    Gemma3's RMSNorm in eager against F.rms_norm (one pass's tokens).
rmsnorm_grad  LlamaRMSNorm differentiated in x, as gradient x input runs it (2 rows of LLaVA-Rad's
           ~1,434 tokens x 4,096, bf16 in): forward + backward ms and x's gradient's max |diff|
           from a float64 reference for the module and fused_norms' form (F.rms_norm, composite
           under autograd). (A fused backward, closed form or torch's CUDA kernel, was measured
           on 2026-12-08 and not kept: benchmarks/results/2026-12-08-nvidia-h100-x1-faithfulness.log.)
pass       the kernels of one backend pass (k studies), the vision tower alone and the whole
           pass, eager and compiled, grouped by kernel name.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_speed import DEVICE, PARAPHRASES, build, images, sync  # noqa: E402

from medvlm.core.config import MedicalAttentionConfig  # noqa: E402


def bench(fn, reps: int = 20) -> float:
    """Median ms of fn() (CUDA events on the GPU, a host clock on the CPU)."""
    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEVICE["name"] == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            import time

            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def attention_part(k: int, heads: int, seq: int, dim: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev, dt = DEVICE["name"], torch.bfloat16
    width = heads * dim
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(k, seq, width, device=dev, dtype=dt, generator=g)
    w = [torch.randn(width, width, device=dev, dtype=dt, generator=g) * width**-0.5 for _ in range(3)]

    def qkv():  # as SiglipAttention: projection, view, transpose (non-contiguous)
        return [F.linear(x, wi).view(k, seq, heads, dim).transpose(1, 2) for wi in w]

    q, kk, v = qkv()
    scale = dim**-0.5
    flops = 4 * k * heads * seq * seq * dim
    ref = torch.cat([F.scaled_dot_product_attention(q[i : i + 1].float(), kk[i : i + 1].float(),
                                                    v[i : i + 1].float(), scale=scale) for i in range(k)])  # fmt: skip

    def padded(qq, kq, vq, to):
        p = (0, to - dim)
        return F.pad(qq, p), F.pad(kq, p), F.pad(vq, p)

    variants = {"sdpa as transformers calls it": (None, dim)}
    for name, backend in (("cudnn", "CUDNN_ATTENTION"), ("flash", "FLASH_ATTENTION"),
                          ("efficient", "EFFICIENT_ATTENTION")):  # fmt: skip
        for to in (dim, 80, 96, 128):
            if to >= dim:
                variants[f"{name} head {to}"] = (getattr(SDPBackend, backend), to)
    print(f"SigLIP attention [{k}, {heads}, {seq}, {dim}] bf16, {flops / 1e12:.2f} TFLOP per call", flush=True)
    for label, (backend, to) in variants.items():

        def run(backend=backend, to=to):
            qq, kq, vq = (q, kk, v) if to == dim else padded(q, kk, v, to)
            if backend is None:
                out = F.scaled_dot_product_attention(qq, kq, vq, scale=scale)
            else:
                with sdpa_kernel([backend]):
                    out = F.scaled_dot_product_attention(qq, kq, vq, scale=scale)
            return out[..., :dim].transpose(1, 2).contiguous()  # as transformers returns it

        try:
            ms = bench(run)
            diff = float((run().transpose(1, 2).float() - ref).abs().max())
            print(f"  {label:34s} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  max|diff| {diff:.2e}", flush=True)
        except Exception as e:  # a backend that refuses this shape
            print(f"  {label:34s} refused: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        for to in (dim, 80, 128):

            def run_flex(to=to):
                qq, kq, vq = (q, kk, v) if to == dim else padded(q, kk, v, to)
                return flex(qq, kq, vq, scale=scale)[..., :dim].transpose(1, 2).contiguous()

            try:
                ms = bench(run_flex)
                diff = float((run_flex().transpose(1, 2).float() - ref).abs().max())
                print(f"  {'flex_attention head ' + str(to):34s} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  "
                      f"max|diff| {diff:.2e}", flush=True)  # fmt: skip
            except Exception as e:
                print(f"  flex_attention head {to} refused: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    except ImportError:
        pass
    ms = bench(qkv)
    print(f"  (the three projections + views, for scale: {ms:.3f} ms)", flush=True)


def gelu_part(k: int, seq: int, width: int, inner: int) -> None:
    dev, dt = DEVICE["name"], torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(k * seq, width, device=dev, dtype=dt, generator=g)
    w = torch.randn(inner, width, device=dev, dtype=dt, generator=g) * width**-0.5
    b = torch.randn(inner, device=dev, dtype=dt, generator=g) * 0.1
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    pair = lambda: F.gelu(F.linear(x, w, b), approximate="tanh")  # noqa: E731
    variants = {
        "linear then gelu": pair,
        "linear alone": lambda: F.linear(x, w, b),
        "cublasLt GELU epilogue": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
        "torch.compile(linear + gelu)": torch.compile(pair, dynamic=False),
    }
    print(f"fc1 + tanh-GELU [{k * seq} x {width}] @ [{width} x {inner}] bf16", flush=True)
    for label, fn in variants.items():
        try:
            ms = bench(fn)
            diff = float((fn().float() - ref).abs().max()) if label != "linear alone" else float("nan")
            print(f"  {label:34s} {ms:7.3f} ms  max|diff| vs fp32 {diff:.2e}", flush=True)
        except Exception as e:
            print(f"  {label:34s} refused: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)


def patch_part(k: int, size: int, patch: int, width: int) -> None:
    """SigLIP's patch embedding (a stride-14 convolution) as cuDNN runs it by default, with
    cudnn.benchmark, and as unfold + matmul."""
    dev, dt = DEVICE["name"], torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(k, 3, size, size, device=dev, dtype=dt, generator=g)
    w = torch.randn(width, 3, patch, patch, device=dev, dtype=dt, generator=g) * 0.05
    b = torch.randn(width, device=dev, dtype=dt, generator=g) * 0.1
    ref = F.conv2d(x.float(), w.float(), b.float(), stride=patch)
    conv = lambda: F.conv2d(x, w, b, stride=patch)  # noqa: E731

    def unfold():
        cols = F.unfold(x, patch, stride=patch)  # [k, 3 p p, n]
        out = torch.baddbmm(b[:, None], w.view(width, -1).expand(k, -1, -1), cols)
        return out.view(k, width, size // patch, size // patch)

    print(f"patch embedding conv [{k}, 3, {size}, {size}] -> {width} channels, stride {patch}", flush=True)
    saved = torch.backends.cudnn.benchmark
    for label, fn, bench_flag in (("cudnn default", conv, False), ("cudnn.benchmark", conv, True),
                                  ("unfold + matmul", unfold, False)):  # fmt: skip
        torch.backends.cudnn.benchmark = bench_flag
        try:
            ms = bench(fn)
            print(f"  {label:34s} {ms:7.3f} ms  max|diff| vs fp32 {float((fn().float() - ref).abs().max()):.2e}")
        finally:
            torch.backends.cudnn.benchmark = saved


def rmsnorm_part(tokens: int, width: int) -> None:
    """Gemma3's RMSNorm in eager (x.float(), pow, mean, rsqrt, two muls, cast) against
    F.rms_norm with the weight (1 + w) folded in."""
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    dev = DEVICE["name"]
    norm = Gemma3RMSNorm(width, eps=1e-6).to(dev)
    with torch.no_grad():
        norm.weight.normal_(0, 0.1)
    x = torch.randn(tokens, width, device=dev, dtype=torch.bfloat16)
    w1 = 1.0 + norm.weight.float()
    fused = lambda: F.rms_norm(x.float(), (width,), w1, 1e-6).to(x.dtype)  # noqa: E731
    with torch.no_grad():
        ref = norm(x)
        print(f"RMSNorm [{tokens} x {width}] bf16: eager {bench(lambda: norm(x)):.3f} ms, F.rms_norm "
              f"{bench(fused):.3f} ms, max|diff| {float((fused().float() - ref.float()).abs().max()):.2e}", flush=True)


def kernel_table(fn, n: int, rows: int) -> float:
    """Profile n calls of fn; print the top kernels (ms per call); return kernel ms per call."""
    acts = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE["name"] == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    fn()
    sync()
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(n):
            fn()
        sync()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events) / 1e3 / n
    for e in events[:rows]:
        t = e.self_device_time_total / 1e3 / n
        print(f"    {t:8.3f} ms {100 * t / total:5.1f}%  x{e.count // n:<5d} {e.key[:100]}")
    return total


def pass_part(k: int, n: int, rows: int, compile_too: bool) -> None:
    backend, *_ = build("medgemma", torch.bfloat16, MedicalAttentionConfig())
    items = [(im, PARAPHRASES, None) for im in images(k)]
    prep = backend.prepare(items)
    pixels = prep["pixel_values"].to(DEVICE["name"], torch.bfloat16)
    modes = [("eager", None)] + ([("compiled", "compile")] if compile_too else [])
    for label, action in modes:
        if action:
            backend.compile()
            for _ in range(2):
                backend.score_prepared(prep)
        with torch.no_grad():
            print(f"{label}: vision tower + projector alone, {k} images (ms per pass):", flush=True)
            vis = kernel_table(lambda: backend.model.model.get_image_features(pixel_values=pixels), n, rows)
            print(f"  vision kernels {vis:.2f} ms/pass", flush=True)
            print(f"{label}: whole pass, {k} studies (ms per pass):", flush=True)
            tot = kernel_table(lambda: backend.score_prepared(prep), n, rows)
        print(f"  pass kernels {tot:.2f} ms/pass = {tot / k:.2f} ms/study; vision {vis / k:.2f}, "
              f"rest {(tot - vis) / k:.2f} ms/study", flush=True)  # fmt: skip
    backend.unload()


def rmsnorm_grad_part(rows: int, tokens: int, width: int) -> None:
    """See the module docstring: forward + backward of LlamaRMSNorm two ways."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from medvlm.core.fused_norms import FUSED

    dev = DEVICE["name"]
    norm = LlamaRMSNorm(width, eps=1e-5).to(dev).requires_grad_(False)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    torch.manual_seed(0)
    x = torch.randn(rows, tokens, width, device=dev).to(torch.bfloat16).requires_grad_(True)
    g = torch.randn_like(x)
    x64 = x.detach().double().requires_grad_(True)
    y64 = norm.weight.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
    (want,) = torch.autograd.grad(y64, x64, g.double())

    ways = {"module": lambda n, v: n(v), "fused_norms (float32 form under autograd)": FUSED["LlamaRMSNorm"]}
    for name, fn in ways.items():
        step = lambda fn=fn: torch.autograd.grad(fn(norm, x), x, g)[0]  # noqa: E731
        d = float((step().double() - want).abs().max())
        print(f"RMSNorm grad [{rows} x {tokens} x {width}] bf16, {name}: {bench(step):.3f} ms, "
              f"x's gradient max|diff| from float64 {d:.2e}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--parts", nargs="+", default=["attention", "gelu", "patch", "rmsnorm", "rmsnorm_grad", "pass"])
    p.add_argument("--k", type=int, default=8, help="images (studies) per pass")
    p.add_argument("--n", type=int, default=3, help="profiled passes")
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--no_compile", action="store_true")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    seq, heads, dim, width, inner = 4096, 16, 72, 1152, 4304  # SigLIP So400m at 896 px
    if a.smoke:
        DEVICE.update(name="cpu", full_size=False)
        seq, heads, dim, width, inner, a.k = 64, 2, 8, 16, 32, 2
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if DEVICE['name'] == 'cuda' else 'cpu'}")
    if "attention" in a.parts:
        attention_part(a.k, heads, seq, dim)
    if "gelu" in a.parts:
        gelu_part(a.k, seq, width, inner)
    if "rmsnorm" in a.parts:
        rmsnorm_part(a.k * 530, 2560 if not a.smoke else 16)
    if "rmsnorm_grad" in a.parts:
        rmsnorm_grad_part(2, 1434, 4096) if not a.smoke else rmsnorm_grad_part(2, 9, 16)
    if "patch" in a.parts:
        patch_part(a.k, 896 if not a.smoke else 28, 14, width)
    if "pass" in a.parts:
        pass_part(a.k, a.n, a.rows, not a.no_compile)
    return 0


if __name__ == "__main__":
    sys.exit(main())

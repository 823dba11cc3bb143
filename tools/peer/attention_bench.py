#!/usr/bin/env python3
"""PyTorch's own attention kernels at the shapes of benches/gpu_attention.rs, the kernel-level
peer of mlvpt's fused attention (kernels/attention.cu): F.scaled_dot_product_attention on bf16
Q, K, V taken as strided views of one qkv tensor [B, N, 3, h, dh] (timm's layout, no copies, as
mlvpt reads it), forward and backward timed apart by CUDA events.

Backends, each its own JSON line:
  flash      FlashAttention-2 in PyTorch, no mask (it takes none): the same FLOPs without the
             prompt mask, the speed an unmasked FA2 reaches at this shape.
  efficient  the memory-efficient kernel with the prompt mask as a boolean attn_mask [N, N]
             (what timm runs for ML-VPT).
  math       the composite of matrix products and softmax, with the mask (the CPU smoke test).
  cudnn      cuDNN's fused attention, no mask.
  flex       FlexAttention (torch.compile'd) with the prompt mask as a block mask: PyTorch's
             answer to a structured mask, the fairest peer of the masked kernels. Compiles
             first (tens of seconds), so it runs last.
FLOPs as FlashAttention (and the bench) count them: forward 4 B h N^2 dh, backward 2.5x that.

    python tools/peer/attention_bench.py --device cuda --json
    python tools/peer/attention_bench.py --device cpu --shape 2,31,2,64 --iters 2   # smoke test

One JSON line per (shape, backend): {"impl": "torch-sdpa-<backend>", "shape": "B128 h12 N227
P30 dh64", "fwd_us", "bwd_us", "fwd_tflops", "bwd_tflops", "torch", "device"}, or the same with
"error" and null timings when the backend refuses the shape (exit status 0 unless every line
failed). On the CPU only the math backend runs (a smoke test; timings mean nothing).
"""
import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# benches/gpu_attention.rs: (B, N, h, dh), prompts [1, 31).
SHAPES = [(128, 227, 12, 64), (32, 1025, 12, 64), (64, 287, 16, 80)]
PROMPTS = 30


def prompt_mask(n, device):
    """True where a query may attend: a prompt query skips the other prompts' keys."""
    idx = torch.arange(n, device=device)
    p = (idx >= 1) & (idx < 1 + PROMPTS)
    blocked = p[:, None] & p[None, :] & (idx[:, None] != idx[None, :])
    return ~blocked


def timed(fn, iters, device):
    """Median microseconds of fn() over iters runs (after two warm-up runs)."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def run(shape, backend, iters, device):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, n, h, dh = shape
    name = f"B{b} h{h} N{n} P{PROMPTS} dh{dh}"
    line = {"impl": f"torch-sdpa-{backend}", "shape": name, "torch": torch.__version__, "device": device}
    flops = 4.0 * b * h * n * n * dh
    try:
        g = torch.Generator(device=device).manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        qkv = (torch.rand(b, n, 3, h, dh, device=device, generator=g, dtype=torch.float32) * 4 - 2).to(dtype)
        qkv.requires_grad_(True)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [B, h, N, dh] views, as timm's Attention
        dout = torch.rand(b, h, n, dh, device=device, generator=g, dtype=torch.float32).to(dtype)
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            def visible(b_, h_, qi, kj):  # the prompt mask: a prompt query skips the other prompts
                prompt = lambda t: (t >= 1) & (t < 1 + PROMPTS)  # noqa: E731
                return ~(prompt(qi) & prompt(kj) & (qi != kj))

            block_mask = create_block_mask(visible, B=None, H=None, Q_LEN=n, KV_LEN=n, device=device)
            flex = torch.compile(flex_attention)
            fwd = lambda: flex(q, k, v, block_mask=block_mask)  # noqa: E731
            ctx = contextlib.nullcontext()
        else:
            mask = prompt_mask(n, device) if backend in ("efficient", "math") else None
            kind = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]
            fwd = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
            ctx = sdpa_kernel(kind)
        with ctx:
            fwd_us = timed(fwd, iters, device)
            out = fwd()
            # Gradients of the q, k, v views themselves: no stacking pass into qkv's layout.
            bwd = lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)  # noqa: E731
            bwd_us = timed(bwd, iters, device)
        line.update(fwd_us=round(fwd_us, 1), bwd_us=round(bwd_us, 1),
                    fwd_tflops=round(flops / fwd_us / 1e6, 1), bwd_tflops=round(2.5 * flops / bwd_us / 1e6, 1))
    except Exception as e:  # a backend that refuses the shape or the card
        line.update(fwd_us=None, bwd_us=None, fwd_tflops=None, bwd_tflops=None, error=f"{type(e).__name__}: {e}"[:300])
    return line


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--shape", action="append", help="B,N,h,dh (repeatable; default: the bench's shapes)")
    ap.add_argument("--backend", action="append", choices=["flash", "efficient", "cudnn", "flex", "math"],
                    help="repeatable; default flash, efficient, cudnn, flex (math on the CPU)")
    ap.add_argument("--json", action="store_true", help="JSON lines only")
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shape] if args.shape else SHAPES
    for s in shapes:
        if len(s) != 4 or min(s) < 1:
            ap.error(f"--shape {s}: expected B,N,h,dh")
    backends = args.backend or (["flash", "efficient", "cudnn", "flex"] if args.device == "cuda" else ["math"])
    ok = 0
    # flex compiles per shape: after every other backend at every shape.
    order = [(s, be) for s in shapes for be in backends if be != "flex"] + [(s, "flex") for s in shapes if "flex" in backends]
    for s, be in order:
        line = run(s, be, args.iters, args.device)
        ok += "error" not in line
        if args.json:
            print(json.dumps(line), flush=True)
        elif "error" in line:
            print(f"{line['impl']:<22} {line['shape']:<24} error: {line['error']}", flush=True)
        else:
            print(f"{line['impl']:<22} {line['shape']:<24} fwd {line['fwd_us']:>9.1f} us {line['fwd_tflops']:>6.1f} TFLOP/s"
                  f"   bwd {line['bwd_us']:>9.1f} us {line['bwd_tflops']:>6.1f} TFLOP/s", flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

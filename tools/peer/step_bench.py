#!/usr/bin/env python3
"""Training-step throughput of the PyTorch peer (tools/peer/mlvpt_torch.py): ML-VPT on a timm ViT
with random weights (no downloads), one full step = forward, ASL loss, backward, AdamW on the
trainable tensors only (prompts, adapters, gates, classifiers; the backbone is frozen with
requires_grad False). Modes: `eager`, and `compile` (the forward and loss through torch.compile,
backward by AOTAutograd; the optimizer step stays eager). Precisions: `bf16` (autocast, the GPU
comparison) and `fp32` (no autocast, every weight fp32: the CPU comparison with mlvpt's f32 CPU
backend).

    python tools/peer/step_bench.py --model vit_base_patch16_224 --batch 128 --warmup 3 --steps 10 \\
        --mode both --device cuda --json
    python tools/peer/step_bench.py --model tiny --batch 64 --device cpu --precision fp32 \\
        --mode eager --threads 2 --json

--model is a timm model name (timm.create_model) or one of mlvpt bench-step's sizes, built as
timm's VisionTransformer with the same dimensions (src/model/config.rs): `tiny` (the demo
backbone: 32 px, patch 4, D 96, 4 blocks, 4 heads, MLP 384), `vit-s16`, `vit-b16`, `vit-l16`
(224 px, patch 16). The head's defaults (K 80, T 5, E 3, r 5, deep prompts, two branches) are
bench-step's, so the same flags give the same tokens and prompts on both sides.

With --json: exactly one JSON line per mode on stdout,
  {"impl": "torch-eager-bf16" | "torch-compile-bf16" | "torch-eager-fp32" | "torch-compile-fp32",
   "model", "batch", "images_per_s", "ms_per_step", "device", "torch", "timm", ...}
where images_per_s and ms_per_step are the mean over the timed steps (wall time of all of them);
further keys give the median and best single step (ms_per_step_median, ms_per_step_min, named as
bench-step's), the shape (image_size, tokens, prompts, labels, groups, experts) and the step
counts. A mode that fails prints its line with "error" and null timings instead of stopping the
other mode (exit status 1 only when every mode failed).

bf16: the frozen backbone is stored in bf16 by default (--frozen-dtype bf16: no fp32 master is
needed for weights that never change, and autocast would otherwise cast every weight on every
step); trainable tensors are fp32 masters, the loss is computed in fp32. fp32: no autocast, the
backbone in fp32. AdamW is PyTorch's fused one on CUDA (foreach on the CPU), lr 5e-4, betas
(0.9, 0.999), eps 1e-8, weight decay 1e-2. Single steps are timed by CUDA events on the GPU (no
synchronisation between steps) and by the wall clock on the CPU.
"""
import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

# --cpu-isa avx2 caps PyTorch's CPU kernels (ATen's dispatch, oneDNN, MKL) at AVX2 + FMA, so an
# AVX-512 machine measures the peer as an AVX2-only one would run it (mlvpt's AVX2 build:
# `--no-default-features --features train`). The libraries read these variables when they load,
# hence before `import torch`.
CPU_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}
for _i, _arg in enumerate(sys.argv):
    _isa = _arg.split("=", 1)[1] if _arg.startswith("--cpu-isa=") else (
        sys.argv[_i + 1] if _arg == "--cpu-isa" and _i + 1 < len(sys.argv) else None)
    if _isa in CPU_ISA_ENV:
        os.environ.update(CPU_ISA_ENV[_isa])

import timm  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlvpt_torch import AslConfig, HeadConfig, MlVpt, make_vit, random_partition  # noqa: E402

# mlvpt bench-step's --model sizes (src/model/config.rs VitConfig::{demo, vit_s16, vit_b16,
# vit_l16}): timm's VisionTransformer with these dimensions, MLP = 4 D in all four.
SIZES = {
    "tiny": dict(img_size=32, patch_size=4, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0),
    "vit-s16": dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0),
    "vit-b16": dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0),
    "vit-l16": dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0),
}


def make_backbone(a):
    if a.model in SIZES:
        dims = dict(SIZES[a.model])
        if a.image_size:
            dims["img_size"] = a.image_size
        return make_vit(**dims)
    if a.image_size:
        return timm.create_model(a.model, pretrained=False, num_classes=0, img_size=a.image_size)
    return timm.create_model(a.model, pretrained=False, num_classes=0)


def build(a, device):
    torch.manual_seed(a.seed)
    vit = make_backbone(a)
    gen = torch.Generator().manual_seed(a.seed)
    head = HeadConfig(labels=a.labels, groups=a.groups, experts=a.experts, adapter_rank=a.rank,
                      prompt_depth=a.prompt_depth)
    branches = [random_partition(a.labels, a.groups, gen) for _ in range(2)]
    model = MlVpt(vit, head, branches).to(device)
    if a.frozen_dtype == "bf16":
        model.vit.to(torch.bfloat16)
    model.train()
    return model


def run_mode(mode, a, device):
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device visible to torch")
    model = build(a, device)
    trainable = list(model.trainable().values())
    opt = torch.optim.AdamW(trainable, lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                            **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    size = model.vit.patch_embed.img_size
    gen = torch.Generator(device=device).manual_seed(a.seed + 1)
    images = torch.randn(a.batch, 3, size[0], size[1], device=device, generator=gen)
    targets = (torch.rand(a.batch, a.labels, device=device, generator=gen) < 3.0 / a.labels).float()
    asl = AslConfig()

    def forward_loss(x, y):
        return model.loss(x, y, asl)[0]

    fwd = torch.compile(forward_loss, mode=a.compile_mode) if mode == "compile" else forward_loss
    cuda = device.type == "cuda"

    def autocast():
        if a.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step():
        with autocast():
            loss = fwd(images, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(a.warmup):
        loss = step()
    sync()
    if a.warmup and not torch.isfinite(loss).item():
        raise RuntimeError(f"loss is {loss.item()} after warm-up")
    # Each step timed on its own as well (median and best: on a shared machine the best
    # estimates the unloaded speed); the mean stays the wall time of all steps over their count.
    events = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)] if cuda else []
    singles = []
    t0 = time.perf_counter()
    if cuda:
        events[0].record()
    for i in range(a.steps):
        if cuda:
            loss = step()
            events[i + 1].record()
        else:
            ts = time.perf_counter()
            loss = step()
            singles.append(time.perf_counter() - ts)
    sync()
    dt = (time.perf_counter() - t0) / a.steps
    if cuda:
        singles = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(a.steps)]
    return {"images_per_s": a.batch / dt, "ms_per_step": 1e3 * dt,
            "ms_per_step_median": 1e3 * statistics.median(singles), "ms_per_step_min": 1e3 * min(singles),
            "image_size": size[0], "tokens": int(model.mask.shape[0]), "prompts": model.P,
            "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224",
                    help="timm model name (random weights), or tiny|vit-s16|vit-b16|vit-l16 (bench-step's sizes)")
    ap.add_argument("--image-size", type=int, default=0, help="image side (default: the model's)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--mode", choices=["eager", "compile", "both"], default="both")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                    help="bf16: autocast (default); fp32: no autocast, fp32 weights")
    ap.add_argument("--labels", "--classes", dest="labels", type=int, default=80, help="K")
    ap.add_argument("--groups", type=int, default=5, help="T per branch (two branches)")
    ap.add_argument("--experts", type=int, default=3, help="E")
    ap.add_argument("--rank", type=int, default=5, help="adapter bottleneck r")
    ap.add_argument("--prompt-depth", choices=["deep", "shallow"], default="deep")
    ap.add_argument("--frozen-dtype", choices=["bf16", "fp32"], default=None,
                    help="storage of the frozen backbone (default: bf16 with --precision bf16, else fp32)")
    ap.add_argument("--compile-mode", default="default", help="torch.compile mode")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--cpu-isa", choices=["native", "avx2"], default="native",
                    help="cap the CPU kernels at AVX2 + FMA (avx2) or let PyTorch pick (native)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="one JSON line per mode")
    a = ap.parse_args()
    if a.batch < 1 or a.steps < 1 or a.warmup < 0 or a.threads < 0:
        ap.error("need --batch >= 1, --steps >= 1, --warmup >= 0, --threads >= 0")
    if a.precision == "fp32" and a.frozen_dtype == "bf16":
        ap.error("--precision fp32 keeps every weight in fp32: --frozen-dtype bf16 goes with --precision bf16")
    if a.frozen_dtype is None:
        a.frozen_dtype = a.precision
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda_ok = device.type == "cuda" and torch.cuda.is_available()
    name = torch.cuda.get_device_name(device) if cuda_ok else "cpu" if device.type == "cpu" else "none"
    modes = ["eager", "compile"] if a.mode == "both" else [a.mode]
    failures = 0
    for mode in modes:
        row = {"impl": f"torch-{mode}-{a.precision}", "model": a.model, "batch": a.batch, "images_per_s": None,
               "ms_per_step": None, "device": name, "torch": torch.__version__, "timm": timm.__version__}
        try:
            row.update(run_mode(mode, a, device))
        except Exception as e:  # report and go on with the other mode
            failures += 1
            row["error"] = f"{type(e).__name__}: {e}".strip()[:2000]
        finally:
            if cuda_ok:
                torch.cuda.empty_cache()
        row.update(labels=a.labels, groups=a.groups, experts=a.experts, prompt_depth=a.prompt_depth,
                   precision=a.precision, frozen_dtype=a.frozen_dtype, threads=torch.get_num_threads(),
                   cpu_isa=torch.backends.cpu.get_cpu_capability(),
                   warmup=a.warmup, steps=a.steps)
        if a.json:
            print(json.dumps(row), flush=True)
        elif "error" in row:
            print(f"{row['impl']}: {a.model}, batch {a.batch} on {name}: error: {row['error']}", flush=True)
        else:
            print(f"{row['impl']}: {a.model} at {row['image_size']} px ({row['tokens']} tokens, {row['prompts']} "
                  f"prompts, K {a.labels}, T {a.groups}, E {a.experts}), batch {a.batch} on {name}: "
                  f"{row['images_per_s']:.1f} images/s, {row['ms_per_step']:.2f} ms/step mean, "
                  f"{row['ms_per_step_median']:.2f} median, {row['ms_per_step_min']:.2f} best "
                  f"(torch {torch.__version__}, timm {timm.__version__})", flush=True)
    # Non-zero only when no mode ran, so a runner under `set -e` still gets the other rows.
    sys.exit(1 if failures == len(modes) else 0)


if __name__ == "__main__":
    main()

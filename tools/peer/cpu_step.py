#!/usr/bin/env python3
"""One ML-VPT training step in plain PyTorch on the CPU: the speed peer for mlvpt's CPU backend.

Follows SPEC sections 2-5: a frozen timm-style pre-norm ViT (requires_grad False on every
backbone weight; only input gradients flow through it), VPT-deep prompts [L, P, D] with the
prompt-augmented attention mask (a prompt query sees CLS, itself and the patches), per-token
adapters (bottleneck r), label-aware gating over E experts for two branches (correlative and
discriminative partitions), ASL on y+, y-, m+, m- with constant focusing weights, scaled by
1000/(B*K), and AdamW. Times forward + backward + AdamW after warm-up, step by step, and prints images/s (median and
best step, since a shared machine makes single timings noisy) and forward-only inference speed.

    python tools/peer/cpu_step.py                    # both shapes, 2 threads
    python tools/peer/cpu_step.py --shape demo --threads 2 --steps 20

The partitions are random (grouping is not timed); the data is random normal images and 0/1
targets with about 3 positives per image.
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SHAPES = {
    # image 32, patch 4, D 96, 4 layers, 4 heads, MLP 384, batch 64, K 20, T 3, E 2
    "demo": dict(image=32, patch=4, dim=96, depth=4, heads=4, mlp=384, batch=64, labels=20, groups=3, experts=2),
    # ViT-S/16 at 224: D 384, 12 layers, 6 heads, MLP 1536, batch 8, K 80, T 5, E 3
    "vits": dict(image=224, patch=16, dim=384, depth=12, heads=6, mlp=1536, batch=8, labels=80, groups=5, experts=3),
}


class Block(nn.Module):
    def __init__(self, d, heads, mlp):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x, mask):
        b, n, d = x.shape
        h = self.norm1(x)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # mask: True = may attend
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))  # exact erf GELU


class MlVpt(nn.Module):
    def __init__(self, s, branches):
        super().__init__()
        d, p, L = s["dim"], s["patch"], s["depth"]
        T, E, K, r = s["groups"], s["experts"], s["labels"], 5
        self.P = len(branches) * T * E
        npatch = (s["image"] // p) ** 2
        # Frozen backbone.
        self.patch_embed = nn.Conv2d(3, d, p, stride=p)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 1 + npatch, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, s["heads"], s["mlp"]) for _ in range(L))
        self.norm = nn.LayerNorm(d, eps=1e-6)
        for w in self.parameters():
            w.requires_grad_(False)
        # Trainable: prompts (VPT init), adapters, gates, classifiers.
        v = math.sqrt(6.0 / (3 * p * p + d))
        self.prompts = nn.Parameter(torch.empty(L, self.P, d).uniform_(-v, v))
        a1, a2 = nn.Linear(d, r), nn.Linear(r, d)  # default Linear init, repeated per token
        self.w1 = nn.Parameter(a1.weight.detach().repeat(self.P, 1, 1))
        self.b1 = nn.Parameter(a1.bias.detach().repeat(self.P, 1))
        self.w2 = nn.Parameter(a2.weight.detach().repeat(self.P, 1, 1))
        self.b2 = nn.Parameter(a2.bias.detach().repeat(self.P, 1))
        u = 1.0 / math.sqrt(d)
        nb = len(branches)
        self.gates = nn.Parameter(torch.empty(nb, E, K, d).uniform_(-u, u))
        self.cls_w = nn.Parameter(torch.empty(nb, K, d).uniform_(-u, u))
        self.cls_b = nn.Parameter(torch.empty(nb, K).uniform_(-u, u))
        # Token of (branch s, group g, expert e) = s*T*E + T*e + g, gathered per (label, expert).
        tok = torch.stack([
            torch.tensor([[si * T * E + T * e + g[k] for e in range(E)] for k in range(K)])
            for si, g in enumerate(branches)
        ])
        self.register_buffer("tok", tok)  # [branches, K, E]
        n = 1 + self.P + npatch
        mask = torch.ones(n, n, dtype=torch.bool)
        mask[1:1 + self.P, 1:1 + self.P] = torch.eye(self.P, dtype=torch.bool)
        self.register_buffer("mask", mask)

    def forward(self, img):
        b = img.shape[0]
        x = self.patch_embed(img).flatten(2).transpose(1, 2) + self.pos[:, 1:]
        cls = (self.cls + self.pos[:, :1]).expand(b, -1, -1)
        x = torch.cat([cls, x], 1)
        for l, blk in enumerate(self.blocks):
            pr = self.prompts[l].unsqueeze(0).expand(b, -1, -1)
            rest = x[:, 1:] if l == 0 else x[:, 1 + self.P:]
            x = blk(torch.cat([x[:, :1], pr, rest], 1), self.mask)
        z = self.norm(x)[:, 1:1 + self.P]  # [B, P, D]
        hid = F.gelu(torch.einsum("bpd,prd->bpr", z, self.w1) + self.b1)
        adapted = z + torch.einsum("bpr,pdr->bpd", hid, self.w2) + self.b2
        ys, ms = [], []
        for s in range(self.tok.shape[0]):
            tok = self.tok[s]  # [K, E]
            zs = z[:, tok]  # [B, K, E, D]
            q = torch.einsum("bked,ekd->bke", zs, self.gates[s])
            a = q.softmax(-1)
            ms.append((a * q).sum(-1))
            f = (a.unsqueeze(-1) * adapted[:, tok]).sum(2)  # [B, K, D]
            ys.append((f * self.cls_w[s]).sum(-1) + self.cls_b[s])
        return ys, ms


def asl(x, y, gamma_neg=2.0, gamma_pos=0.0, clip=0.0, eps=1e-5):
    """Sum of the per-label ASL from logits, focusing weights constant in the gradient."""
    p = torch.sigmoid(x)
    log_p = F.logsigmoid(x).clamp(min=math.log(eps))
    if clip > 0:
        log_n = (torch.sigmoid(-x) + clip).clamp(max=1).log().clamp(min=math.log(eps))
    else:
        log_n = F.logsigmoid(-x).clamp(min=math.log(eps))
    with torch.no_grad():
        w_pos = torch.sigmoid(-x).pow(gamma_pos)
        w_neg = (p - clip).clamp(min=0).pow(gamma_neg)
    return -(y * w_pos * log_p + (1 - y) * w_neg * log_n).sum()


def run(name, s, steps, warmup, seed):
    torch.manual_seed(seed)
    K, T = s["labels"], s["groups"]
    # Two random partitions into T non-empty groups (label k -> group), as the grouping would give.
    branches = []
    for _ in range(2):
        g = torch.randperm(K) % T
        branches.append(g.tolist())
    model = MlVpt(s, branches)
    params = [w for w in model.parameters() if w.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    B = s["batch"]
    img = torch.randn(B, 3, s["image"], s["image"])
    tgt = (torch.rand(B, K) < 3.0 / K).float()
    scale = 1000.0 / (B * K)

    def step():
        ys, ms = model(img)
        loss = sum(asl(y, tgt) + asl(m, tgt) for y, m in zip(ys, ms)) * scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for _ in range(warmup):
        step()
    # Each step timed alone: on a shared machine the best step estimates the unloaded speed and
    # the median the typical one. CPU seconds (all threads of this process) are reported too.
    walls, cpus = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    # Inference (forward only, no autograd), for the predict/eval path.
    infer = []
    with torch.no_grad():
        model(img)
        for _ in range(steps):
            t0 = time.perf_counter()
            model(img)
            infer.append(time.perf_counter() - t0)
    med = statistics.median
    n_train = sum(w.numel() for w in params)
    n_frozen = sum(w.numel() for w in model.parameters() if not w.requires_grad)
    res = dict(shape=name, threads=torch.get_num_threads(), steps=steps,
               step_s_median=med(walls), step_s_best=min(walls),
               images_per_s_median=B / med(walls), images_per_s_best=B / min(walls),
               images_per_cpu_s=B / med(cpus),
               infer_images_per_s_median=B / med(infer), infer_images_per_s_best=B / min(infer),
               loadavg_1m=os.getloadavg()[0], cpus=os.cpu_count(),
               loss=loss, trainable=n_train, frozen=n_frozen, torch=torch.__version__, **s)
    print(json.dumps(res))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["demo", "vits", "both"], default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=0, help="timed steps (default: 20 demo, 5 vits)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    names = ["demo", "vits"] if a.shape == "both" else [a.shape]
    for n in names:
        steps = a.steps or (20 if n == "demo" else 5)
        r = run(n, SHAPES[n], steps, a.warmup, a.seed)
        print(f"# {n}: train {r['images_per_s_median']:.1f} images/s median, {r['images_per_s_best']:.1f} best "
              f"(batch {r['batch']}, {r['threads']} threads, {r['steps']} steps, "
              f"{r['images_per_cpu_s']:.1f} images per CPU-second); inference "
              f"{r['infer_images_per_s_median']:.1f} median, {r['infer_images_per_s_best']:.1f} best; "
              f"load average {r['loadavg_1m']:.1f} on {r['cpus']} CPUs")


if __name__ == "__main__":
    main()

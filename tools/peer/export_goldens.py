#!/usr/bin/env python3
"""Goldens for tests/peer_golden.rs: tiny ML-VPT / VPT models run by the timm-based peer
(tools/peer/mlvpt_torch.py) in float64 with autograd.

For each case, two files under OUT (default tests/data/peer_golden):
  <case>.timm.safetensors    the backbone, timm's own state dict (timm's names, float32), read
                             by mlvpt's `load_timm`
  <case>.golden.safetensors  float32 inputs: `param.<name>` (the trainable tensors under mlvpt's
                             names), `images` [B, C, H, W], `targets` [B, K];
                             float64 outputs: `logits` [B, K], `loss` [1], `grad.<name>`;
                             metadata: `config` (mlvpt's ModelConfig without `vit`, JSON),
                             `branches` (label -> group per partition, JSON), `asl` (AslConfig,
                             JSON), `heads`, `generator`.
Every input is rounded to float32 before the float64 computation, so mlvpt computes from exactly
the same numbers.

    /work/venv-torch/bin/python tools/peer/export_goldens.py [OUT]
"""
import json
import sys
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mlvpt_torch import AslConfig, HeadConfig, MlVpt, make_vit, random_partition  # noqa: E402

# Awkward sizes: image 15 with patch 5 (3x3 patches of 75 values), width 12 in 3 heads of 4,
# MLP 21 (ratio 1.75), 3 layers, K 7 labels, T 3 groups, r 3, batch 3.
VIT = dict(img_size=15, patch_size=5, embed_dim=12, depth=3, num_heads=3, mlp_ratio=1.75)
CASES = [
    dict(name="mlvpt_deep_label_two_branches_layerscale",
         vit=dict(VIT, layer_scale=0.3, final_norm=True),
         head=HeadConfig(labels=7, groups=3, experts=2, adapter_rank=3, gate="label", method="mlvpt",
                         prompt_depth="deep"),
         branches=2, asl=AslConfig()),
    dict(name="mlvpt_shallow_group_e3_one_branch_no_final_norm_exact_asl",
         vit=dict(VIT, layer_scale=None, final_norm=False),
         head=HeadConfig(labels=7, groups=3, experts=3, adapter_rank=3, gate="group", method="mlvpt",
                         prompt_depth="shallow"),
         branches=1, asl=AslConfig(gamma_neg=4.0, gamma_pos=1.0, clip=0.05, exact_grad=True)),
    dict(name="mlvpt_deep_label_one_expert_two_branches",
         vit=dict(VIT, layer_scale=None, final_norm=True),
         head=HeadConfig(labels=7, groups=2, experts=1, adapter_rank=2, gate="label", method="mlvpt",
                         prompt_depth="deep", loss_scale=10.0),
         branches=2, asl=AslConfig()),
    dict(name="vpt_deep",
         vit=dict(VIT, layer_scale=None, final_norm=True),
         head=HeadConfig(labels=7, method="vpt", prompt_depth="deep", vpt_prompts=5),
         branches=1, asl=AslConfig()),
]
BATCH = 3


def lively(vit, gen):
    """timm's init is tiny (std 0.02, class token 1e-6); scale it up so that every path of the
    blocks matters in the gradients."""
    with torch.no_grad():
        for n, p in vit.named_parameters():
            u = 2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1
            if "norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.3 * u)
            elif n.endswith("gamma"):
                p.copy_(0.5 + 0.3 * u)
            elif n.endswith("bias"):
                p.copy_(0.1 * u)
            elif n == "cls_token":
                p.copy_(0.5 * u)
            else:
                p.mul_(10)


def to_f32_exact(t):
    return t.detach().to(torch.float32).contiguous()


def export(case, out: Path, seed: int):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vit = make_vit(**case["vit"])
    lively(vit, gen)
    head: HeadConfig = case["head"]
    K = head.labels
    branches = [random_partition(K, head.groups, gen) for _ in range(case["branches"])]
    model = MlVpt(vit, head, branches)
    with torch.no_grad():
        for p in model.trainable().values():  # a little livelier than the SPEC init
            p.mul_(1.5)
    # Round every input to f32 once, then compute in f64 from exactly those values.
    backbone = {k: to_f32_exact(v) for k, v in vit.state_dict().items()}
    save_file(backbone, str(out / f"{case['name']}.timm.safetensors"))
    params = {k: to_f32_exact(v) for k, v in model.trainable().items()}
    images = to_f32_exact(2 * torch.rand(BATCH, 3, vit.patch_embed.img_size[0], vit.patch_embed.img_size[1],
                                         generator=gen) - 1)
    targets = (torch.rand(BATCH, K, generator=gen) < 0.4).to(torch.float32)

    model = model.double()
    with torch.no_grad():
        model.vit.load_state_dict({k: v.double() for k, v in backbone.items()})
        for k, p in model.trainable().items():
            p.copy_(params[k].double())
    model.eval()
    loss, logits = model.loss(images.double(), targets.double(), case["asl"])
    loss.backward()
    top = max(abs(logits).max().item(), *(abs(y).max().item() for y in model(images.double())[1]))
    assert top < 9.0, f"{case['name']}: logits up to {top}: too close to the ASL clamp at log(eps)"

    tensors = {f"param.{k}": v for k, v in params.items()}
    tensors.update(images=images, targets=targets, logits=logits.detach().contiguous(),
                   loss=loss.detach().reshape(1))
    for k, p in model.trainable().items():
        assert p.grad is not None and p.grad.abs().max() > 0, f"{case['name']}: {k} gets no gradient"
        tensors[f"grad.{k}"] = p.grad.detach().contiguous()
    cfg = head.to_json()
    meta = {
        "config": json.dumps(cfg),
        "branches": json.dumps(branches if head.method == "mlvpt" else []),
        "asl": json.dumps(case["asl"].to_json()),
        "heads": str(case["vit"]["num_heads"]),
        "generator": f"tools/peer/export_goldens.py, torch {torch.__version__}, timm {timm.__version__}, float64",
    }
    path = out / f"{case['name']}.golden.safetensors"
    save_file(tensors, str(path), metadata=meta)
    print(f"{path}: loss {loss.item():.6f}, |logits| <= {top:.2f}, "
          f"{sum(v.numel() for v in tensors.values())} values")


def main():
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/peer_golden")
    out.mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(CASES):
        export(case, out, 100 + i)


if __name__ == "__main__":
    main()

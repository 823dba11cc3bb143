"""Golden for tests/timm_golden.rs: a tiny ViT built and run by timm itself.

Writes OUT/timm_tiny.safetensors (timm's state dict, f32, with its classifier head) and
OUT/timm_tiny.json: input images, shallow VPT prompts, the outputs of both blocks computed by
timm's own modules in float64 (sequence [CLS, prompts, patches], prompt queries masked from
the other prompts' keys, SPEC 2), and timm's resample_abs_pos_embed of pos_embed to 24 and 8 px.

    /work/venv-torch/bin/python tools/peer/timm_golden.py tests/data/timm_tiny
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
m = VisionTransformer(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0,
                      init_values=0.3, num_classes=5).eval()
with torch.no_grad():
    # Lively weights so every path matters (timm's init is tiny).
    for n, p in m.named_parameters():
        if "norm" in n and n.endswith("weight"):
            p.copy_(1 + 0.3 * (2 * torch.rand_like(p) - 1))
        elif n.endswith("gamma"):
            p.copy_(0.5 + 0.3 * (2 * torch.rand_like(p) - 1))
        elif n.endswith("bias"):
            p.copy_(0.1 * (2 * torch.rand_like(p) - 1))
        else:
            p.mul_(10)
save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(out / "timm_tiny.safetensors"))

m = m.double()
B, P, D = 2, 3, 16
images = 2 * torch.rand(B, 3, 16, 16, dtype=torch.float64) - 1
prompts = 0.5 * (2 * torch.rand(1, P, D, dtype=torch.float64) - 1)
with torch.no_grad():
    x = m._pos_embed(m.patch_embed(images))  # [B, 1 + 16, D]: CLS and position embeddings
    x = torch.cat([x[:, :1], prompts.expand(B, -1, -1), x[:, 1:]], dim=1)
    n = x.shape[1]
    mask = torch.zeros(n, n, dtype=torch.float64)
    for i in range(1, 1 + P):
        for j in range(1, 1 + P):
            if i != j:
                mask[i, j] = float("-inf")
    h0 = m.blocks[0](x, attn_mask=mask)
    h1 = m.blocks[1](h0, attn_mask=mask)
    # timm's defaults (bicubic, antialias=True), up to 24 px and down to 8 px.
    pe24 = resample_abs_pos_embed(m.pos_embed, new_size=(6, 6), num_prefix_tokens=1)
    pe8 = resample_abs_pos_embed(m.pos_embed, new_size=(2, 2), num_prefix_tokens=1)
golden = {
    "images": images.flatten().tolist(),
    "prompts": prompts.flatten().tolist(),
    "block0": h0.flatten().tolist(),
    "block1_prompt_rows": h1[:, 1:1 + P].flatten().tolist(),
    "pos_embed_24": pe24.flatten().tolist(),
    "pos_embed_8": pe8.flatten().tolist(),
}
(out / "timm_tiny.json").write_text(json.dumps(golden))

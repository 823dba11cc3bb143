#!/usr/bin/env python3
"""Golden values for tests/golden_model.rs: the ML-VPT model of SPEC 2-4 written independently in
PyTorch (float64, autograd), from the inputs that test writes (backbone and trainable tensors,
label partitions, images, targets).

    MLVPT_GOLDEN_INPUTS=/tmp/in.json cargo test --release --test golden_model -- --ignored
    python tools/peer/model_golden.py /tmp/in.json tests/data/model_golden.json
"""
import json
import sys

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)


def asl(x, y, gamma_neg=2.0, gamma_pos=0.0, eps=1e-5):
    """Official AsymmetricLoss (clip 0), focusing weights as constants in the gradient."""
    p = torch.sigmoid(x)
    loss = y * torch.log(p.clamp(min=eps)) + (1 - y) * torch.log((1 - p).clamp(min=eps))
    with torch.no_grad():
        pt = p * y + (1 - p) * (1 - y)
        w = torch.pow(1 - pt, gamma_pos * y + gamma_neg * (1 - y))
    return -(loss * w).sum()


def run(case):
    cfg, vit = case["config"], case["config"]["vit"]
    W = {k: torch.tensor(v["data"]).reshape(v["shape"]) for k, v in case["backbone"].items()}
    P = {k: torch.tensor(v["data"]).reshape(v["shape"]).requires_grad_(True) for k, v in case["params"].items()}
    tables = case["branches"]
    D, p, L, H = vit["dim"], vit["patch"], vit["depth"], vit["heads"]
    K, T, E = cfg["labels"], cfg["groups"], cfg["experts"]
    img = torch.tensor(case["images"]).reshape(-1, vit["channels"], vit["image_size"], vit["image_size"])
    tgt = torch.tensor(case["targets"]).reshape(img.shape[0], K)
    B = img.shape[0]
    prompts = P["prompts"]
    Pn = prompts.shape[1]
    deep = cfg["prompt_depth"] == "deep"

    x = F.conv2d(img, W["patch_embed.proj.weight"], W["patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    x = x + W["pos_embed"][:, 1:]
    cls = (W["cls_token"] + W["pos_embed"][:, :1]).expand(B, -1, -1)
    x = torch.cat([cls, x], 1)
    n = x.shape[1] + Pn
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[1:1 + Pn, 1:1 + Pn] = torch.eye(Pn, dtype=torch.bool)
    for l in range(L):
        if l == 0:
            x = torch.cat([x[:, :1], prompts[0].expand(B, -1, -1), x[:, 1:]], 1)
        elif deep:
            x = torch.cat([x[:, :1], prompts[l].expand(B, -1, -1), x[:, 1 + Pn:]], 1)
        pre = f"blocks.{l}."
        h = F.layer_norm(x, (D,), W[pre + "norm1.weight"], W[pre + "norm1.bias"], 1e-6)
        q, k, v = F.linear(h, W[pre + "attn.qkv.weight"], W[pre + "attn.qkv.bias"]).reshape(B, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5
        att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
        o = (att @ v).transpose(1, 2).reshape(B, n, D)
        a = F.linear(o, W[pre + "attn.proj.weight"], W[pre + "attn.proj.bias"])
        x = x + (W[pre + "ls1.gamma"] * a if vit["layer_scale"] else a)
        h = F.layer_norm(x, (D,), W[pre + "norm2.weight"], W[pre + "norm2.bias"], 1e-6)
        m = F.linear(F.gelu(F.linear(h, W[pre + "mlp.fc1.weight"], W[pre + "mlp.fc1.bias"])), W[pre + "mlp.fc2.weight"], W[pre + "mlp.fc2.bias"])
        x = x + (W[pre + "ls2.gamma"] * m if vit["layer_scale"] else m)
    if vit["final_norm"]:
        x = F.layer_norm(x, (D,), W["norm.weight"], W["norm.bias"], 1e-6)
    z = x[:, 1:1 + Pn]
    scale = cfg["loss_scale"] / (B * K)

    if cfg["method"] == "vpt":
        y = z.mean(1) @ P["head.weight"].T + P["head.bias"]
        logits, loss = y, asl(y, tgt) * scale
    else:
        hid = F.gelu(torch.einsum("bpd,prd->bpr", z, P["adapter.w1"]) + P["adapter.b1"])
        adapted = z + torch.einsum("bpr,pdr->bpd", hid, P["adapter.w2"]) + P["adapter.b2"]
        ys, loss = [], 0.0
        for s, groups in enumerate(tables):
            g = torch.tensor(groups)
            tok = torch.stack([s * T * E + T * e + g for e in range(E)], 1)  # [K, E]
            G = P[f"head{s}.gate"]  # [E, K or T, D]
            Gk = G if cfg["gate"] == "label" else G[:, g]  # [E, K, D]
            qs = torch.einsum("bked,ekd->bke", z[:, tok], Gk)
            A = qs.softmax(-1)
            mlog = (A * qs).sum(-1)
            f = torch.einsum("bke,bked->bkd", A, adapted[:, tok])
            y = torch.einsum("bkd,kd->bk", f, P[f"head{s}.weight"]) + P[f"head{s}.bias"]
            ys.append(y)
            loss = loss + (asl(y, tgt) + asl(mlog, tgt)) * scale
        logits = sum(ys) / len(ys)
    loss.backward()
    return {
        "logits": logits.detach().flatten().tolist(),
        "loss": loss.item(),
        "grads": {k: v.grad.flatten().tolist() for k, v in P.items()},
    }


def main():
    cases = json.load(open(sys.argv[1]))
    out = {c["name"]: run(c) for c in cases}
    out["_generator"] = f"tools/peer/model_golden.py, torch {torch.__version__}, float64"
    json.dump(out, open(sys.argv[2], "w"))
    print(f"wrote {sys.argv[2]}: {', '.join(c['name'] for c in cases)}")


if __name__ == "__main__":
    main()

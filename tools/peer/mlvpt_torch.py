"""ML-VPT (SPEC sections 2-4) in PyTorch on top of timm's VisionTransformer: the peer that judges
mlvpt's numbers (tools/peer/export_goldens.py -> tests/peer_golden.rs) and its speed
(tools/peer/step_bench.py).

The backbone is timm's own module (patch embedding, `_pos_embed`, `Block`s, final norm), frozen:
its weights get `requires_grad_(False)`. Prompts enter between timm's blocks (VPT-deep: the P
prompt outputs of block l-1 are replaced by prompts[l]; VPT-shallow: prompts before block 0 only)
and the prompt mask of SPEC 2 (a prompt query sees CLS, itself and the patches; CLS and patch
queries see every token) goes to each block as timm's `attn_mask` (boolean, True = may attend,
the `scaled_dot_product_attention` convention timm passes it through with). The head (adapters,
label-aware or group-aware gating, expert mixture, classifiers, one or two branches, or plain
VPT's linear head on the mean prompt) and the loss (ASL, SPEC 4) are written here from the SPEC,
with mlvpt's parameter names and shapes (src/model/params.rs) so goldens map one to one.

Nothing is downloaded: models are built with random weights.
"""

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer


@dataclass
class HeadConfig:
    """Everything but the backbone that fixes the model (mlvpt's ModelConfig minus `vit`)."""
    labels: int  # K
    groups: int = 5  # T per branch
    experts: int = 3  # E: prompt tokens per group
    adapter_rank: int = 5  # r
    gate: str = "label"  # "label" (one gate vector per expert and label) or "group"
    method: str = "mlvpt"  # "mlvpt" or "vpt" (plain VPT: linear head on the mean prompt)
    prompt_depth: str = "deep"  # "deep" or "shallow"
    vpt_prompts: int = 10  # prompts per layer for method "vpt"
    loss_scale: float = 1000.0  # loss = loss_scale / (B*K) * sum of the ASL terms

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class AslConfig:
    """SPEC 4 (mlvpt's AslConfig): defaults are the seed's setting."""
    gamma_neg: float = 2.0
    gamma_pos: float = 0.0
    clip: float = 0.0
    eps: float = 1e-5
    exact_grad: bool = False  # False: focusing weights are constants in the gradient

    def to_json(self) -> dict:
        return asdict(self)


def asl_sum(x: torch.Tensor, y: torch.Tensor, cfg: AslConfig) -> torch.Tensor:
    """Sum over all elements of the per-label ASL from logits `x` and targets `y` in [0, 1]:
    l = -y (1-p)^g+ log(p) - (1-y) p_m^g- log(1-p_m), p_m = max(p - clip, 0), both logs clamped
    at log(eps) as the reference implementation's `log(clamp(., min=eps))`, computed from the logit
    (log-sigmoid). The two terms are weighted linearly by y (mlvpt's definition for soft targets)."""
    log_eps = math.log(cfg.eps)
    log_p = F.logsigmoid(x).clamp(min=log_eps)
    if cfg.clip > 0:
        log_n = (torch.sigmoid(-x) + cfg.clip).clamp(max=1).log().clamp(min=log_eps)
    else:
        log_n = F.logsigmoid(-x).clamp(min=log_eps)
    with torch.set_grad_enabled(cfg.exact_grad and torch.is_grad_enabled()):
        w_pos = torch.sigmoid(-x).pow(cfg.gamma_pos)
        w_neg = (torch.sigmoid(x) - cfg.clip).clamp(min=0).pow(cfg.gamma_neg)
    return -(y * w_pos * log_p + (1 - y) * w_neg * log_n).sum()


def prompt_mask(prompts: int, tokens: int, device=None) -> torch.Tensor:
    """[N, N] boolean, True = the query (row) may attend to the key (column). Sequence order is
    [CLS, P prompts, patches]; a prompt query does not see the other prompts' keys."""
    allowed = torch.ones(tokens, tokens, dtype=torch.bool, device=device)
    allowed[1:1 + prompts, 1:1 + prompts] = torch.eye(prompts, dtype=torch.bool, device=device)
    return allowed


def token_table(groups: Sequence[int], branch: int, T: int, E: int) -> torch.Tensor:
    """[K, E]: the prompt token of label k's group and expert e in branch s (SPEC 2: correlative
    group g, expert e at g + T*e; discriminative at T*E + T*e + g)."""
    return torch.tensor([[branch * T * E + T * e + g for e in range(E)] for g in groups], dtype=torch.long)


class MlVpt(nn.Module):
    """A frozen timm ViT with prompts, and the ML-VPT (or plain VPT) head.

    `branches[s][k]` is the group of label k in partition s (1 or 2 partitions; ignored by
    "vpt"). `trainable()` lists the trainable tensors under mlvpt's names, in its order."""

    def __init__(self, vit: VisionTransformer, cfg: HeadConfig, branches: Sequence[Sequence[int]]):
        super().__init__()
        if vit.cls_token is None or vit.reg_token is not None or vit.num_prefix_tokens != 1:
            raise ValueError("the peer needs a ViT with a class token and no register tokens")
        if cfg.method == "mlvpt" and not 1 <= len(branches) <= 2:
            raise ValueError(f"ML-VPT needs 1 or 2 label partitions, got {len(branches)}")
        self.vit = vit
        for w in self.vit.parameters():
            w.requires_grad_(False)
        self.cfg = cfg
        D = vit.embed_dim
        L = len(vit.blocks)
        K, T, E, r = cfg.labels, cfg.groups, cfg.experts, cfg.adapter_rank
        self.nbranch = len(branches) if cfg.method == "mlvpt" else 1
        self.P = self.nbranch * T * E if cfg.method == "mlvpt" else cfg.vpt_prompts
        layers = L if cfg.prompt_depth == "deep" else 1
        patch = vit.patch_embed.patch_size[0]
        ntok = 1 + self.P + vit.patch_embed.num_patches

        # Initialisation as SPEC 2-3 (the goldens overwrite it with mlvpt's values anyway).
        v = math.sqrt(6.0 / (3 * patch * patch + D))
        self.prompts = nn.Parameter(torch.empty(layers, self.P, D).uniform_(-v, v))
        u = 1.0 / math.sqrt(D)
        self.heads = nn.ParameterList()
        if cfg.method == "mlvpt":
            ur = 1.0 / math.sqrt(r)
            self.adapter_w1 = nn.Parameter(torch.empty(self.P, r, D).uniform_(-u, u))
            self.adapter_b1 = nn.Parameter(torch.empty(self.P, r).uniform_(-u, u))
            self.adapter_w2 = nn.Parameter(torch.empty(self.P, D, r).uniform_(-ur, ur))
            self.adapter_b2 = nn.Parameter(torch.empty(self.P, D).uniform_(-ur, ur))
            rows = K if cfg.gate == "label" else T
            for s, groups in enumerate(branches):
                if len(groups) != K or not all(0 <= g < T for g in groups):
                    raise ValueError(f"branch {s}: need K = {K} group indices in [0, {T})")
                self.heads.append(nn.Parameter(torch.empty(E, rows, D).uniform_(-u, u)))  # gate
                self.heads.append(nn.Parameter(torch.empty(K, D).uniform_(-u, u)))  # weight
                self.heads.append(nn.Parameter(torch.empty(K).uniform_(-u, u)))  # bias
                self.register_buffer(f"tok{s}", token_table(groups, s, T, E), persistent=False)
                self.register_buffer(f"grp{s}", torch.tensor(list(groups), dtype=torch.long), persistent=False)
        else:
            self.heads.append(nn.Parameter(torch.empty(K, D).uniform_(-u, u)))
            self.heads.append(nn.Parameter(torch.empty(K).uniform_(-u, u)))
        self.register_buffer("mask", prompt_mask(self.P, ntok), persistent=False)

    def trainable(self) -> Dict[str, nn.Parameter]:
        """mlvpt's names (src/model/params.rs), in its order."""
        out = {"prompts": self.prompts}
        if self.cfg.method == "mlvpt":
            out.update({"adapter.w1": self.adapter_w1, "adapter.b1": self.adapter_b1,
                        "adapter.w2": self.adapter_w2, "adapter.b2": self.adapter_b2})
            for s in range(self.nbranch):
                out[f"head{s}.gate"], out[f"head{s}.weight"], out[f"head{s}.bias"] = self.heads[3 * s:3 * s + 3]
        else:
            out["head.weight"], out["head.bias"] = self.heads[0], self.heads[1]
        return out

    def group_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Z [B, P, D]: the final norm's output at the prompt positions (timm's `norm` is Identity
        when the model has none)."""
        vit = self.vit
        x = vit._pos_embed(vit.patch_embed(images))  # [B, 1 + Np, D], CLS first
        x = vit.norm_pre(vit.patch_drop(x))
        B = x.shape[0]
        deep = self.cfg.prompt_depth == "deep"
        for l, blk in enumerate(vit.blocks):
            if l == 0 or deep:
                rest = x[:, 1:] if l == 0 else x[:, 1 + self.P:]
                pr = self.prompts[l].unsqueeze(0).expand(B, -1, -1).to(x.dtype)
                x = torch.cat([x[:, :1], pr, rest], dim=1)
            x = blk(x, attn_mask=self.mask)
        return vit.norm(x[:, 1:1 + self.P])

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
        """(prediction logits [B, K], classifier logits y_s per branch, gate logits m_s per branch).
        For "vpt" the branch lists hold the one head's logits and no gate logits."""
        z = self.group_tokens(images)
        if self.cfg.method == "vpt":
            w, b = self.heads[0], self.heads[1]
            y = z.mean(1) @ w.t() + b
            return y, [y], []
        # Per-token adapters: a_t(z) = z + W2_t GELU(W1_t z + b1_t) + b2_t.
        hid = F.gelu(torch.einsum("bpd,prd->bpr", z, self.adapter_w1) + self.adapter_b1)
        adapted = z + torch.einsum("bpr,pdr->bpd", hid, self.adapter_w2) + self.adapter_b2
        ys, ms = [], []
        for s in range(self.nbranch):
            gate, weight, bias = self.heads[3 * s:3 * s + 3]
            tok = getattr(self, f"tok{s}")  # [K, E]
            g = gate.transpose(0, 1) if self.cfg.gate == "label" else gate[:, getattr(self, f"grp{s}")].transpose(0, 1)
            q = torch.einsum("bked,ked->bke", z[:, tok], g)  # gate scores, raw Z
            a = q.softmax(-1)  # label-aware gating over the experts
            ms.append((a * q).sum(-1))
            f = torch.einsum("bke,bked->bkd", a, adapted[:, tok])  # expert mixture
            ys.append(torch.einsum("bkd,kd->bk", f, weight) + bias)
        return sum(ys) / len(ys), ys, ms

    def loss(self, images: torch.Tensor, targets: torch.Tensor, asl: AslConfig) -> Tuple[torch.Tensor, torch.Tensor]:
        """(training loss, prediction logits): ASL of every classifier and gate logit, summed over
        labels and terms, times loss_scale / (B*K). Computed in float32 at least (under autocast
        the logits may come as bf16)."""
        logits, ys, ms = self(images)
        B, K = targets.shape
        dt = torch.promote_types(logits.dtype, torch.float32)
        t = targets.to(dt)
        total = sum(asl_sum(x.to(dt), t, asl) for x in ys + ms)
        return total * (self.cfg.loss_scale / (B * K)), logits


def make_vit(img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float,
             layer_scale: Optional[float] = None, final_norm: bool = True, channels: int = 3) -> VisionTransformer:
    """A timm ViT with random weights and no classifier (num_classes=0)."""
    return VisionTransformer(img_size=img_size, patch_size=patch_size, in_chans=channels, embed_dim=embed_dim,
                             depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, init_values=layer_scale,
                             final_norm=final_norm, num_classes=0)


def random_partition(K: int, T: int, gen: torch.Generator) -> List[int]:
    """K labels into T non-empty groups, at random."""
    return (torch.randperm(K, generator=gen) % T).tolist()

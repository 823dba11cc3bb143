#!/usr/bin/env python3
# Golden values for tests/ops/asl.rs: the official ASL code (Alibaba-MIIL/ASL, losses.py,
# AsymmetricLoss.forward) in float64 with autograd.
import torch
torch.set_default_dtype(torch.float64)
def official(x, y, gamma_neg, gamma_pos, clip, eps, disable_torch_grad_focal_loss):
    x_sigmoid = torch.sigmoid(x)
    xs_pos = x_sigmoid
    xs_neg = 1 - x_sigmoid
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    los_pos = y * torch.log(xs_pos.clamp(min=eps))
    los_neg = (1 - y) * torch.log(xs_neg.clamp(min=eps))
    loss = los_pos + los_neg
    if gamma_neg > 0 or gamma_pos > 0:
        if disable_torch_grad_focal_loss:
            torch.set_grad_enabled(False)
        pt0 = xs_pos * y
        pt1 = xs_neg * (1 - y)
        pt = pt0 + pt1
        one_sided_gamma = gamma_pos * y + gamma_neg * (1 - y)
        one_sided_w = torch.pow(1 - pt, one_sided_gamma)
        if disable_torch_grad_focal_loss:
            torch.set_grad_enabled(True)
        loss *= one_sided_w
    return -loss.sum()
x0 = [-13.0, -6.5, -2.25, -0.7, 0.0, 0.3, 1.1, 2.9, 5.0, 12.0, -1.4, 0.05]
y0 = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 0, 1]
print("const X: [f64; 12] =", [float(v) for v in x0], ";")
print("const Y: [f64; 12] =", [float(v) for v in y0], ";")
for (gn, gp, clip, eps) in [(2, 0, 0, 1e-5), (4, 1, 0.05, 1e-5), (1.5, 0.5, 0.2, 1e-8)]:
    for disable in (True, False):
        x = torch.tensor(x0, requires_grad=True); y = torch.tensor(y0, dtype=torch.float64)
        l = official(x, y, gn, gp, clip, eps, disable); l.backward()
        print(f"(AslConfig {{ gamma_neg: {float(gn)}, gamma_pos: {float(gp)}, clip: {float(clip)}, eps: {eps}, exact_grad: {str(not disable).lower()} }}, {l.item()!r}, {[g for g in x.grad.tolist()]}),")
print(torch.__version__)

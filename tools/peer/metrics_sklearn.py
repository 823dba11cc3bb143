#!/usr/bin/env python3
# Expected values for tests/metrics.rs (matches_sklearn_and_voc_devkit_on_fixed_data and the tie
# cases): scikit-learn average_precision_score and the VOC devkit voc_ap. Needs numpy, scikit-learn.
import numpy as np
from sklearn.metrics import average_precision_score
rng = np.random.default_rng(7)
n, k = 15, 3
# distinct scores per column (tie-free), 3 decimals
S = np.stack([rng.permutation(np.arange(50, 950, 7))[:n] / 1000 for _ in range(k)], 1)
Y = (rng.random((n, k)) < 0.4).astype(int)
Y[0, :] = 1  # every class has a positive
def voc_ap(rec, prec):  # VOC devkit (all-point), py-faster-rcnn voc_eval.voc_ap
    mrec = np.concatenate(([0.], rec, [1.])); mpre = np.concatenate(([0.], prec, [0.]))
    for i in range(mpre.size - 1, 0, -1): mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
print("scores:"); [print(",".join(f"{v:.3f}" for v in r)) for r in S]
print("targets:"); [print(",".join(str(v) for v in r)) for r in Y]
for j in range(k):
    o = np.argsort(-S[:, j]); t = Y[o, j]; tp = np.cumsum(t); fp = np.cumsum(1 - t)
    print(j, "sklearn", repr(average_precision_score(Y[:, j], S[:, j])), "voc", repr(voc_ap(tp / t.sum(), tp / (tp + fp))))
print("ties1", repr(average_precision_score([0,1,0,1],[0.9,0.5,0.5,0.1])), 5/12)
print("ties2", repr(average_precision_score([1,1,0,1],[0.5,0.5,0.5,0.2])), 25/36)

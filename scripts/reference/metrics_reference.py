#!/usr/bin/env python3
"""Writes tests/fixtures/metrics_cases.json: detection metrics computed by scikit-learn
(roc_auc_score, average_precision_score, roc_curve(drop_intermediate=False), precision_recall_curve,
confusion_matrix, and LogisticRegression for the linear probe)
on score/label sets with ties, perfect and reversed separation, all-tied scores and single-class
inputs (where sklearn raises, the expected value is null: sd2 returns NaN). EER and TPR@1%FPR
are computed here from sklearn's ROC curve with the definitions documented in
src/eval/metrics.rs.

    .venv-ref/bin/pip install scikit-learn && .venv-ref/bin/python scripts/reference/metrics_reference.py
"""
import json
import os

import numpy as np
import sklearn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (average_precision_score, confusion_matrix, precision_recall_curve, roc_auc_score,
                             roc_curve)

OUT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests", "fixtures",
                                    "metrics_cases.json"))


def eer(fpr, tpr):
    for k in range(1, len(fpr)):
        g0, g1 = 1 - fpr[k - 1] - tpr[k - 1], 1 - fpr[k] - tpr[k]
        if g0 >= 0 and g1 <= 0:
            if g0 == g1:
                return fpr[k - 1]
            a = g0 / (g0 - g1)
            return fpr[k - 1] + a * (fpr[k] - fpr[k - 1])
    return None


def case(name, scores, labels):
    scores, labels = np.asarray(scores, float), np.asarray(labels, int)
    c = {"name": name, "scores": scores.tolist(), "labels": labels.tolist()}
    two = len(set(labels.tolist())) == 2
    c["auc"] = float(roc_auc_score(labels, scores)) if two else None
    c["ap"] = float(average_precision_score(labels, scores)) if labels.sum() > 0 else None
    if labels.sum() > 0:
        prec, rec, _ = precision_recall_curve(labels, scores)
        c["precision"], c["recall"] = prec.tolist(), rec.tolist()
    else:
        c["precision"] = c["recall"] = None
    if two:
        fpr, tpr, thr = roc_curve(labels, scores, drop_intermediate=False)
        c["fpr"], c["tpr"] = fpr.tolist(), tpr.tolist()
        c["eer"] = eer(fpr, tpr)
        c["tpr_at_fpr_1pct"] = float(tpr[fpr <= 0.01 + 1e-12].max())
    else:
        c["fpr"] = c["tpr"] = c["eer"] = c["tpr_at_fpr_1pct"] = None
    c["acc_at_0_5"] = float(((scores >= 0.5) == (labels == 1)).mean())
    return c


def main():
    rng = np.random.default_rng(0)
    cases = []
    lab = rng.integers(0, 2, 200)
    cases.append(case("ties_rounded", np.round(rng.random(200) * 0.6 + lab * 0.3, 1), lab))
    lab = rng.integers(0, 2, 1000)
    cases.append(case("continuous_1000", rng.normal(size=1000) + lab * 1.2, lab))
    cases.append(case("perfect", [0.1, 0.2, 0.3, 0.8, 0.9], [0, 0, 0, 1, 1]))
    cases.append(case("reversed", [0.9, 0.8, 0.3, 0.2], [0, 0, 1, 1]))
    cases.append(case("all_tied", [0.5] * 6, [0, 1, 0, 1, 1, 1]))
    cases.append(case("small_ties", [0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.7], [0, 0, 1, 1, 1, 0, 0]))
    cases.append(case("only_fake", [0.2, 0.6, 0.9], [1, 1, 1]))
    cases.append(case("only_real", [0.2, 0.6, 0.9], [0, 0, 0]))
    lab = rng.integers(0, 2, 300)
    cases.append(case("imbalanced_tail", np.where(lab == 1, rng.random(300) ** 0.3, rng.random(300) ** 3), lab))
    truth = rng.integers(0, 5, 100)
    pred = np.where(rng.random(100) < 0.7, truth, rng.integers(0, 5, 100))
    conf = {"truth": truth.tolist(), "pred": pred.tolist(),
            "matrix": confusion_matrix(truth, pred, labels=list(range(5))).tolist(),
            "accuracy": float((truth == pred).mean())}
    # The linear probe: L2 logistic regression on overlapping classes (C=1 and C=0.1).
    x = rng.normal(size=(240, 6))
    y = (x @ np.array([1.0, -2.0, 0.5, 0.0, 0.3, 1.5]) + 0.4 + rng.normal(size=240) > 0).astype(int)
    probes = []
    for c in (1.0, 0.1):
        m = LogisticRegression(C=c, tol=1e-12, max_iter=100000).fit(x, y)
        probes.append({"c": c, "coef": m.coef_[0].tolist(), "intercept": float(m.intercept_[0])})
    logreg = {"x": x.tolist(), "y": y.tolist(), "fits": probes}
    with open(OUT, "w") as f:
        json.dump({"source": f"scikit-learn {sklearn.__version__}", "cases": cases, "confusion": conf,
                   "logreg": logreg}, f)
    print(len(cases), "cases written")


if __name__ == "__main__":
    main()

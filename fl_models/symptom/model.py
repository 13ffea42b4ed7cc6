"""The symptom network: multinomial logistic regression, 132 binary inputs -> 41 logits.

Why linear: the generator draws each symptom independently given the disease, so
the Bayes-optimal classifier (Bernoulli Naive Bayes) is linear in the symptom
indicators, and a linear model matches it without DP (0.933 vs Naive Bayes 0.925 on
the skewed seed-0 split, 12 full-batch steps). Under DP-SGD every parameter costs
signal-to-noise: 5,453 parameters instead of the former MLP's 22,313 (132-128-41).
"""

from __future__ import annotations

from torch import nn

from fl_models.symptom.vocabulary import DISEASES, SYMPTOMS


def build_model() -> nn.Module:
    """Linear 132 -> 41; a plain Linear layer, so Opacus needs no changes."""
    return nn.Sequential(nn.Linear(len(SYMPTOMS), len(DISEASES)))

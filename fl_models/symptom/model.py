"""The symptom network: 132 binary inputs -> 128 hidden -> 41 disease logits."""

from __future__ import annotations

from torch import nn

from fl_models.symptom.vocabulary import DISEASES, SYMPTOMS

HIDDEN = 128


def build_model() -> nn.Module:
    """MLP 132 -> 128 -> 41; Linear layers only, so Opacus needs no changes."""
    return nn.Sequential(
        nn.Linear(len(SYMPTOMS), HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, len(DISEASES))
    )

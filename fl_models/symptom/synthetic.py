"""Seeded synthetic symptom records: disease -> independent symptom draws.

The probability table is fixed (its own constant seed), so every hospital and every
run samples the same "world"; the caller's seed only picks the patients. Diseases
come in families that share a pool of core symptoms, which makes siblings
confusable: a record is ambiguous when its distinctive symptoms happen not to show,
exactly as in clinic, so no model reaches 100%.

The table is random, not clinical: the disease and symptom names are column labels
borrowed from the real export so that both formats load the same way.
"""

from __future__ import annotations

import numpy as np

from fl_models.symptom.vocabulary import DISEASES, SYMPTOMS

TABLE_SEED = 41_132
FAMILY_SIZE = 4  # diseases per family (some get one more, so none is alone)
FAMILY_POOL = 8  # core symptoms a family draws from
CORE_PER_DISEASE = 5
CORE_PROB = (0.55, 0.9)
DISTINCT_PER_DISEASE = 3
DISTINCT_PROB = (0.2, 0.5)
BACKGROUND_PROB = 0.03


def probability_table() -> np.ndarray:
    """P(symptom present | disease), shape (41, 132)."""
    rng = np.random.default_rng(TABLE_SEED)
    n_diseases, n_symptoms = len(DISEASES), len(SYMPTOMS)
    table = np.full((n_diseases, n_symptoms), BACKGROUND_PROB)
    order = rng.permutation(n_diseases)
    for family in np.array_split(order, n_diseases // FAMILY_SIZE):
        pool = rng.choice(n_symptoms, size=FAMILY_POOL, replace=False)
        for disease in family:
            core = rng.choice(pool, size=CORE_PER_DISEASE, replace=False)
            table[disease, core] = rng.uniform(*CORE_PROB, size=CORE_PER_DISEASE)
            others = np.setdiff1d(np.arange(n_symptoms), pool)
            distinct = rng.choice(others, size=DISTINCT_PER_DISEASE, replace=False)
            table[disease, distinct] = rng.uniform(*DISTINCT_PROB, size=DISTINCT_PER_DISEASE)
    return table


def generate(samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(symptoms uint8 [n, 132], disease index int64 [n]); classes as balanced as n allows."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(samples) % len(DISEASES)).astype(np.int64)
    symptoms = (rng.random((samples, len(SYMPTOMS))) < probability_table()[labels]).astype(np.uint8)
    return symptoms, labels

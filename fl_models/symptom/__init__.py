"""Disease prediction from 132 binary symptoms (41 diseases)."""

from __future__ import annotations

from torch.utils.data import TensorDataset

from fl_models.base import FolderTask
from fl_models.symptom import dataset, evaluate, hyperparams, model
from fl_models.symptom.vocabulary import DISEASES, SYMPTOMS


class SymptomTask(FolderTask):
    name = "symptom"
    class_names = DISEASES
    input_shape = (len(SYMPTOMS),)
    dataset_module = dataset
    model_module = model
    hyperparams_module = hyperparams
    evaluate_module = evaluate

    def reference_metrics(
        self, train: TensorDataset, test: TensorDataset
    ) -> tuple[str, dict[str, float]]:
        return "naive_bayes", evaluate.naive_bayes_metrics(train, test)

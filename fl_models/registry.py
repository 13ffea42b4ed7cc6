"""--model_type names -> tasks.

Task packages are imported only when asked for, so a daemon serving one model does
not pay for (or fail on) the imports of the others.
"""

from __future__ import annotations

import importlib

from fl_models.base import Task

# name -> "module:class"; adding a model is one line here (see fl_models/README.md).
_TASKS: dict[str, str] = {
    "breast_cancer": "fl_models.breast_cancer:BreastCancerTask",
    "ecg": "fl_models.ecg:EcgTask",
    "glaucoma": "fl_models.glaucoma:GlaucomaTask",
    "pneumonia": "fl_models.pneumonia:PneumoniaTask",
    "symptom": "fl_models.symptom:SymptomTask",
}

TASK_NAMES: tuple[str, ...] = tuple(_TASKS)


def get_task(name: str, **options: object) -> Task:
    """The task registered as `name`; `options` go to its constructor (e.g. `samples`)."""
    target = _TASKS.get(name)
    if target is None:
        known = ", ".join(TASK_NAMES)
        raise ValueError(f"unknown model type {name!r}; known model types: {known}")
    module_name, class_name = target.split(":")
    task_class = getattr(importlib.import_module(module_name), class_name)
    task = task_class(**options)
    if not isinstance(task, Task):
        raise TypeError(f"{target} is not a fl_models.base.Task")
    return task

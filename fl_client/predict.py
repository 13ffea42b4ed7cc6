"""Use a job's final model at the hospital: score a local dataset, or export the model.

    python -m fl_client.predict --model FILE --data_path DIR [--model_type T]
        [--split test] [--out predictions.csv]
    python -m fl_client.predict export --model FILE --format safetensors|torchscript
        --out F [--model_type T]

Scoring loads ``--split`` of ``DIR`` with the task's own loader and prints the task's
own metrics (``fl_models/<task>/evaluate.py``, the same function the server runs on
``--eval_data``, so the same folder gives the same figures) as one JSON object; with
``--out`` it also writes one CSV row per example (index, label, predicted class and
each class's probability). The task loaders read labelled data; unlabelled input is
not supported yet.

The model file is read with safetensors only (never ``torch.load``: a pickle can run
code). Its metadata names the model type when this client wrote it; ``--model_type``
is needed for other files. TorchScript export traces the task's own network with the
loaded weights on an example of the task's input shape.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from fl_client.local_training import load_state_strict
from fl_client.model_store import ModelFileError, file_metadata, load_model
from fl_models.base import Task

FORMATS = ("safetensors", "torchscript")


def score_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fl_client.predict",
                                description="Score a local dataset with a final model"
                                            " (or: python -m fl_client.predict export -h).")
    _common(p)
    p.add_argument("--data_path", type=Path, required=True,
                   help="folder in a format the task loads")
    p.add_argument("--split", default="test", choices=["train", "test"],
                   help="which split of --data_path to score")
    p.add_argument("--out", type=Path, default=None,
                   help="also write one CSV row of predictions per example here")
    return p


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fl_client.predict export",
                                description="Export a final model for use outside this project.")
    _common(p)
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", type=Path, required=True, help="file to write")
    return p


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, required=True,
                   help="a .safetensors model (e.g. <state_dir>/models/<job>/model.safetensors)")
    p.add_argument("--model_type", default=None,
                   help="the task (default: the one recorded in the model file)")


def load_network(model_file: Path, model_type: str | None) -> tuple[Task, torch.nn.Module]:
    """The task and its network with the file's weights, checked name by name."""
    from fl_models.registry import get_task

    state, metadata = load_model(model_file)
    name = model_type or metadata.get("model_type")
    if not name:
        raise ModelFileError(f"{model_file} does not name its model type; pass --model_type")
    task = get_task(name)
    model = task.build_model()
    load_state_strict(model, state)
    model.eval()
    return task, model


def score(task: Task, model: torch.nn.Module, data_path: Path, split: str,
          out: Path | None) -> dict[str, float]:
    dataset = task.load_split(data_path, split)
    metrics = {k: float(v) for k, v in task.evaluate(model, dataset).items()}
    if out is not None:
        write_predictions(task, model, dataset, out)
    return metrics


def write_predictions(task: Task, model: torch.nn.Module,
                      dataset: torch.utils.data.TensorDataset, out: Path) -> None:
    inputs, labels = dataset.tensors[0], dataset.tensors[1]
    names = list(task.class_names)
    with torch.no_grad(), out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label", "predicted", *(f"p_{n}" for n in names)])
        for start in range(0, len(inputs), 256):
            probs = torch.softmax(model(inputs[start:start + 256]), dim=1)
            for i, row in enumerate(probs, start=start):
                writer.writerow([i, names[int(labels[i])], names[int(row.argmax())],
                                 *(f"{float(v):.6f}" for v in row)])


def export(task: Task, model: torch.nn.Module, fmt: str, out: Path, model_type: str) -> None:
    if fmt == "safetensors":
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(out), metadata=file_metadata(state, model_type))
        return
    example = torch.zeros((1, *task.input_shape))
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is what the issue asks for (loadable from C++ and older
        # runtimes); torch marks jit deprecated in favour of torch.export.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        traced = torch.jit.trace(model, example)  # type: ignore[no-untyped-call]
        traced.save(str(out))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exporting = bool(argv) and argv[0] == "export"
    args = (export_parser() if exporting else score_parser()).parse_args(
        argv[1:] if exporting else argv)
    try:
        task, model = load_network(args.model, args.model_type)
        if exporting:
            export(task, model, args.format, args.out, task.name)
            print(json.dumps({"exported": str(args.out), "format": args.format}))
        else:
            metrics = score(task, model, args.data_path, args.split, args.out)
            print(json.dumps(metrics, sort_keys=True))
    except (ModelFileError, ValueError, OSError, KeyError) as exc:
        print(f"fl-predict: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

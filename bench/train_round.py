"""One hospital's training round per task, on the CPU and on a CUDA GPU when there is one
(python -m bench.train_round).

Why: a hospital deciding whether to give the client daemon a GPU (`--device cuda`) needs
to know what a round costs it on each. The round is the client's own
(`fl_client.local_training.train_round`): the task's default hyperparameters and
batch, DP on (noise 1.0), the first hospital's share of the task's generated or shipped
data (`task.prepare`, 3 hospitals, IID), from the task's initial model. The first round
on each device is a warm-up (imports, CUDA context, cuBLAS workspaces); the median of
the rest is reported, with the GPU's speed-up over the CPU measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from fl_client.local_training import train_round
from fl_models.registry import TASK_NAMES, get_task
from fl_proto import coordinator_pb2 as pb

HOSPITALS = 3


def round_config() -> pb.TrainConfig:
    """The task's own hyperparameters (zeros), DP at noise 1.0."""
    return pb.TrainConfig(privacy=pb.PrivacyConfig(enabled=True, noise_multiplier=1.0))


def time_rounds(name: str, folder: Path, devices: list[torch.device], runs: int
                ) -> tuple[int, dict[str, float]]:
    """(training examples, median seconds per round on each device)."""
    task = get_task(name)
    task.prepare(folder, HOSPITALS, None, 0)
    data = task.load_split(folder / "hospital_1", "train")
    torch.manual_seed(0)
    state = task.build_model().state_dict()
    medians: dict[str, float] = {}
    for device in devices:
        seconds = []
        for _ in range(runs + 1):  # the first is the warm-up
            started = time.perf_counter()
            train_round(task, state, data, round_config(), device, None, False)
            seconds.append(time.perf_counter() - started)
        medians[device.type] = statistics.median(seconds[1:])
    return len(data), medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=list(TASK_NAMES), choices=TASK_NAMES)
    parser.add_argument("--runs", type=int, default=3, help="timed rounds per device")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads on the CPU (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    gpu = torch.cuda.get_device_name(0) if len(devices) > 1 else "no CUDA device here"
    print(f"One hospital's DP training round (task defaults, noise 1.0), median of "
          f"{args.runs} after a warm-up; CPU: {torch.get_num_threads()} threads; GPU: {gpu}")
    header = f"{'task':<14}{'examples':>9}{'CPU s':>9}{'GPU s':>9}{'GPU speed-up':>14}"
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory(prefix="fl-bench-round-") as tmp:
        for name in args.tasks:
            examples, medians = time_rounds(name, Path(tmp) / name, devices, args.runs)
            cpu, gpu_s = medians["cpu"], medians.get("cuda")
            cells = (f"{gpu_s:>9.3f}{cpu / gpu_s:>13.2f}x" if gpu_s is not None
                     else f"{'-':>9}{'-':>14}")
            print(f"{name:<14}{examples:>9}{cpu:>9.3f}{cells}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

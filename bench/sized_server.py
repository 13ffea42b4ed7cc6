"""The real server daemon with a synthetic model of a chosen size (benchmarks only).

    python -m bench.sized_server --params N [--tensor_elems E] <fl_server.server flags>

Registers `bench.sized_model:SizedTask` as model type "sized" in this process's
task registry (fl_models.registry._TASKS), sets its size, then runs
`fl_server.server.main` with the remaining flags, unchanged. Nothing on disk is
modified; clients never need the task (the no-op client does not train).
"""

from __future__ import annotations

import argparse
import sys

from bench.sized_model import DEFAULT_TENSOR_ELEMS, SizedTask


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--params", type=int, required=True,
                     help="float32 parameters of the synthetic model")
    pre.add_argument("--tensor_elems", type=int, default=DEFAULT_TENSOR_ELEMS,
                     help="elements per tensor (the model is split into tensors this big)")
    ours, rest = pre.parse_known_args(argv)
    SizedTask.params = ours.params
    SizedTask.tensor_elems = ours.tensor_elems

    from bench.sized_model import register
    from fl_server import server

    register()
    return server.main(rest)


if __name__ == "__main__":
    sys.exit(main())

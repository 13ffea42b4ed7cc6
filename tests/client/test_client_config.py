"""The client's TOML config: the file fills in flags, flags win, mistakes are errors."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from fl_client.client import build_parser
from fl_client.config import parse_args
from fl_core.logs import log_event, setup_logging_from_args

SITE = """
client_id = "hospital_1"
server_url = "fl-server.example.org:5000"
data_path = "/data/ecg"
model_type = "ecg"
keys_dir = "site_keys"
epsilon_budget = 4
allow_no_dp = true
device = "cpu"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_file_supplies_required_flags_and_flags_win(tmp_path: Path) -> None:
    config = write(tmp_path, SITE)
    args = parse_args(build_parser(), ["--config", str(config), "--epsilon_budget", "2.5"])
    assert args.client_id == "hospital_1" and args.model_type == "ecg"
    assert args.data_path == Path("/data/ecg") and args.keys_dir == Path("site_keys")
    assert args.allow_no_dp is True
    assert args.epsilon_budget == 2.5  # the flag, not the file's 4
    args = parse_args(build_parser(), ["--config", str(config)])
    assert args.epsilon_budget == 4.0 and isinstance(args.epsilon_budget, float)


def test_without_config_the_required_flags_stay_required(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_parser(), ["--client_id", "h"])
    assert exit_info.value.code == 2
    assert "required" in capsys.readouterr().err


@pytest.mark.parametrize(("line", "message"), [
    ("epsilon_budegt = 2", "unknown keys: epsilon_budegt"),
    ("epsilon_budget = \"lots\"", "epsilon_budget = 'lots' is not a number"),
    ("allow_no_dp = \"yes\"", "allow_no_dp = 'yes' is not true or false"),
    ("device = \"tpu\"", "device = 'tpu' is not one of cpu, cuda, auto"),
    ("max_reconnect_s = true", "max_reconnect_s = True is not a number"),
    ("log_backups = 1.5", "log_backups = 1.5 is not valid"),
])
def test_mistakes_in_the_file_are_errors_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str, message: str) -> None:
    base = "\n".join(x for x in SITE.splitlines() if not x.startswith(line.split(" ")[0]))
    config = write(tmp_path, base + "\n" + line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        parse_args(build_parser(), ["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert str(config) in err and message in err, err


def test_missing_or_broken_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for path, message in ((tmp_path / "none.toml", "does not exist"),
                          (write(tmp_path, "client_id = \n"), "is not valid TOML")):
        with pytest.raises(SystemExit):
            parse_args(build_parser(), ["--config", str(path)])
        assert message in capsys.readouterr().err


def test_log_file_rotates_by_size(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "client.log"
    args = parse_args(build_parser(), [
        "--config", str(write(tmp_path, SITE)), "--log_file", str(log_file),
        "--log_max_bytes", "2000", "--log_backups", "2"])
    logger = setup_logging_from_args("fltest.rotation", args)
    try:
        for i in range(100):
            log_event(logger, "round_summary", round=i, padding="x" * 50)
    finally:
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)
        logging.getLogger("fltest.rotation").propagate = True
    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["client.log", "client.log.1", "client.log.2"]
    assert all(p.stat().st_size <= 2000 for p in log_file.parent.iterdir())
    assert "round=99" in log_file.read_text()  # the newest line is in the live file


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused_at_start(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Not at the first round the server waits for; and before the state folder is
    locked or any data read."""
    from fl_client.client import main

    state = tmp_path / "state"
    code = main(["--client_id", "hospital_1", "--server_url", "127.0.0.1:1",
                 "--data_path", str(tmp_path / "absent"), "--model_type", "breast_cancer",
                 "--state_dir", str(state), "--device", "cuda"])
    assert code == 2
    assert "--device cuda was asked for but no CUDA device is available" in \
        capsys.readouterr().err
    assert not state.exists()

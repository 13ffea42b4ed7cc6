"""Structured logs: one parseable line per event, fields included."""

from __future__ import annotations

import io
import json
import logging
import shlex

from fl_core.logs import log_event, setup_logging


def parse(line: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in shlex.split(line))


def test_key_value_line() -> None:
    out = io.StringIO()
    logger = setup_logging("fltest.kv", "debug", stream=out)
    log_event(logger, "round_closed", round=3, clients="a b", ratio=0.5)
    logger.getChild("child").warning("hi %s", "there", extra={"fields": {"msg": "x"}})
    first, second = out.getvalue().splitlines()
    fields = parse(first)
    assert fields["level"] == "INFO" and fields["logger"] == "fltest.kv"
    assert fields["msg"] == "round_closed" and fields["round"] == "3"
    assert fields["clients"] == "a b" and fields["ratio"] == "0.5"
    assert fields["ts"].endswith("Z")
    other = parse(second)
    assert other["msg"] == "hi there" and other["field_msg"] == "x"
    assert other["logger"] == "fltest.kv.child" and other["level"] == "WARNING"


def test_exception_stays_on_one_line() -> None:
    out = io.StringIO()
    logger = setup_logging("fltest.exc", stream=out)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        logger.exception("failed", extra={"fields": {"client": "h1"}})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    fields = parse(lines[0])
    assert "ValueError" in fields["exc"] and fields["client"] == "h1"


def test_json_and_no_duplicate_handlers() -> None:
    out = io.StringIO()
    setup_logging("fltest.json", stream=io.StringIO())
    logger = setup_logging("fltest.json", logging.INFO, json=True, stream=out)
    log_event(logger, "joined", client_id="hospital_1", n=2)
    logger.debug("hidden")
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["msg"] == "joined" and record["client_id"] == "hospital_1" and record["n"] == 2
    assert len(logger.handlers) == 1

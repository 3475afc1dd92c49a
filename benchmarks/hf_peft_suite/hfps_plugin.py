"""pytest plugin used by both runs of run.py (reference peft and peftkit alias).

It does four things, none of which touches peft or peftkit:
  --hfps-rule FILE     deselect tests that are not candidates of the selection rule (hfps_selection.py),
                       writing ``{"excluded": nodeid, "reason": ...}`` lines to the results file;
  --hfps-ids FILE      keep only the node ids listed in FILE (one per line), compared exactly or,
                       failing that, by ``loose_id`` (a parametrization list computed from peft
                       objects can number its cases differently under peftkit);
  --hfps-results FILE  append one JSON line per test (outcome, crash line, duration) and per
                       collection error, as the run goes, so a killed run keeps what it did;
  --hfps-offline       make the suite's ``hub_online_once`` a no-op, so HF_HUB_OFFLINE=1 really
                       holds (it otherwise switches the hub back on for a model's first use, and
                       every failed request is then retried for ~25 s).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest
from hfps_selection import Rule

_AUTO_ID = re.compile(r"(?<=[\[-])([A-Za-z_]+?)\d+(?=[-\]])")
_results: IO[str] | None = None
_phases: dict[str, dict[str, Any]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("hf_peft_suite")
    group.addoption("--hfps-rule", default=None, help="JSON rule file (hfps_selection.Rule)")
    group.addoption("--hfps-ids", default=None, help="file with the node ids to keep")
    group.addoption("--hfps-results", default=None, help="JSON-lines file to append results to")
    group.addoption("--hfps-offline", action="store_true", help="make hub_online_once a no-op")


def loose_id(nodeid: str) -> str:
    """``nodeid`` without the numbers of pytest's automatic ids (``config_kwargs13`` -> ``config_kwargs#``)."""
    return _AUTO_ID.sub(r"\1#", nodeid)


def _write(record: dict[str, Any]) -> None:
    if _results is not None:
        _results.write(json.dumps(record) + "\n")
        _results.flush()


def pytest_configure(config: pytest.Config) -> None:
    global _results
    path = config.getoption("--hfps-results")
    if path:
        _results = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in pytest_unconfigure


def pytest_unconfigure(config: pytest.Config) -> None:
    global _results
    if _results is not None:
        _results.close()
        _results = None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    rule_path = config.getoption("--hfps-rule")
    ids_path = config.getoption("--hfps-ids")
    rule = Rule.from_json(json.loads(Path(rule_path).read_text())) if rule_path else None
    wanted = set(Path(ids_path).read_text().splitlines()) if ids_path else None
    wanted_loose = {loose_id(t) for t in wanted} if wanted is not None else set()
    for item in items:
        reason = rule.exclusion(item.nodeid) if rule else None
        if reason is not None:
            _write({"excluded": item.nodeid, "reason": reason})
            dropped.append(item)
        elif wanted is not None and item.nodeid not in wanted and loose_id(item.nodeid) not in wanted_loose:
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep


@contextlib.contextmanager
def _stay_offline(model_id: str) -> Iterator[None]:
    yield


def pytest_collection_finish(session: pytest.Session) -> None:
    for item in session.items:  # after every plugin's deselection (-k, the rule, the ids)
        _write({"collected": item.nodeid})
    if not session.config.getoption("--hfps-offline"):
        return
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "tests" and hasattr(module, "hub_online_once"):
            module.hub_online_once = _stay_offline  # type: ignore[attr-defined]


def crash_line(report: pytest.CollectReport | pytest.TestReport) -> str:
    """The first line of the exception a failed report carries (``Type: message``)."""
    longrepr = report.longrepr
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None and crash.message:
        return str(crash.message).strip().splitlines()[0]
    text = str(longrepr)
    error_lines = [line[1:].strip() for line in text.splitlines() if line.startswith("E ")]
    if error_lines:
        return error_lines[0]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "(no message)"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.failed:
        _write({"collect_error": report.nodeid, "message": crash_line(report)})


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    state = _phases.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": None, "duration": 0.0})
    state["duration"] += report.duration
    if report.when == "setup":
        if report.failed:
            state.update(outcome="error", message=crash_line(report), when="setup")
        elif report.skipped:
            state.update(outcome="skipped", message=_skip_reason(report))
    elif report.when == "call":
        if hasattr(report, "wasxfail"):
            state["outcome"] = "xfailed" if report.skipped else "xpassed"
        elif report.failed:
            state.update(outcome="failed", message=crash_line(report), when="call")
        elif report.skipped:
            state.update(outcome="skipped", message=_skip_reason(report))
        else:
            state["outcome"] = "passed"
    elif report.when == "teardown":
        if report.failed and state["outcome"] in (None, "passed"):
            state.update(outcome="error", message=crash_line(report), when="teardown")
        _phases.pop(report.nodeid)
        state["duration"] = round(state["duration"], 3)
        _write(state)


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return crash_line(report)

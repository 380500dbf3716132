"""The zygote back-end (run/zygote_control.py) against a fake control-socket client, table-driven.

The fake answers requests the way the zygote's `_answer` does (`start`/`stop`: null, `status`: a row per child,
`ping`: its pid) or raises what `zygote.call` raises when nothing answers (OSError: refused; ValueError: an
error reply). What the back-end must report follows from what is true of forked processes: they die with
their zygote, so a zygote that is not up has none running; a zygote still importing Synapse has forked none.
"""

from __future__ import annotations

import time

import pytest

from synapse_workers.run.control import Failure
from synapse_workers.run.watch import Report
from synapse_workers.run.zygote_control import ZygoteControl

HOST, CHILDREN = "synapse", ("main", "synchrotron1")
REFUSED = ConnectionRefusedError(111, "Connection refused")


class FakeClient:
    """`answers`: what each call answers in turn (an exception is raised); the last one repeats."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.requests: list[tuple[dict, float]] = []

    def __call__(self, request: dict, timeout: float):
        self.requests.append((request, timeout))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


def control(client, host_state="RUNNING", cancelled=lambda: False, tmp_path="/nonexistent"):
    return ZygoteControl(HOST, CHILDREN, str(tmp_path), client, lambda name: host_state, cancelled)


def row(name, state, pid, exitstatus=0, start=0):
    return {"name": name, "state": state, "pid": pid, "exitstatus": exitstatus, "start": start}


RUNNING_ROWS = [row("main", "RUNNING", 21, start=1700000000.5), row("synchrotron1", "BACKOFF", 0, 1)]
RUNNING_REPORTS = [Report("main", "RUNNING", 21, 0, 1700000000.5), Report("synchrotron1", "BACKOFF", 0, 1, 0.0)]
STOPPED = [Report("main", "STOPPED", 0), Report("synchrotron1", "STOPPED", 0)]

# (zygote's own row as supervisord reported it this round, the zygote's answer to `status`) → reported children
REPORT_CASES = {
    "a running zygote answers: its rows": (Report(HOST, "RUNNING", 20), RUNNING_ROWS, RUNNING_REPORTS),
    "a zygote still importing Synapse answers nothing: none forked yet": (Report(HOST, "STARTING", 20), REFUSED,
                                                                          STOPPED),
    "a dead zygote is not asked: its children died with it": (Report(HOST, "BACKOFF", 0), RUNNING_ROWS, STOPPED),
    "a stopped zygote is not asked": (Report(HOST, "STOPPED", 0), RUNNING_ROWS, STOPPED),
    "a zygote supervisord did not report": (None, RUNNING_ROWS, STOPPED),
}


@pytest.mark.parametrize("case", REPORT_CASES)
def test_reports(case):
    host, answer, expected = REPORT_CASES[case]
    client = FakeClient(answer)
    earlier = {"redis": Report("redis", "RUNNING", 5)} | ({HOST: host} if host else {})
    assert control(client).reports(earlier) == expected
    asked = [r for r, _ in client.requests]
    assert asked == ([{"op": "status"}] if host and host.state in ("STARTING", "RUNNING") else [])


def test_a_running_zygote_that_does_not_answer_keeps_its_last_report():
    client = FakeClient(RUNNING_ROWS, REFUSED)
    zygote = control(client)
    up = {HOST: Report(HOST, "RUNNING", 20)}
    assert zygote.reports(up) == RUNNING_REPORTS
    assert zygote.reports(up) == RUNNING_REPORTS  # busy (it answered nothing): the last answer stands
    assert zygote.reports({HOST: Report(HOST, "EXITED", 0)}) == STOPPED  # gone: so are they
    assert zygote.reports(up) == []  # back, not answering yet, nothing known since it died


def test_start_asks_once_it_answers():
    client = FakeClient(REFUSED, ValueError("still importing"), None)
    assert control(client).start(["main"], time.monotonic() + 30) is None
    assert [r for r, _ in client.requests] == [{"op": "start", "names": ["main"]}] * 3


START_FAILURES = {
    "the zygote is FATAL": ("FATAL", 30, "synapse (which forks main, synchrotron1) does not answer: "
                                         "[Errno 111] Connection refused."),
    "the deadline passed": ("RUNNING", -1, "synapse (which forks main, synchrotron1) does not answer: "
                                           "[Errno 111] Connection refused."),
}


@pytest.mark.parametrize("case", START_FAILURES)
def test_a_start_that_fails_blames_the_zygote(case):
    host_state, seconds, message = START_FAILURES[case]
    client = FakeClient(REFUSED)
    failure = control(client, host_state).start(["main", "synchrotron1"], time.monotonic() + seconds)
    assert failure == Failure(HOST, message)
    assert len(client.requests) == 1


def test_a_start_gives_up_quietly_when_the_stack_is_stopping():
    client = FakeClient(REFUSED)
    assert control(client, cancelled=lambda: True).start(["main"], time.monotonic() + 30) is None
    assert client.requests == []


def test_stop_is_one_request_and_never_raises():
    client = FakeClient(None)
    control(client).stop(["synchrotron1", "main"])
    assert client.requests == [({"op": "stop", "names": ["synchrotron1", "main"]}, 5.0)]
    control(FakeClient(REFUSED)).stop(["main"])  # a zygote that is gone: nothing left to stop


def test_its_health_check_is_the_zygotes_answer_on_its_socket():
    checks = control(FakeClient({"pid": 20})).checks()
    assert list(checks) == [HOST] and checks[HOST]() is None
    assert control(FakeClient(REFUSED)).checks()[HOST]() == "[Errno 111] Connection refused"


def test_tail_reads_the_output_listeners_capture(tmp_path):
    (tmp_path / "main.log").write_bytes(b"a" * 4000 + b"\nsynapse.config._base.ConfigError: bad\n")
    zygote = control(FakeClient(None), tmp_path=tmp_path)
    assert zygote.tail("main", 40) == "a\nsynapse.config._base.ConfigError: bad\n"  # the last 40 bytes
    assert zygote.tail("synchrotron1", 40) is None  # nothing captured yet
    assert zygote.names == {"main", "synchrotron1"} and zygote.host == HOST

"""The supervisord back-end (run/supervisord_control.py) against a fake supervisord XML-RPC proxy.

The fake answers as supervisord 4's `supervisor` namespace does (programs named `group:name`, `BAD_NAME`
faults for an unknown one, a refused connection when it is gone); the expectations are what supervisorctl
would be asked for: `start stack:redis`, `stop stack:nginx`, `tail stack:redis`. Starting the real supervisord
(`open`, `close`) is the integration tests' (tests/integration/test_e2e_stack.py, both launch modes).
"""

from __future__ import annotations

import xmlrpc.client
from pathlib import Path

import pytest

from synapse_workers.load import load_plan
from synapse_workers.programs import programs
from synapse_workers.run.control import UnreachableError
from synapse_workers.run.supervisord_control import SupervisordControl
from synapse_workers.run.watch import Report
from tests.unit.test_programs import BINARIES

BAD_NAME = 10  # supervisor.xmlrpc.Faults


class FakeSupervisord:
    """What `ServerProxy(...).supervisor` answers, for programs in the group `stack`."""

    def __init__(self, infos: list[dict]):
        self.infos = {f"stack:{i['name']}": i for i in infos}
        self.calls: list[tuple] = []
        self.down = False

    def _known(self, name: str) -> dict:
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        if name not in self.infos:
            raise xmlrpc.client.Fault(BAD_NAME, f"BAD_NAME: {name}")
        return self.infos[name]

    def getAllProcessInfo(self):  # noqa: N802 (supervisord's method names)
        if self.down:
            raise ConnectionRefusedError(111, "Connection refused")
        return list(self.infos.values())

    def getProcessInfo(self, name):  # noqa: N802
        return self._known(name)

    def startProcess(self, name, wait=True):  # noqa: N802
        self._known(name)
        self.calls.append(("startProcess", name, wait))
        return True

    def stopProcess(self, name, wait=True):  # noqa: N802
        self._known(name)
        self.calls.append(("stopProcess", name, wait))
        return True

    def tailProcessStdoutLog(self, name, offset, length):  # noqa: N802
        self._known(name)
        self.calls.append(("tailProcessStdoutLog", name, offset, length))
        return ["...captured by supervisord\n", offset + length, False]


class Proxy:
    def __init__(self, supervisor: FakeSupervisord):
        self.supervisor = supervisor


def info(name: str, state: str = "RUNNING", pid: int = 0, exitstatus: int = 0, start: int = 0) -> dict:
    return {"name": name, "group": "stack", "statename": state, "pid": pid, "exitstatus": exitstatus, "start": start,
            "description": "", "stdout_logfile": "", "spawnerr": ""}


@pytest.fixture
def setup(base_env):
    plan = load_plan({**base_env, "SYNAPSE_WORKER_TYPES": "synchrotron", "SYNAPSE_LAUNCH_MODE": "fork"})
    progs = programs(plan, as_root=False, binaries=BINARIES)
    assert [p.name for p in progs] == ["redis", "synapse", "nginx"]  # supervisord knows the zygote, not its children
    fake = FakeSupervisord([info("redis", pid=11, start=1700000000), info("synapse", "STARTING", 12, start=1700000001),
                            info("nginx", "EXITED", 0, 1, 1700000002)])
    return plan, SupervisordControl(plan.layout, progs, proxy=lambda: Proxy(fake)), fake


def test_its_programs_are_supervisords_not_what_they_fork(setup):
    _, control, _ = setup
    assert control.names == {"redis", "synapse", "nginx"} and control.host is None


def test_start_and_stop_ask_supervisord_by_group_name_without_waiting(setup):
    _, control, fake = setup
    assert control.start(["redis", "nginx"], deadline=0) is None
    control.stop(["nginx"])
    assert fake.calls == [("startProcess", "stack:redis", False), ("startProcess", "stack:nginx", False),
                          ("stopProcess", "stack:nginx", False)]


def test_reports_are_supervisords_rows(setup):
    _, control, _ = setup
    assert control.reports({}) == [Report("redis", "RUNNING", 11, 0, 1700000000.0),
                                   Report("synapse", "STARTING", 12, 0, 1700000001.0),
                                   Report("nginx", "EXITED", 0, 1, 1700000002.0)]
    assert control.state("synapse") == "STARTING"


def test_a_gone_supervisord_is_unreachable_for_reports_and_harmless_for_stop_and_tail(setup):
    _, control, fake = setup
    fake.down = True
    with pytest.raises(UnreachableError):
        control.reports({})
    control.stop(["redis"])  # nothing to stop: no exception
    assert control.tail("redis", 3000) is None
    assert control.checks() == {}


def test_tail_asks_supervisord_except_for_a_masked_capture(setup):
    plan, control, fake = setup
    assert control.tail("redis", 3000) == "...captured by supervisord\n"
    assert fake.calls == [("tailProcessStdoutLog", "stack:redis", 0, 3000)]
    # nginx's output may quote access tokens: supervisord keeps no copy, the output listener writes the capture.
    state = Path(plan.layout.state_dir)
    state.mkdir(parents=True)
    (state / "nginx.log").write_bytes(b"x" * 5000 + b"\nnginx: [emerg] bind() failed\n")
    assert control.tail("nginx", 100).endswith("x\nnginx: [emerg] bind() failed\n")
    assert len(control.tail("nginx", 100)) == 100
    assert fake.calls == [("tailProcessStdoutLog", "stack:redis", 0, 3000)]


def test_an_unknown_program_has_no_tail(setup):
    _, control, _ = setup
    assert control.tail("nonexistent", 3000) is None

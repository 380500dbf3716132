"""Chaos under load (the issue's test): clients chat through the public port while the stack's processes are
SIGKILLed one after another: synchrotron, event persister, the merged stream writer, main, Redis, nginx
(master) and the embedded PostgreSQL (postmaster).

Guarantees asserted (the driver, tests/support/chaos.py, measures; this test judges):
- every kill is followed by recovery: `health` exits 0 with the program back under a new PID, and a send
  started after the kill is acknowledged, each within the driver's bound;
- every acknowledged message is in the room exactly once for every member, read back through /messages
  down to the room's start: none lost, no event twice, no body under two event ids (a retried txn id never
  duplicates), each sender's messages in the order sent; every member also got each one through /sync
  (limited timelines filled via /messages, as a client does) and never twice;
- no send request ran into its bound (20 s) and no /sync into its (long-poll + 20 s): errors are answered,
  nothing hangs; every message was acknowledged in the end;
- the stack is healthy at the end, stops on SIGTERM with exit 0, and leaves nothing running.
The stack and its temp root are removed by the driver whatever happens. Runs once per launch mode.
"""

from __future__ import annotations

import pytest

from tests.support.chaos import KILLS, run_chaos
from tests.support.stack import LAUNCH_MODES

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT = 20.0


@pytest.mark.parametrize("mode", LAUNCH_MODES)
def test_sigkill_each_process_kind_under_load(mode: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SW_LAUNCH_MODE", mode)  # read by the stack harness (tests/support/stack.py)
    result = run_chaos(clients=4, kills=KILLS, between=6, send_interval=0.3, request_timeout=REQUEST_TIMEOUT,
                       budget=300, recover_timeout=120)
    print(result.summary())
    report = f"\n{result.summary()}\nstack log:\n{result.log_tail}"

    assert not result.aborted, result.aborted + report
    assert [k.program for k in result.kills] == list(KILLS), report
    for kill in result.kills:
        assert kill.health_s is not None and kill.first_ack_s is not None, f"{kill.program}: {kill.error}{report}"
        assert kill.new_pid not in (0, kill.pid), f"{kill.program} was not restarted{report}"

    assert len(result.acked) >= 6 * (len(KILLS) + 1), report
    assert not result.unacked, f"never acknowledged: {result.unacked}{report}"
    assert len(result.members) == 4 and all(m.events >= len(result.acked) for m in result.members), report
    for member in result.members:
        assert member.lost == [], f"{member.user_id} lost {member.lost}{report}"
        assert member.duplicate_ids == [], f"{member.user_id}: events twice {member.duplicate_ids}{report}"
        assert member.duplicate_bodies == [], f"{member.user_id}: bodies twice {member.duplicate_bodies}{report}"
        assert member.out_of_order == [], f"{member.user_id}: order {member.out_of_order}{report}"
        assert member.unexpected == [], f"{member.user_id}: unexpected {member.unexpected}{report}"
        assert member.sync_missing == 0 and member.sync_redelivered == 0, f"{member.user_id} via /sync{report}"

    assert result.timeouts == 0 and result.max_request_s < REQUEST_TIMEOUT, report
    assert result.sync_timeouts == 0 and result.max_sync_s < result.sync_bound, report

    assert result.final_health == "", result.final_health + report
    assert result.stop_code == 0, report
    assert result.stop_seconds < 30, report
    assert result.leftovers == {}, f"still running after a clean stop: {result.leftovers}{report}"
    assert result.problems() == [], report

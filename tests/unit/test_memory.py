"""A worker list whose processes cannot fit the memory we may use: warned about with the numbers at `check` and
`run`; an absurd total refused everywhere (exit 2, SYNAPSE_WORKER_TYPES named). The decision is pure and
table-tested; the reader is tested on files and, where this machine lets us, in a real cgroup."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from synapse_workers.cli import main as cli_main
from synapse_workers.memory import MemoryLimits, estimate_mib, memory_warning
from synapse_workers.run.memory import _memory_mounts, cgroup_memory_limit, limit_mib, meminfo
from synapse_workers.workers import parse_workers

from .test_cli_errors import SCRIPT

# docs/benchmarks.md, stated here again: 41 MiB per forked Synapse process (697 MiB for the Complement set's
# 17 + zygote), 88 MiB per separate process (1489 MiB for 17), 175 MiB for the rest of the stack at most.
FORK, PROCESS, REST = 41, 88, 175


@pytest.mark.parametrize(
    "processes, mode, expected",
    [(1, "fork", FORK + REST), (17, "fork", 17 * FORK + REST), (17, "process", 17 * PROCESS + REST)],
)
def test_estimate_is_the_measured_idle_memory(processes, mode, expected):
    assert estimate_mib(processes, mode) == expected


GIB = 1024
# (processes, mode, total, available, cgroup limit) → None, or the words and numbers the warning must carry
CASES = [
    (17, "fork", 24 * GIB, 20 * GIB, None, None),  # the benchmark machine: plenty
    (17, "fork", 24 * GIB, None, 2 * GIB, None),  # 872 MiB in a 2 GiB container
    (
        17,
        "process",
        24 * GIB,
        None,
        1 * GIB,
        [
            "17 Synapse processes",
            "1671 MiB",
            "17 x 88 MiB",
            "1024 MiB",
            "cgroup",
            "SYNAPSE_LAUNCH_MODE=fork (41 MiB each)",
        ],
    ),
    (17, "fork", 512, 400, None, ["872 MiB", "17 x 41 MiB", "512 MiB", "MemTotal"]),  # the ceiling before available
    (17, "fork", 4 * GIB, 600, None, ["872 MiB", "600 MiB", "MemAvailable"]),
    (17, "fork", 4 * GIB, None, None, None),  # `check`: available not compared
    (17, "fork", 4 * GIB, 600, 8 * GIB, ["600 MiB available now"]),  # a limit above the machine's memory
    (3, "fork", 2 * GIB, 1 * GIB, 512, None),  # 298 MiB fits 512
    (3, "process", 2 * GIB, 1 * GIB, 300, ["439 MiB", "300 MiB"]),
    (1, "fork", None, None, None, None),  # nothing known: no warning
]


@pytest.mark.parametrize("processes, mode, total, available, limit, words", CASES)
def test_memory_warning(processes, mode, total, available, limit, words):
    warning = memory_warning(processes, mode, MemoryLimits(total, available, limit))
    if words is None:
        assert warning is None
    else:
        assert warning is not None and warning.startswith("SYNAPSE_WORKER_TYPES: ")
        for word in words:
            assert word in warning, (word, warning)
        if mode == "fork":
            assert "SYNAPSE_LAUNCH_MODE" not in warning


def test_meminfo_and_limit_parsers():
    assert meminfo("MemTotal:       24683792 kB\nMemFree: 1 kB\nMemAvailable:   23616172 kB\n") == (24105, 23062)
    assert meminfo("") == (None, None)
    assert limit_mib("max\n") is None  # v2 unlimited
    assert limit_mib("9223372036854771712\n") is None  # v1 unlimited
    assert limit_mib("536870912\n") == 512
    assert limit_mib("") is None


def _fake_proc(root: Path, cgroup: str, mountinfo: str) -> Path:
    proc = root / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(mountinfo)
    return proc


def test_reader_v2_takes_the_smallest_limit_on_the_way_up(tmp_path):
    mount = tmp_path / "cg2"
    (mount / "system.slice" / "app.service").mkdir(parents=True)
    (mount / "memory.max").write_text("max\n")
    (mount / "system.slice" / "memory.max").write_text(f"{768 * 1024 * 1024}\n")
    (mount / "system.slice" / "app.service" / "memory.max").write_text(f"{2048 * 1024 * 1024}\n")
    proc = _fake_proc(tmp_path, "0::/system.slice/app.service\n", f"40 30 0:38 / {mount} rw - cgroup2 cgroup2 rw\n")
    assert cgroup_memory_limit(proc) == 768


def test_reader_v1_memory_hierarchy_and_no_limit(tmp_path):
    mount = tmp_path / "memory"
    (mount / "docker" / "abc").mkdir(parents=True)
    (mount / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    (mount / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{300 * 1024 * 1024}\n")
    mountinfo = f"35 31 0:32 / {mount} rw,relatime - cgroup cgroup rw,memory\n"
    proc = _fake_proc(tmp_path, "4:memory:/docker/abc\n1:cpu:/\n0::/\n", mountinfo)
    assert cgroup_memory_limit(proc) == 300
    assert _memory_mounts(mountinfo) == {"memory": ("/", str(mount))}
    (mount / "docker" / "abc" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(proc) is None


def _memory_cgroup_dir() -> tuple[Path, str] | None:
    """Where we may create a memory cgroup here: (parent dir, limit file name), or None."""
    mounts = _memory_mounts(Path("/proc/self/mountinfo").read_text())
    for key, name in (("", "memory.max"), ("memory", "memory.limit_in_bytes")):
        if key in mounts:
            point = Path(mounts[key][1])
            if key == "" and "memory" not in (point / "cgroup.subtree_control").read_text(errors="replace"):
                continue
            if os.access(point, os.W_OK):
                return point, name
    return None


@pytest.fixture
def memory_cgroup():
    """A memory cgroup of our own with a 256 MiB limit; removed afterwards (its processes gone first)."""
    found = _memory_cgroup_dir()
    if found is None:
        pytest.skip("no writable memory cgroup hierarchy here")
    parent, limit_file = found
    group = parent / f"sw-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / limit_file).write_text(str(256 * 1024 * 1024))
    except OSError as exc:
        with contextlib.suppress(OSError):
            group.rmdir()
        pytest.skip(f"cannot create a memory cgroup: {exc}")
    try:
        yield group
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


def _in_cgroup(group: Path, argv: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run argv inside `group` (the child joins it before exec)."""

    def join() -> None:
        (group / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.run(argv, env=env, preexec_fn=join, capture_output=True, text=True, timeout=120)


def test_reader_in_a_real_cgroup(memory_cgroup):
    code = "from synapse_workers.run.memory import cgroup_memory_limit; print(cgroup_memory_limit())"
    result = _in_cgroup(memory_cgroup, [sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "256"


def test_check_warns_in_a_real_cgroup(memory_cgroup, base_env):
    """`check` in a 256 MiB cgroup with 8 forked workers (9 x 41 + 175 = 544 MiB): a warning with the numbers."""
    env = {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_WORKER_TYPES": "synchrotron:8",
           "PATH": os.environ["PATH"]}  # fmt: skip
    result = _in_cgroup(memory_cgroup, [SCRIPT, "check"], env)
    assert "Traceback" not in result.stderr
    assert (
        "synapse-workers: warning: SYNAPSE_WORKER_TYPES: 9 Synapse processes need about 544 MiB even when idle "
        "(9 x 41 MiB measured in fork mode" in result.stderr
    ), result.stderr
    assert "more than the 256 MiB the memory limit of this container or service (cgroup)" in result.stderr


def test_an_absurd_worker_list_is_refused(base_env, tmp_root):
    spec = ", ".join(f"{t}:64" for t in ("synchrotron", "client_reader", "event_creator", "federation_reader"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli_main(["generate"], env={**base_env, "SYNAPSE_WORKER_TYPES": spec})
    assert code == 2
    assert (
        "SYNAPSE_WORKER_TYPES: 256 workers (with main, 257 Synapse processes): expected at most 255" in err.getvalue()
    )
    assert not any(tmp_root.iterdir())
    assert len(parse_workers(spec.replace("federation_reader:64", "federation_reader:63"))) == 255  # the bound


def test_run_warns_in_a_real_cgroup_before_it_starts(memory_cgroup, base_env, tmp_root):
    """`run` says it too, before anything starts (here it then stops: its runtime dir is under a closed dir)."""
    closed = tmp_root / "closed"
    closed.mkdir(mode=0o700)
    env = {**base_env, "SYNAPSE_HTTP_PORT": "8008", "SYNAPSE_WORKER_TYPES": "synchrotron:8",
           "SYNAPSE_RUNTIME_DIR": str(closed / "run"), "PATH": os.environ["PATH"]}  # fmt: skip
    result = _in_cgroup(memory_cgroup, [SCRIPT, "run"], env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "warning: SYNAPSE_WORKER_TYPES: 9 Synapse processes need about 544 MiB" in result.stderr
    assert "256 MiB the memory limit of this container or service (cgroup)" in result.stderr

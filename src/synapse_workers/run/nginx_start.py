"""Start nginx after clearing what a killed nginx of ours left behind: the nginx program's command.

    python -m synapse_workers.run.nginx_start NGINX -c CONF [ARGS...]

A SIGKILLed nginx master leaves its worker processes running. They keep the listening sockets (and keep
serving on them), so the restarted master cannot bind ("Address already in use"), exits, and supervisord
gives up on it (FATAL): the whole stack stops. So before nginx starts, this step kills those leftovers, then
execs nginx in its own place (same pid: supervisord watches and signals nginx itself).

Only nginx processes of ours are killed, found like this:
- CONF's `pid` directive names the pid file; the old master's pid P is still in it (nginx removes it only on
  a clean exit, and a master that fails to bind does not rewrite it). No pid directive, no pid file: nothing.
- supervisord starts each program in its own process group, so the old master's workers are in group P, and
  Linux hands out P to no new process while that group has a member.
- Each process killed is in group P, is not this process, calls itself `nginx: ...` with the command name
  nginx, and runs the same binary as NGINX (when /proc/PID/exe can be read).
- If P is alive, it must be an nginx master started with `-c CONF`; otherwise the pid file is stale, P is
  someone else's, and nothing is killed.
Processes are pinned with pidfds and checked again before the signal, so a reused pid is never hit.

`NGINX_WORKER_PROCESSES=auto` leaves `worker_processes` out of CONF; then this step counts the CPUs nginx may
really use (`run/cpus.py`: affinity capped by the cgroup CPU quota, which nginx's own `auto` ignores) and
adds `worker_processes N;` to the `-g` directives.
"""

from __future__ import annotations

import os
import re
import select
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from .cpus import usable_cpus

PROC = Path("/proc")
WAIT_SECONDS = 5.0  # SIGKILLed processes are gone at once; this bounds a start that cannot see them go
_WORKERS_DIRECTIVE = re.compile(r"^\s*worker_processes\s", re.M)
_PID_DIRECTIVE = re.compile(r"""^\s*pid\s+["']?([^"';\s]+)["']?\s*;""", re.M)


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    state: str  # R, S, Z, ...
    pgid: int
    comm: str
    cmdline: bytes  # NUL-separated as in /proc (nginx rewrites it to its title)
    exe: str | None  # None: not readable (another user's process, without privileges)


def read_proc(pid: int, proc: Path = PROC) -> ProcInfo | None:
    """What /proc says about one process; None when it is gone (or unreadable)."""
    base = proc / str(pid)
    try:
        fields = (base / "stat").read_text().rsplit(")", 1)[1].split()
        comm = (base / "comm").read_text().rstrip("\n")
        cmdline = (base / "cmdline").read_bytes()
    except (OSError, IndexError, ValueError):
        return None
    try:
        exe: str | None = os.readlink(base / "exe")
    except OSError:
        exe = None
    try:
        return ProcInfo(pid, fields[0], int(fields[2]), comm, cmdline, exe)
    except (IndexError, ValueError):
        return None


def conf_argument(args: list[str]) -> str | None:
    """The value of nginx's `-c` option, if any."""
    for i, arg in enumerate(args):
        if arg == "-c" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("-c") and len(arg) > 2:
            return arg[2:]
    return None


def pid_file_of(conf_text: str) -> str | None:
    match = _PID_DIRECTIVE.search(conf_text)
    return match.group(1) if match else None


def read_pid(pid_file: str) -> int | None:
    try:
        text = Path(pid_file).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 1 else None


class _Matcher:
    """Is a process an nginx process of ours: in group `old_pid`, started from `nginx`, not us?"""

    def __init__(self, nginx: str, conf: str, old_pid: int, me: int) -> None:
        self.binary = os.path.realpath(nginx)
        self.conf = conf
        self.old_pid = old_pid
        self.me = me

    def nginx(self, info: ProcInfo) -> bool:
        if info.pid == self.me or info.state == "Z":
            return False
        if info.comm != "nginx" or not info.cmdline.startswith(b"nginx: "):
            return False
        return info.exe is None or info.exe.removesuffix(" (deleted)") == self.binary

    def master(self, info: ProcInfo) -> bool:
        title = b" " + info.cmdline.replace(b"\0", b" ").strip() + b" "
        started_with_conf = b" -c " + os.fsencode(self.conf) + b" " in title
        return self.nginx(info) and title.startswith(b" nginx: master process ") and started_with_conf

    def member(self, info: ProcInfo) -> bool:
        if info.pgid != self.old_pid:
            return False
        return self.master(info) if info.pid == self.old_pid else self.nginx(info)


def leftovers(nginx: str, conf: str, old_pid: int, proc: Path = PROC, me: int | None = None) -> list[int]:
    """The pids of our old nginx's processes still alive: the master (if alive) and its process group."""
    match = _Matcher(nginx, conf, old_pid, os.getpid() if me is None else me)
    leader = read_proc(old_pid, proc)
    if leader is not None and leader.state != "Z" and not match.master(leader):
        return []  # a stale pid file: P is now someone else's process (or group)
    found = []
    for entry in proc.iterdir():
        if entry.name.isdigit() and (info := read_proc(int(entry.name), proc)) is not None and match.member(info):
            found.append(info.pid)
    return sorted(found)


def _kill(pids: list[int], check: _Matcher) -> list[int]:
    """SIGKILL each process still matching, pinned by a pidfd; wait until they are gone. Returns the killed."""
    pinned: list[tuple[int, int | None]] = []
    for pid in pids:
        try:
            fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:
            continue
        except OSError:
            fd = None  # no pidfd support: the check below is as close as it gets
        info = read_proc(pid)
        if info is None or not check.member(info):
            if fd is not None:
                os.close(fd)
            continue
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        pinned.append((pid, fd))
    deadline = time.monotonic() + WAIT_SECONDS
    for pid, fd in pinned:
        while (remaining := deadline - time.monotonic()) > 0:
            if fd is not None:
                if select.select([fd], [], [], remaining)[0]:  # readable: the process has exited
                    break
            elif (info := read_proc(pid)) is None or info.state == "Z":
                break
            else:
                time.sleep(0.02)
        if fd is not None:
            os.close(fd)
    return [pid for pid, _ in pinned]


def read_conf(args: list[str]) -> tuple[str, str] | None:
    """nginx's `-c` file and its text; None without one, or when it cannot be read (nginx will say why)."""
    conf = conf_argument(args)
    if conf is None:
        return None
    try:
        return conf, Path(conf).read_text(errors="replace")
    except OSError:
        return None


def clear_leftovers(nginx: str, conf: tuple[str, str] | None) -> list[int]:
    """Kill what a killed nginx started with the same config (`read_conf`) left running. Returns the pids
    killed."""
    if conf is None:
        return []
    conf_path, conf_text = conf
    pid_file = pid_file_of(conf_text)
    old_pid = read_pid(pid_file) if pid_file else None
    if old_pid is None:
        return []
    pids = leftovers(nginx, conf_path, old_pid)
    if not pids:
        return []
    killed = _kill(pids, _Matcher(nginx, conf_path, old_pid, os.getpid()))
    if killed:
        listed = ", ".join(map(str, killed))
        print(
            f"nginx_start: killed {len(killed)} process(es) left by the previous nginx (master pid {old_pid}, "
            f"from {pid_file}): {listed}",
            file=sys.stderr,
            flush=True,
        )
    return killed


def with_worker_processes(args: list[str], conf_text: str, cpus: int) -> list[str]:
    """nginx's arguments with `worker_processes CPUS;` among the -g directives when CONF sets none (nginx
    reads a single -g: the directives are joined)."""
    if _WORKERS_DIRECTIVE.search(conf_text):
        return args
    directive = f"worker_processes {cpus};"
    if "-g" in args[:-1]:
        at = len(args) - 1 - args[::-1].index("-g")
        return [*args[: at + 1], f"{args[at + 1].rstrip()} {directive}".lstrip(), *args[at + 2 :]]
    return [*args, "-g", directive]


def _worker_processes(args: list[str], conf: tuple[str, str] | None) -> list[str]:
    text = conf[1] if conf else ""
    if conf_argument(args[1:]) and conf is None:
        return args  # an unreadable config: nginx will say what is wrong with it
    if _WORKERS_DIRECTIVE.search(text):
        return args
    cpus = usable_cpus()
    print(f"nginx_start: worker_processes auto: {cpus} (CPUs usable here, cgroup quota included)", file=sys.stderr)
    return with_worker_processes(args, text, cpus)


def main(argv: list[str] | None = None) -> NoReturn:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m synapse_workers.run.nginx_start NGINX [ARGS...]", file=sys.stderr)
        sys.exit(2)
    conf = read_conf(args[1:])  # read once: for the leftovers' pid file and for worker_processes
    try:
        clear_leftovers(args[0], conf)
    except Exception as exc:  # never keep nginx from starting: at worst it reports the bind error itself
        print(f"nginx_start: could not look for a previous nginx's processes: {exc!r}", file=sys.stderr, flush=True)
    args = _worker_processes(args, conf)
    sys.stderr.flush()
    os.execv(args[0], args)


if __name__ == "__main__":
    main()

"""Send latency while `synapse-workers backup` runs: does a backup slow the server to a stop?

One stack (embedded PostgreSQL, monolith unless --workers, fork mode), --senders users each sending messages one
after another into one room (PUT /rooms/{id}/send/m.room.message/{txn}, rate limits lifted for them through the
admin API) for the whole run. The media store gets --media-mib MiB of random files first (written straight into it
as Synapse's user: the backup reads files, how they got there does not matter), and the database the messages of
a warm-up. Three windows, one after another, same load:

  idle        --idle seconds, no backup
  backup      `synapse-workers backup -o <new dir>` as shipped: nice 10, best-effort I/O level 7, and the
              embedded cluster's backend that serves pg_dump reniced the same way
  unniced     the same backup with the priority lowering switched off (run/backup.lower_priority replaced by a
              no-op in the backup's process), for comparison

Each backup writes into its own new directory (nothing to hard-link: every media file is copied and hashed).
For each window: sends started in it, their latency p50/p90/max (ms), sends/s, the backup's duration, and the CPU
other processes of the machine used meanwhile (cores). ~40 s with the defaults.

    /opt/synapse-workers/venv/bin/python bench/backup_load.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import quote

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SW, CpuWindow, fmt, make_root, percentile, print_header, print_table, stack_env  # noqa: E402
from tests.support.matrix import register, registration_secret, unlimited  # noqa: E402
from tests.support.stack import Stack  # noqa: E402

UNNICED = (
    "import sys; import synapse_workers.run.backup as b; b.lower_priority = lambda pid=0: None; "
    "from synapse_workers.cli import main; sys.exit(main(sys.argv[1:]))"
)


class Sender(threading.Thread):
    def __init__(self, base: str, token: str, room: str, index: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.base, self.token, self.room, self.index, self.stop = base, token, room, index, stop
        self.samples: list[tuple[float, float]] = []  # (started, seconds)
        self.errors = 0

    def run(self) -> None:
        with httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=60) as http:
            n = 0
            while not self.stop.is_set():
                path = f"/_matrix/client/v3/rooms/{quote(self.room)}/send/m.room.message/bench-{self.index}-{n}"
                started = time.monotonic()
                try:
                    response = http.put(path, json={"msgtype": "m.text", "body": f"{self.index} {n} " + "x" * 200})
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.samples.append((started, time.monotonic() - started))
                else:
                    self.errors += 1
                n += 1


def fill_media(media: Path, mib: int, uid: int = 991) -> None:
    """Random files of 1-8 MiB in Synapse's layout (local_content/ab/cd/rest), owned by Synapse's user."""
    written, n = 0, 0
    while written < mib << 20:
        size = min((1 + n % 8) << 20, (mib << 20) - written)
        name = f"{n:024x}"
        path = media / "local_content" / name[:2] / name[2:4] / name[4:]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
        written += size
        n += 1
    for root, dirs, files in os.walk(media):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid)


def window(senders: list[Sender], start: float, end: float) -> tuple[list[float], int]:
    latencies = [s * 1000 for sender in senders for started, s in sender.samples if start <= started < end]
    return latencies, len(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--idle", type=float, default=8.0, help="seconds of the window without a backup")
    parser.add_argument("--media-mib", type=int, default=800)
    parser.add_argument("--workers", default="", help="SYNAPSE_WORKER_TYPES (default: a monolith)")
    args = parser.parse_args()
    print_header("send latency with and without a backup running (bench/backup_load.py)", args)
    root = make_root("sw-bbackup-")
    env = stack_env(root, args.workers, SYNAPSE_LAUNCH_MODE=os.environ.get("SW_LAUNCH_MODE", "fork"))
    stack = Stack(env)
    stop = threading.Event()
    try:
        stack.start()
        base = stack.base_url
        secret = registration_secret(root / "data")
        admin = register(base, secret, "admin", admin=True)
        users = [register(base, secret, f"sender{i}") for i in range(args.senders)]
        for user in users:
            unlimited(base, admin["access_token"], user["user_id"])
        owner = {"Authorization": f"Bearer {users[0]['access_token']}"}
        room = httpx.post(f"{base}/_matrix/client/v3/createRoom", headers=owner, json={"preset": "public_chat"},
                          timeout=60).raise_for_status().json()["room_id"]
        for user in users[1:]:
            httpx.post(f"{base}/_matrix/client/v3/join/{quote(room)}", timeout=60,
                       headers={"Authorization": f"Bearer {user['access_token']}"}).raise_for_status()
        fill_media(root / "data" / "media_store", args.media_mib)
        senders = [Sender(base, u["access_token"], room, i, stop) for i, u in enumerate(users)]
        for sender in senders:
            sender.start()
        time.sleep(3)  # warm-up (and some rows in the database)
        rows = []
        for label, command in (
            ("idle", None),
            ("backup (nice 10, I/O best-effort 7)", [SW]),
            ("backup, priority not lowered", [sys.executable, "-c", UNNICED]),
        ):
            with CpuWindow() as cpu:
                start = time.monotonic()
                took, size = None, "-"
                if command is None:
                    time.sleep(args.idle)
                else:
                    out = root / f"backups-{len(rows)}"
                    result = subprocess.run([*command, "backup", "-o", str(out)], env=env, capture_output=True,
                                            text=True, timeout=600)
                    took = time.monotonic() - start
                    if result.returncode != 0:
                        raise RuntimeError(f"backup failed: {result.stderr}")
                    size = f"{sum(p.stat().st_size for p in out.rglob('*') if p.is_file()) / (1 << 20):.0f}"
                end = time.monotonic()
            latencies, count = window(senders, start, end)
            rows.append([
                label, count, fmt(count / (end - start)), fmt(percentile(latencies, 50)),
                fmt(percentile(latencies, 90)), fmt(max(latencies) if latencies else None),
                fmt(took), size, fmt(cpu.foreign, 2),
            ])  # fmt: skip
        stop.set()
        for sender in senders:
            sender.join(60)
        print_table(
            ["window", "sends", "sends/s", "p50 ms", "p90 ms", "max ms", "backup s", "backup MiB", "other CPU"],
            rows,
            title=f"{args.senders} senders, one room, media store {args.media_mib} MiB; send errors: "
            f"{sum(s.errors for s in senders)}",
        )
    finally:
        stop.set()
        stack.close(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

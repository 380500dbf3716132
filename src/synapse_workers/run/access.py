"""Before anything starts: can Synapse's user use every file and directory it will need?

A data dir or a file the user's homeserver.yaml names that Synapse's user cannot use (a signing key made by
root, 0600; a root-owned data dir where Synapse must create `media_store`; media written by an image that ran
Synapse as root) would otherwise surface as a crash loop of Synapse tracebacks. We re-own nothing we did not
create: `run` and `check` stop with exit 2, every problem at once, each with the exact command to run.

Three steps: `needs` (pure: the plan → what must be readable, writable or creatable, by whom), `probe` (the I/O:
facts about those paths and the directories above them, gathered *as* Synapse's user: a forked child drops to
UID/GID with no supplementary groups, exactly as `setpriv --reuid --regid --clear-groups` does in programs.py,
and asks os.access, so ACLs, read-only mounts and root squashing count too), `problems` (pure: needs + facts →
messages).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import yaml

from ..errors import File, Problem, Subject, Variable, YamlPath
from ..plan import Plan

# The variables the paths below come from (made at import: a name not in the registry fails there).
DATA_DIR, CONFIG_PATH = Variable("SYNAPSE_DATA_DIR"), Variable("SYNAPSE_CONFIG_PATH")
MEDIA_STORE_PATH, DATABASE = Variable("SYNAPSE_MEDIA_STORE_PATH"), Variable("SYNAPSE_DATABASE")
LOG_CONFIG, LOGS_TO_DISK = Variable("SYNAPSE_LOG_CONFIG"), Variable("SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK")
TLS_CERT, TLS_KEY = Variable("SYNAPSE_TLS_CERT"), Variable("SYNAPSE_TLS_KEY")

SYNAPSE = "synapse"  # Synapse's processes: UID/GID (as root), no supplementary groups
LAUNCHER = "launcher"  # whoever runs `run` (root in the container): nginx's master reads TLS files as it

READ = "read"  # a file to read
ENTER = "enter"  # a directory to pass through (what Synapse creates or writes in it has needs of its own)
WRITE_DIR = "write-dir"  # a directory to create files in (and enter)
READ_WRITE = "read-write"  # a file to read and write, whose directory is written too (SQLite journal, log rotation)

# Media store subdirectories Synapse writes into (synapse/media/filepath.py); checked with their own subdirs.
MEDIA_DIRS = (
    "local_content",
    "local_thumbnails",
    "remote_content",
    "remote_thumbnail",
    "url_cache",
    "url_cache_thumbnails",
)


@dataclass(frozen=True)
class Need:
    path: str  # absolute
    kind: str  # READ, WRITE_DIR, READ_WRITE
    what: str  # where the path comes from: "SYNAPSE_DATA_DIR", "signing_key_path in /data/homeserver.yaml"
    who: str = SYNAPSE
    create: bool = False  # missing: Synapse creates it (its nearest existing parent must let it)
    ours: bool = False  # missing: we create it, for Synapse's user
    tree: bool = False  # a tree Synapse writes throughout (the media store): its subdirectories too, chown -R
    # The variable or homeserver.yaml key the path comes from, as data (`what` says it in words; not compared).
    subject: Subject | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Fact:
    """One path as seen by one identity (`os.stat` follows symlinks, as Synapse's open does)."""

    exists: bool
    is_dir: bool = False
    uid: int = 0
    gid: int = 0
    mode: int = 0
    r: bool = False
    w: bool = False
    x: bool = False
    blocked: tuple[str, ...] = ()  # tree needs: subdirectories the identity cannot write or enter


def needs(plan: Plan, cwd: str, log_files: Iterable[str] = ()) -> list[Need]:
    """Every path Synapse (or nginx's master) will use, from the plan. cwd: Synapse's working directory (a
    relative path in homeserver.yaml is relative to it); log_files: the files SYNAPSE_LOG_CONFIG's handlers
    write (read by the edge from that file)."""
    hs, core = plan.homeserver, plan.settings.core

    def absolute(path: str) -> str:
        return os.path.normpath(os.path.join(cwd, path))

    in_file = f"in {hs.path}"

    # Synapse writes nothing in the data dir itself: what it creates there (media store, SQLite database, log
    # files) is a need of its own, so a root-owned 0755 data dir whose media store is Synapse's still works.
    def key(name: str) -> YamlPath:
        return YamlPath(hs.path, name)

    wanted = [Need(core.data_dir, ENTER, str(DATA_DIR), ours=True, subject=DATA_DIR)]
    if hs.exists:
        wanted.append(Need(hs.path, READ, str(CONFIG_PATH), subject=CONFIG_PATH))
        if hs.signing_key_path:
            signing = absolute(hs.signing_key_path)
            wanted.append(
                Need(signing, READ, f"signing_key_path {in_file}", create=True, subject=key("signing_key_path"))
            )
        media = absolute(hs.media_store_path or "media_store")
        origin = "media_store_path" if hs.media_store_path else "media_store (Synapse's default media_store_path)"
        wanted.append(
            Need(media, WRITE_DIR, f"{origin} {in_file}", create=True, tree=True, subject=key("media_store_path"))
        )
        if hs.sqlite_database:
            wanted.append(
                Need(
                    absolute(hs.sqlite_database),
                    READ_WRITE,
                    f"the SQLite database {in_file}",
                    create=True,
                    subject=key("database.args.database"),
                )
            )
        for key_name, path in hs.key_files:
            if key_name == "turn_shared_secret_path" and plan.turn_uris:
                continue  # shared.yaml sets its own
            wanted.append(Need(absolute(path), READ, f"{key_name} {in_file}", subject=key(key_name)))
        if plan.local("nginx") and any(listener.tls for listener in hs.listeners):  # nginx serves them
            for key_name, value in (
                ("tls_certificate_path", hs.tls_certificate_path),
                ("tls_private_key_path", hs.tls_private_key_path),
            ):
                if value:
                    wanted.append(
                        Need(absolute(value), READ, f"{key_name} {in_file}", who=LAUNCHER, subject=key(key_name))
                    )
    else:  # generated now: we create the media store (given to Synapse's user) when it is missing
        wanted.append(
            Need(plan.media_store, WRITE_DIR, str(MEDIA_STORE_PATH), ours=True, tree=True, subject=MEDIA_STORE_PATH)
        )
        if hs.database == "sqlite":  # the generated database block's file (homeserver.database_block)
            database = f"{core.data_dir}/homeserver.db"
            wanted.append(Need(database, READ_WRITE, f"{DATABASE}=sqlite", create=True, subject=DATABASE))
    for path in plan.app_service_config_files:
        wanted.append(Need(absolute(path), READ, "an application service registration file", subject=File(path)))
    if hs.user_log_config:
        wanted.append(Need(hs.user_log_config, READ, str(LOG_CONFIG), subject=LOG_CONFIG))
        for path in log_files:
            what = f"a log file {LOG_CONFIG}'s handlers write"
            wanted.append(Need(absolute(path), READ_WRITE, what, create=True, subject=File(absolute(path))))
    if plan.disk_logs:
        wanted.append(Need(plan.disk_logs, WRITE_DIR, str(LOGS_TO_DISK), ours=True, subject=LOGS_TO_DISK))
    public = plan.public
    for variable, value in ((TLS_CERT, public.tls_cert), (TLS_KEY, public.tls_key)):
        if value and plan.local("nginx"):
            wanted.append(Need(value, READ, str(variable), who=LAUNCHER, subject=variable))
    return list(dict.fromkeys(wanted))


def paths_to_probe(wanted: Iterable[Need]) -> dict[str, dict[str, bool]]:
    """who → {path: tree}: each needed path and every directory above it."""
    result: dict[str, dict[str, bool]] = {}
    for need in wanted:
        paths = result.setdefault(need.who, {})
        paths[need.path] = paths.get(need.path, False) or need.tree
        for parent in _parents(need.path):
            paths.setdefault(parent, False)
    return result


def _parents(path: str) -> list[str]:
    """The directories above path, nearest first, up to /."""
    parents = []
    while path != "/":
        path = os.path.dirname(path)
        parents.append(path)
    return parents


EXPECTED = {
    ENTER: "a directory it can enter",
    READ: "a file it can read",
    WRITE_DIR: "a directory it can enter and write in",
    READ_WRITE: "a file it can read and write",
}


def problems(wanted: Iterable[Need], facts: Mapping[tuple[str, str], Fact], uid: int, gid: int) -> list[Problem]:
    """Needs and what the probe saw → one problem per path (its subject the variable or homeserver.yaml key the
    path comes from), each with its command; the same blocking directory is named once. uid/gid: who Synapse
    runs as."""
    wanted = list(wanted)
    ours = {need.path for need in wanted if need.ours}
    found: list[Problem] = []
    commands: list[str] = []

    def report(need: Need, message: str, command: str | None) -> None:
        if message in found:
            return
        expected = f"{EXPECTED[need.kind]}, as {identity[need.who]}"
        found.append(Problem(message, need.subject or File(need.path), expected=expected, found=need.path))
        if command and command not in commands:
            commands.append(command)

    identity = {
        SYNAPSE: f"UID={uid}/GID={gid} (Synapse's user)",
        LAUNCHER: "the launcher's user (root in a container: nginx's master process reads it)",
    }
    closed: set[tuple[str, str]] = set()  # (who, directory) already named as one that cannot be entered
    for need in wanted:
        who = identity[need.who]
        fact = facts[(need.who, need.path)]
        parents = _parents(need.path)
        blocking = next(
            (p for p in reversed(parents) if facts[(need.who, p)].exists and not facts[(need.who, p)].x), None
        )
        if blocking is not None:
            if (need.who, blocking) not in closed:
                closed.add((need.who, blocking))
                command = _chmod_x(facts[(need.who, blocking)], blocking, uid, gid, need.who)
                report(
                    need,
                    f"{need.path} ({need.what}) is not accessible to {who}: it cannot enter {blocking} on the way. "
                    f"Run as root: `{command}`.",
                    command,
                )
            continue
        if not fact.exists:
            if need.ours:
                continue
            if not need.create:
                report(need, f"{need.path} ({need.what}) does not exist: expected an existing file.", None)
                continue
            parent = next(p for p in parents if facts[(need.who, p)].exists)
            parent_fact = facts[(need.who, parent)]
            if parent_fact.w and parent_fact.x:
                continue
            if any(p in ours for p in parents[: parents.index(parent)]):
                continue  # it will be in a directory we create for Synapse's user (a new data dir)
            if need.kind == WRITE_DIR:
                command = f"mkdir -p {need.path} && chown {uid}:{gid} {need.path}"
            else:
                command = f"chown {uid}:{gid} {parent}"
                if command in commands:
                    continue  # that directory is named already
            report(
                need,
                f"{need.path} ({need.what}) does not exist, and {who} cannot create it: {parent} does not let it "
                f"write. Run as root: `{command}`.",
                command,
            )
            continue
        if need.kind == ENTER:
            if not fact.is_dir:
                report(need, f"{need.path} ({need.what}) is not a directory: expected a directory.", None)
                continue
            missing = [] if fact.x else ["enter it"]
            if not fact.x:
                closed.add((need.who, need.path))
        elif need.kind == READ:
            if fact.is_dir:
                report(need, f"{need.path} ({need.what}) is a directory: expected a file.", None)
                continue
            missing = [] if fact.r else ["read it"]
        elif need.kind == WRITE_DIR:
            if not fact.is_dir:
                report(need, f"{need.path} ({need.what}) is not a directory: expected a directory.", None)
                continue
            missing = [verb for verb, ok in (("enter it", fact.x), ("write in it", fact.w)) if not ok]
            if not fact.x:
                closed.add((need.who, need.path))
        else:
            missing = [verb for verb, ok in (("read it", fact.r), ("write it", fact.w)) if not ok]
            parent_fact = facts[(need.who, parents[0])]
            if not missing and not parent_fact.w:
                command = f"chown {uid}:{gid} {parents[0]}"
                if command in commands:
                    continue  # that directory is named already
                report(
                    need,
                    f"{parents[0]} (the directory of {need.path}, {need.what}) is not accessible to {who}: it "
                    f"cannot write in it. Run as root: `{command}`.",
                    command,
                )
                continue
        recursive = "-R " if need.tree else ""
        owner = f"{uid}:{gid}" if need.who == SYNAPSE else "0:0"
        if missing:
            command = f"chown {recursive}{owner} {need.path}"
            report(
                need,
                f"{need.path} ({need.what}) is not accessible to {who}: it cannot {' or '.join(missing)}. "
                f"Run as root: `{command}`.",
                command,
            )
        elif fact.blocked:
            command = f"chown -R {owner} {need.path}"
            shown = ", ".join(fact.blocked[:3]) + (
                f" and {len(fact.blocked) - 3} more" if len(fact.blocked) > 3 else ""
            )
            report(
                need,
                f"{need.path} ({need.what}) holds directories {who} cannot write in ({shown}): uploads and "
                f"thumbnails there would fail. Run as root: `{command}`.",
                command,
            )
    if len(commands) > 1:
        found.append(
            Problem(
                "synapse-workers changes the owner of nothing it did not create. All of the above, as root (in a "
                "container: on the volume's files, from the host): " + " && ".join(f"`{c}`" for c in commands)
            )
        )
    return found


def _chmod_x(fact: Fact, path: str, uid: int, gid: int, who: str) -> str:
    """The permission class the identity falls in (owner, group, other: no supplementary groups)."""
    if who == SYNAPSE:
        klass = "u" if fact.uid == uid else "g" if fact.gid == gid else "o"
    else:  # nginx's master: root, or whoever runs the launcher (then most likely the owner)
        klass = "u" if fact.uid == 0 else "o"
    return f"chmod {klass}+x {path}"


# ---- the I/O: facts as the identity sees them ------------------------------------------------------------


def probe(paths: Mapping[str, bool]) -> dict[str, Fact]:
    """path → Fact for the calling process's identity; tree paths get their subdirectories checked (two levels:
    media_store/local_content/ab)."""
    facts = {}
    for path, tree in paths.items():
        try:
            st = os.stat(path)
        except OSError:
            facts[path] = Fact(False)
            continue
        blocked = tuple(_blocked(path)) if tree and stat.S_ISDIR(st.st_mode) else ()
        facts[path] = Fact(
            True,
            stat.S_ISDIR(st.st_mode),
            st.st_uid,
            st.st_gid,
            stat.S_IMODE(st.st_mode),
            os.access(path, os.R_OK),
            os.access(path, os.W_OK),
            os.access(path, os.X_OK),
            blocked,
        )
    return facts


def _blocked(root: str) -> list[str]:
    found = []
    for name in MEDIA_DIRS:
        top = os.path.join(root, name)
        if not os.path.isdir(top):
            continue
        if not (os.access(top, os.W_OK) and os.access(top, os.X_OK)):
            found.append(top)
            continue
        try:
            entries = list(os.scandir(top))
        except OSError:
            found.append(top)
            continue
        for entry in entries:
            if entry.is_dir() and not (os.access(entry.path, os.W_OK) and os.access(entry.path, os.X_OK)):
                found.append(entry.path)
    return sorted(found)


def probe_as(paths: Mapping[str, bool], uid: int, gid: int) -> dict[str, Fact]:
    """probe() in a forked child that has dropped to uid/gid with no supplementary groups (setpriv's drop)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            data = json.dumps({path: asdict(fact) for path, fact in probe(paths).items()}).encode()
            with os.fdopen(write_end, "wb") as out:
                out.write(data)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        data = handle.read()
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise OSError(f"checking files as UID={uid}/GID={gid} failed")
    return {path: Fact(**{**fact, "blocked": tuple(fact["blocked"])}) for path, fact in json.loads(data).items()}


def log_handler_files(path: str | None) -> list[str]:
    """The files a Python logging config's handlers write (`handlers.*.filename`); [] when unreadable (the
    file's own READ need reports that)."""
    if not path:
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            doc = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return []
    handlers = doc.get("handlers") if isinstance(doc, dict) else None
    if not isinstance(handlers, dict):
        return []
    return [h["filename"] for h in handlers.values() if isinstance(h, dict) and isinstance(h.get("filename"), str)]


def check(plan: Plan, as_root: bool) -> list[Problem]:
    """The edge: needs from the plan, facts as Synapse's user (and as ourselves for nginx's files), problems."""
    core = plan.settings.core
    if not plan.local_processes and not plan.local("nginx"):
        return []
    wanted = needs(plan, os.getcwd(), log_handler_files(plan.homeserver.user_log_config))
    if not plan.local_processes:  # several hosts, nginx only here: its TLS files alone
        wanted = [need for need in wanted if need.who == LAUNCHER]
    uid, gid = (core.uid, core.gid) if as_root else (os.getuid(), os.getgid())
    facts: dict[tuple[str, str], Fact] = {}
    for who, paths in paths_to_probe(wanted).items():
        seen = probe_as(paths, uid, gid) if who == SYNAPSE and as_root else probe(paths)
        facts.update({(who, path): fact for path, fact in seen.items()})
    return problems(wanted, facts, uid, gid)

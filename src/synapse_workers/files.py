"""Write a rendered FileSet: the only module (with run/) that touches the disk.

Managed files are staged in a temporary directory under the runtime dir and swapped in per top-level
directory only after everything is written, so a failed run leaves the previous files as they were.
Files created once (homeserver.yaml, secrets) are never overwritten, except secrets given in the
environment, which win.
"""

from __future__ import annotations

import os
import re
import secrets as pysecrets
import shutil
import tempfile
from pathlib import Path

from pydantic import SecretStr

from .errors import UserError
from .layout import RUNTIME_MARKER
from .plan import POSTGRES_EXPORTER, Plan
from .render import FileSet, PrivateFile
from .settings import SECRET_MIN_LENGTH

SECRET_MODE = 0o600


def write_files(plan: Plan, fileset: FileSet) -> list[str]:
    """Write everything; returns the paths written (managed files and newly created ones).

    Ownership changes (as root) touch only what this creates: our runtime dir, directories it makes, files it
    writes. A directory or file that was there before keeps its owner."""
    new_dirs = _make_own_dirs(plan)
    written = _swap_in_managed(plan.layout.runtime_dir, fileset.managed)
    for path, (text, mode) in sorted(fileset.once.items()):
        if not os.path.exists(path):
            _write_new(path, text, mode)
            written.append(path)
    created = [p for p in written if p in fileset.once]
    created += ensure_secrets(plan)
    written += _write_private(plan, fileset.private)  # after the secrets they carry exist
    _make_runtime_dirs(plan)
    _chown_for_synapse(plan, created + new_dirs)
    return written + [p for p in created if p not in written]


def _make_own_dirs(plan: Plan) -> list[str]:
    """Config, data, media and log dirs: created when missing; returns those this call created."""
    core = plan.settings.core
    wanted = [core.config_dir, core.data_dir]
    if not plan.homeserver.exists:
        wanted.append(plan.settings.homeserver.media_store_path or f"{core.data_dir}/media_store")
    if plan.settings.logging.to_disk:
        wanted.append(plan.layout.logs_on_disk)
    created = []
    for path in dict.fromkeys(wanted):
        if not os.path.lexists(path):
            Path(path).mkdir(parents=True)
            created.append(path)
    return created


def _swap_in_managed(runtime_dir: str, files: dict[str, str]) -> list[str]:
    root = Path(runtime_dir)
    root.mkdir(parents=True, exist_ok=True)
    # load_plan refused a runtime dir holding anything we did not create; from now on it is provably ours.
    (root / RUNTIME_MARKER).write_text("Created by synapse-workers: everything here is regenerated on every start.\n")
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        tops: set[str] = set()
        for path, text in files.items():
            rel = Path(path).relative_to(root)
            tops.add(rel.parts[0])
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
            os.chmod(target, 0o644)
        for top in sorted(tops):
            live, old = root / top, root / f".old-{top}"
            _carry_over_state(live, staging / top)
            if old.exists():
                shutil.rmtree(old)
            if live.exists():
                live.rename(old)
            (staging / top).rename(live)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return sorted(files)


def _carry_over_state(live: Path, staged: Path) -> None:
    """nginx keeps its temp dirs next to its config; keep them (and a running pid file) across swaps."""
    for name in ("tmp", "nginx.pid"):
        if (live / name).exists() and not (staged / name).exists():
            (live / name).rename(staged / name)


def _rewrite_secret(path: str, text: str, written: list[str]) -> None:
    """A secret file derived from another source: (re)written, 0600, only when its content differs."""
    if (Path(path).read_text() if os.path.exists(path) else None) != text:
        _write_new(path, text, SECRET_MODE)
        written.append(path)


def _write_new(path: str, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")  # 0600 from the start
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, mode)
        if owner is not None:
            os.chown(tmp, *owner)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_private(plan: Plan, files: dict[str, PrivateFile]) -> list[str]:
    """Configs that must hold a secret (coturn's: it reads its shared secret from nowhere else): 0600, in a
    0700 directory, both its program's user's; the secret lines are added here, from the key files. With the
    built-in coturn off, its directory (config, database, pid file) is removed."""
    if plan.layout.coturn_conf not in files:
        shutil.rmtree(plan.layout.coturn_dir, ignore_errors=True)
    written = []
    for path, private in sorted(files.items()):
        owner = private.owner if os.geteuid() == 0 else None
        directory = Path(path).parent
        directory.mkdir(parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        if owner is not None:
            os.chown(directory, *owner)
            for entry in os.scandir(directory):  # coturn's database and pid file, from an earlier run
                os.lchown(entry.path, *owner)
        lines = [f"{key}={Path(secret).read_text().strip()}\n" for key, secret in private.secrets]
        _write_new(path, private.text + "".join(lines), SECRET_MODE, owner)
        written.append(path)
    return written


def ensure_secrets(plan: Plan) -> list[str]:
    """Persisted secrets in the data dir (0600): created when missing, replaced when the env gives one."""
    hs, turn, paths = plan.settings.homeserver, plan.settings.turn, plan.secrets
    written = []
    wanted: list[tuple[str, str | None]] = []
    if not plan.homeserver.exists:
        wanted += [
            (paths.registration, _secret(hs.registration_shared_secret)),
            (paths.macaroon, _secret(hs.macaroon_secret_key)),
            (paths.form, _secret(hs.form_secret)),
        ]
    if plan.turn_uris:  # Synapse reads it on every start (shared.yaml), and coturn's config is written from it
        wanted.append((paths.turn, _secret(turn.secret)))
    if plan.workers or plan.multi_host:
        wanted.append((paths.replication, None))
    if plan.redis is not None and plan.redis.host is not None:  # several hosts: Redis over TCP has a password
        wanted.append((paths.redis, None))
    if plan.postgres and not os.path.exists(paths.postgres):
        # libpq passfile: host:port:db:user:password; the password itself is random.
        _write_new(paths.postgres, f"*:*:*:synapse:{pysecrets.token_hex(24)}\n", SECRET_MODE)
        written.append(paths.postgres)
    if plan.service(POSTGRES_EXPORTER) is not None and plan.postgres is not None:
        # The exporter's lib/pq reads no libpq passfile: it gets the password alone (DATA_SOURCE_PASS_FILE).
        password = Path(paths.postgres).read_text().strip().rsplit(":", 1)[1]
        _rewrite_secret(paths.postgres_password, password, written)
    external = plan.settings.database.password if plan.settings.database.kind == "postgres" else None
    if external is not None and (not plan.homeserver.exists or os.path.exists(paths.external_postgres)):
        # libpq passfile (host:port:db:user:password, ':' and '\\' escaped); only our generated file names it.
        line = "*:*:*:*:" + re.sub(r"([:\\])", r"\\\1", external.get_secret_value()) + "\n"
        _rewrite_secret(paths.external_postgres, line, written)
    if external is not None and plan.postgres is None and plan.service(POSTGRES_EXPORTER) is not None:
        _rewrite_secret(paths.external_postgres_password, external.get_secret_value(), written)
    if plan.homeserver.exists:
        # Not created or changed from the environment any more (generation only), but a placeholder must not
        # stay: the file is the one our generated homeserver.yaml names.
        wanted += [(path, None) for path in (paths.registration, paths.macaroon, paths.form) if os.path.exists(path)]
    weak = set(weak_secret_files(plan))
    for path, given in wanted:
        current = Path(path).read_text().strip() if os.path.exists(path) else None
        if current is not None and (given is None or given == current) and path not in weak:
            continue
        _write_new(path, (given or pysecrets.token_hex(32)) + "\n", SECRET_MODE)
        written.append(path)
    if not plan.homeserver.exists and not os.path.exists(paths.signing_key):
        _write_new(paths.signing_key, _signing_key(), SECRET_MODE)
        written.append(paths.signing_key)
    if plan.redis is not None and plan.redis.host is not None:
        # What Redis includes (`requirepass`), derived from the key file Synapse reads: the two always agree.
        line = f"requirepass {Path(paths.redis).read_text().strip()}\n"
        current = Path(paths.redis_conf).read_text() if os.path.exists(paths.redis_conf) else None
        if current != line:
            _write_new(paths.redis_conf, line, SECRET_MODE)
            written.append(paths.redis_conf)
    return written


def weak_secret_files(plan: Plan) -> list[str]:
    """Stored secrets that a new value from the environment does not replace and that are too short to be
    secrets: the Unraid template before 0.2 sent the word `generated` as every secret, so a server started from
    it keeps a known registration shared secret (anyone may register an admin). `ensure_secrets` replaces each
    with a random one; the caller warns. Only our own key files (`SecretPaths`), never a user's file."""
    hs, turn, paths = plan.settings.homeserver, plan.settings.turn, plan.secrets
    given = {
        paths.registration: hs.registration_shared_secret,
        paths.macaroon: hs.macaroon_secret_key,
        paths.form: hs.form_secret,
        paths.turn: turn.secret,
    }
    weak = []
    for path, value in given.items():
        if value is not None and (path == paths.turn or not plan.homeserver.exists):
            continue  # the environment's (long enough: settings refuse shorter ones) replaces it
        if path == paths.turn and not plan.turn_uris:
            continue  # not used
        try:
            current = Path(path).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if len(current) < SECRET_MIN_LENGTH:
            weak.append(path)
    return weak


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _signing_key() -> str:
    # signedjson ships with Synapse; the key id follows Synapse's own "a_XXXX".
    from signedjson.key import encode_signing_key_base64, generate_signing_key

    key = generate_signing_key("a_" + pysecrets.token_hex(2))
    return f"{key.alg} {key.version} {encode_signing_key_base64(key)}\n"


def _make_runtime_dirs(plan: Plan) -> None:
    layout = plan.layout
    for path in (layout.sockets_dir, layout.nginx_dir):
        Path(path).mkdir(parents=True, exist_ok=True)
    Path(layout.nginx_dir, "tmp").mkdir(exist_ok=True)
    if plan.settings.logging.to_disk:
        Path(layout.logs_on_disk).mkdir(parents=True, exist_ok=True)


def _chown_for_synapse(plan: Plan, created: list[str]) -> None:
    """As root, Synapse runs as UID:GID: it must read its config and secrets and own its sockets dir.

    Only files we created or manage are touched; a user's own homeserver.yaml keeps its owner."""
    if os.geteuid() != 0:
        return
    uid, gid = plan.settings.core.uid, plan.settings.core.gid
    for tree in (plan.layout.synapse_dir,):  # inside our runtime dir (the sockets dir: run/prepare.py)
        os.chown(tree, uid, gid)
        for root, dirs, names in os.walk(tree):
            for name in dirs + names:
                os.chown(os.path.join(root, name), uid, gid)
    for path in created:
        os.chown(path, uid, gid)


# ---- exports (`synapse-workers export kubernetes|compose -o DIR`) ------------------------------------------

EXPORT_MARKER = ".synapse-workers-export"  # first line: the target; then every file the export wrote


def export_secrets(plan: Plan, target: str, directory: str, paths: tuple[str, ...]) -> tuple[dict[str, str], str]:
    """(each secret file of `paths` → its content, PostgreSQL's password) for an export. Each secret is, first
    found: its variable, the data dir's key file (a running server keeps its signing key), the previous export
    in `directory` (so exporting again changes nothing), else new. Reads only."""
    from .render.export import passfile, secret_key

    previous = _previous_secrets(directory, target)
    hs, paths_of = plan.settings.homeserver, plan.secrets
    given = {
        paths_of.registration: _secret(hs.registration_shared_secret),
        paths_of.macaroon: _secret(hs.macaroon_secret_key),
        paths_of.form: _secret(hs.form_secret),
        paths_of.turn: _secret(plan.settings.turn.secret),
    }
    password = _secret(plan.settings.database.password) or previous.get("postgres.password") or pysecrets.token_hex(24)
    result = {}
    for path in paths:
        if path in (paths_of.external_postgres, paths_of.postgres):
            result[path] = passfile(password)
            continue
        value = given.get(path)
        if value is not None:
            result[path] = value + "\n"
        elif os.path.isfile(path):
            result[path] = Path(path).read_text()
        elif secret_key(path) in previous:
            result[path] = previous[secret_key(path)]
        elif path == paths_of.signing_key:
            result[path] = _signing_key()
        else:
            result[path] = pysecrets.token_hex(32) + "\n"
    return result, password


def _previous_secrets(directory: str, target: str) -> dict[str, str]:
    """Secret name → content, from an earlier export of ours in `directory` (checked by `check_export_dir`)."""
    import yaml

    from .render.kubernetes import SECRET_FILE

    root = Path(directory)
    if not (root / EXPORT_MARKER).is_file():
        return {}
    if target == "kubernetes":
        if not (root / SECRET_FILE).is_file():
            return {}
        for doc in yaml.safe_load_all((root / SECRET_FILE).read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Secret":
                return {str(k): str(v) for k, v in (doc.get("stringData") or {}).items()}
        return {}
    folder = root / "secrets"
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def check_export_dir(directory: str, target: str) -> None:
    """UserError unless `directory` is new, empty, or an earlier `export <target>` of ours."""
    root = Path(directory)
    if not root.exists():
        return
    if not root.is_dir():
        raise UserError(f"export {target} -o {directory}: it exists and is not a directory: expected a directory.")
    marker = root / EXPORT_MARKER
    if marker.is_file() and marker.read_text().split("\n", 1)[0] == target:
        return
    if any(root.iterdir()):
        shown = ", ".join(sorted(p.name for p in root.iterdir())[:5])
        raise UserError(
            f"export {target} -o {directory}: it holds files synapse-workers did not write for `export {target}` "
            f"({shown}): expected a new or empty directory, or an earlier `export {target}` output (which is "
            "replaced)."
        )


def write_export(directory: str, target: str, files: dict[str, tuple[str, int]]) -> list[str]:
    """Write an export (relative name → (text, mode)) into `directory`, each file atomically; files an earlier
    export of ours wrote there and this one does not are removed, nothing else. Directories holding a 0600 file
    are 0700. Returns the names written."""
    check_export_dir(directory, target)
    root = Path(directory)
    marker = root / EXPORT_MARKER
    before = marker.read_text().splitlines()[1:] if marker.is_file() else []
    root.mkdir(parents=True, exist_ok=True)
    for name, (text, mode) in sorted(files.items()):
        path = root / name
        if path.parent != root:
            path.parent.mkdir(parents=True, exist_ok=True)
            if mode & 0o077 == 0:
                os.chmod(path.parent, 0o700)
        _write_new(str(path), text, mode)
    for name in before:
        if name not in files and ".." not in Path(name).parts and (root / name).is_file():
            (root / name).unlink()
            parent = (root / name).parent
            while parent != root and not any(parent.iterdir()):
                parent.rmdir()
                parent = parent.parent
    _write_new(str(marker), "\n".join([target, *sorted(files)]) + "\n", 0o644)
    return sorted(files)

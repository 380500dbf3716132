"""Write a rendered FileSet: the only module (with run/) that touches the disk.

Managed files are staged in a temporary directory under the runtime dir and swapped in per top-level
directory only after everything is written, so a failed run leaves the previous files as they were.
Files created once (homeserver.yaml) are never overwritten. Secrets follow `secrets.SECRETS`: a stored one is
kept, except when the environment gives a different value (it wins) or it is a placeholder shorter than
SECRET_MIN_LENGTH (replaced with a random one); a derived one is rewritten whenever its source changes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

from . import secrets
from .errors import UserError
from .layout import RUNTIME_MARKER, RUNTIME_MARKER_TEXT
from .plan import Plan
from .render import FileSet, PrivateFile
from .render.export import secret_key
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
        wanted.append(plan.media_store)
    if plan.disk_logs:
        wanted.append(plan.disk_logs)
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
    (root / RUNTIME_MARKER).write_text(RUNTIME_MARKER_TEXT)
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
    """The secret files this host needs (`secrets.SECRETS`), in the data dir (0600): a stored secret is created
    when missing and replaced when its variable gives another value or it is weak; a derived one is rewritten
    when its text differs. Returns the paths written."""
    weak = set(weak_secret_files(plan))
    written = []
    for row in secrets.SECRETS:  # a derived row comes after the row it is derived from
        if not row.needed(plan):
            continue
        path = row.path(plan)
        exists = os.path.exists(path)
        if row.homeserver_yaml and plan.homeserver.exists and not exists:
            continue  # the user's homeserver.yaml may not name it
        given = row.given(plan)
        if row.stored:
            if exists and path not in weak and (given is None or row.form.value(Path(path).read_text()) == given):
                continue
            _write_new(path, row.form.text(given if given is not None else row.form.make()), SECRET_MODE)
            written.append(path)
        else:
            if row.derived_from is not None:
                source = secrets.by_key(row.derived_from)
                given = source.form.value(Path(source.path(plan)).read_text())
            assert given is not None, row.key  # needed only when its variable is set
            _rewrite_secret(path, row.form.text(given), written)
    return written


def weak_secret_files(plan: Plan) -> list[str]:
    """Stored secrets that a new value from the environment does not replace and that are too short to be
    secrets: the Unraid template before 0.2 sent the word `generated` as every secret, so a server started from
    it keeps a known registration shared secret (anyone may register an admin). `ensure_secrets` replaces each
    with a random one; the caller warns. Only our own key files (the table's `weak_checked` rows), never a
    user's file."""
    weak = []
    for row in secrets.SECRETS:
        if not row.weak_checked or not row.needed(plan) or row.given(plan) is not None:
            continue  # not checked, not used, or the environment's (long enough: settings refuse shorter) replaces it
        path = row.path(plan)
        try:
            current = Path(path).read_text().strip()
        except (FileNotFoundError, NotADirectoryError):
            continue
        if len(current) < SECRET_MIN_LENGTH:
            weak.append(path)
    return weak


def _make_runtime_dirs(plan: Plan) -> None:
    layout = plan.layout
    for path in (layout.sockets_dir, layout.nginx_dir):
        Path(path).mkdir(parents=True, exist_ok=True)
    Path(layout.nginx_dir, "tmp").mkdir(exist_ok=True)
    if plan.disk_logs:
        Path(plan.disk_logs).mkdir(parents=True, exist_ok=True)


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


def read_export(directory: str) -> dict[str, str]:
    """Relative name → text of each file an earlier export of ours wrote in `directory` (the ones its marker
    lists; {} without a marker). Reads only; the target's renderer knows which hold its secrets."""
    root = Path(directory)
    marker = root / EXPORT_MARKER
    if not marker.is_file():
        return {}
    files = {}
    for name in marker.read_text().splitlines()[1:]:
        path = root / name
        if name and ".." not in Path(name).parts and not Path(name).is_absolute() and path.is_file():
            files[name] = path.read_text(encoding="utf-8")
    return files


def export_secrets(
    plan: Plan, previous: Mapping[str, str], previous_password: str | None
) -> tuple[dict[str, str], str]:
    """(each secret file an export of `plan` carries (`secrets.exported`) → its content, the database password).
    The password: POSTGRES_PASSWORD, else the previous export's, else new; every passfile holds it. Any other
    secret, first found: its variable, the data dir's key file (a running server keeps its signing key), the
    previous export (`previous`: secret key → content, so exporting again changes nothing), else new; a stored
    placeholder shorter than SECRET_MIN_LENGTH (the old Unraid template's `generated`) is never carried. Reads only."""
    password = secrets.by_key("external_postgres").given(plan) or previous_password or secrets.PASSFILE.make()
    result = {}

    def sound(row: secrets.SecretFile, text: str) -> bool:
        """A stored secret worth carrying: never a placeholder (`weak_secret_files`' rule)."""
        return not row.weak_checked or len(row.form.value(text).strip()) >= SECRET_MIN_LENGTH

    for row in secrets.exported(plan):
        path = row.path(plan)
        given = row.given(plan)
        if row.form is secrets.PASSFILE:
            result[path] = row.form.text(password)
        elif given is not None:
            result[path] = row.form.text(given)
        elif os.path.isfile(path) and sound(row, Path(path).read_text()):
            result[path] = Path(path).read_text()
        elif secret_key(path) in previous and sound(row, previous[secret_key(path)]):
            result[path] = previous[secret_key(path)]
        else:
            result[path] = row.form.text(row.form.make())
    return result, password


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

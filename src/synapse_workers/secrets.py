"""Every secret file of a deployment in one table: which file, from which variable, in which form, when.

One row per secret (`SECRETS`); every consumer is a loop over it: `files.ensure_secrets` (create, replace,
rewrite), `files.weak_secret_files` (placeholders to replace), `load._check_copied` (several hosts: the copies
another host needs), `files.export_secrets` and `Export.secret_files` (what an export carries), and
`kubernetes.secrets_in_configuration` (which variable a secret came from). Pure, except `Form.new`, which draws
a random value (it touches no disk).

Adding a secret is one row here plus its path in `layout.SecretPaths` (and, for Synapse, the `*_path` option in
the renderer that names it).
"""

from __future__ import annotations

import re
import secrets as stdlib_secrets
from collections.abc import Callable
from dataclasses import dataclass

from .errors import Variable
from .plan import POSTGRES_EXPORTER, Plan


@dataclass(frozen=True)
class Form:
    """How a file holds its secret."""

    name: str
    text: Callable[[str], str]  # the secret → the file's text
    value: Callable[[str], str]  # the file's text → the secret
    new: Callable[[], str] | None  # a new random secret; None: never made, always derived or given

    def make(self) -> str:
        """A new random secret in this form's own terms (not yet the file's text)."""
        if self.new is None:
            raise ValueError(f"a {self.name} is never made: it is derived or given")
        return self.new()


def _signing_key() -> str:
    # signedjson ships with Synapse; the key id follows Synapse's own "a_XXXX".
    from signedjson.key import encode_signing_key_base64, generate_signing_key

    key = generate_signing_key("a_" + stdlib_secrets.token_hex(2))
    return f"{key.alg} {key.version} {encode_signing_key_base64(key)}"


def passfile_line(password: str) -> str:
    """A libpq passfile line for any host, port, database and user, ':' and '\\' escaped (libpq's format)."""
    return "*:*:*:*:" + re.sub(r"([:\\])", r"\\\1", password) + "\n"


def _passfile_password(text: str) -> str:
    """The password of a libpq passfile line: its fifth field, unescaped."""
    match = re.fullmatch(r"(?:(?:\\.|[^:\\])*:){4}((?:\\.|[^:\\])*)", text.split("\n", 1)[0])
    if match is None:
        raise ValueError("not a libpq passfile line (host:port:database:user:password)")
    return re.sub(r"\\(.)", r"\1", match.group(1))


# A random token (hex), one line: the key files Synapse reads through its `*_path` options.
TOKEN = Form("token", lambda s: s + "\n", str.strip, lambda: stdlib_secrets.token_hex(32))
# Synapse's signing key file: `<alg> <version> <base64>`; generated here, never given by a variable.
SIGNING_KEY = Form("signing key", lambda s: s + "\n", str.strip, _signing_key)
# The embedded cluster's libpq passfile: the `synapse` role's random password (hex: nothing to escape).
PASSFILE_SYNAPSE = Form(
    "libpq passfile line (role synapse)",
    lambda s: f"*:*:*:synapse:{s}\n",
    lambda t: t.strip().rsplit(":", 1)[1],
    lambda: stdlib_secrets.token_hex(24),
)
# A libpq passfile line for any role: POSTGRES_PASSWORD's (or, in an export, the database's) password.
PASSFILE = Form("libpq passfile line", passfile_line, _passfile_password, lambda: stdlib_secrets.token_hex(24))
# The password alone, no line break: prometheus-postgres-exporter's lib/pq reads no passfile (DATA_SOURCE_PASS_FILE).
PASSWORD = Form("password alone", lambda s: s, lambda t: t, None)
# What Redis includes (`requirepass`): the password Synapse reads from the `redis` key file.
REQUIREPASS = Form("Redis requirepass line", lambda s: f"requirepass {s}\n", lambda t: t.split(" ", 1)[1].strip(), None)

Predicate = Callable[[Plan], bool]


def _always(plan: Plan) -> bool:
    return True


def _synapse_here(plan: Plan) -> bool:
    return bool(plan.local_processes)


def _has_workers(plan: Plan) -> bool:
    return bool(plan.workers)


def _replication(plan: Plan) -> bool:
    return bool(plan.workers) or plan.multi_host


def _turn(plan: Plan) -> bool:
    return bool(plan.turn_uris)


def _redis_over_tcp(plan: Plan) -> bool:  # several hosts: Redis over TCP has a password
    return plan.redis is not None and plan.redis.host is not None


def _redis_here(plan: Plan) -> bool:
    return bool(plan.local_processes) or plan.local("redis")


def _embedded(plan: Plan) -> bool:
    return plan.postgres is not None


def _postgres_here(plan: Plan) -> bool:
    return bool(plan.local_processes) or plan.local("postgres")


def _embedded_exporter(plan: Plan) -> bool:
    return plan.service(POSTGRES_EXPORTER) is not None and plan.postgres is not None


def _external(plan: Plan) -> bool:
    return plan.settings.database.kind == "postgres" and plan.settings.database.password is not None


def _external_exporter(plan: Plan) -> bool:
    return _external(plan) and plan.postgres is None and plan.service(POSTGRES_EXPORTER) is not None


@dataclass(frozen=True)
class SecretFile:
    """One secret file of the data dir (0600)."""

    key: str  # its path: this field of `SecretPaths`
    form: Form
    needed: Predicate  # this host uses it: created when missing (see `homeserver_yaml`), kept or rewritten
    variable: Variable | None = None  # the variable that may give it; None: never given
    # Stored (True): the file is the secret: made random when missing, replaced only by its variable's different
    # value (or when weak). Not stored (False): a rendering of its variable or of `derived_from`'s secret,
    # rewritten whenever its text would differ.
    stored: bool = True
    derived_from: str | None = None  # the row (key) whose secret this file holds in its own form
    # Named by the homeserver.yaml we generate: once a homeserver.yaml exists, never created (the user's file may
    # not name it), only kept sound when present.
    homeserver_yaml: bool = False
    # Its variable is read only to generate homeserver.yaml: once that exists, the stored file is the secret.
    generation_only: bool = False
    # A homeserver.yaml key (HomeserverInfo attribute) naming the file Synapse really reads, when set there.
    path_in_homeserver: str | None = None
    # Several hosts: main's host makes it; another host refuses to start without a copy when this holds (None:
    # not asked of other hosts: each derives it, or it is not checked).
    copied: Predicate | None = None
    # A stored value shorter than settings.SECRET_MIN_LENGTH is replaced (the old Unraid template's 'generated').
    weak_checked: bool = False
    exported: Predicate | None = None  # `export kubernetes|compose` carries it when this holds

    def path(self, plan: Plan) -> str:
        """Where this host has it: our `SecretPaths` file, or the one the user's homeserver.yaml names."""
        if self.path_in_homeserver is not None:
            named = getattr(plan.homeserver, self.path_in_homeserver)
            if named:
                return str(named)
        return str(getattr(plan.secrets, self.key))

    def given(self, plan: Plan) -> str | None:
        """Its variable's value, when set and read now (a generation-only one not once homeserver.yaml exists)."""
        if self.variable is None or (self.generation_only and plan.homeserver.exists):
            return None
        value = plan.settings.value(self.variable.name)
        return None if value is None else str(value.get_secret_value())


DB_PASSWORD = Variable("POSTGRES_PASSWORD")  # an external database's (two rows)

# In this order: a derived row after the row it is derived from; `copied` rows in the order a missing copy is named.
SECRETS: tuple[SecretFile, ...] = (
    # Synapse's signing key (homeserver.yaml's signing_key_path).
    SecretFile(
        "signing_key", SIGNING_KEY, _always,
        homeserver_yaml=True, path_in_homeserver="signing_key_path", copied=_synapse_here, exported=_always,
    ),
    # registration_shared_secret_path, macaroon_secret_key_path, form_secret_path of the generated homeserver.yaml.
    SecretFile(
        "registration", TOKEN, _always, variable=Variable("SYNAPSE_REGISTRATION_SHARED_SECRET"),
        homeserver_yaml=True, generation_only=True, weak_checked=True, exported=_always,
    ),
    SecretFile(
        "macaroon", TOKEN, _always, variable=Variable("SYNAPSE_MACAROON_SECRET_KEY"),
        homeserver_yaml=True, generation_only=True, weak_checked=True, exported=_always,
    ),
    SecretFile(
        "form", TOKEN, _always, variable=Variable("SYNAPSE_FORM_SECRET"),
        homeserver_yaml=True, generation_only=True, weak_checked=True, exported=_always,
    ),
    # worker_replication_secret_path (shared.yaml).
    SecretFile("replication", TOKEN, _replication, copied=_synapse_here, exported=_has_workers),
    # The embedded cluster: Synapse's passfile (homeserver.yaml or, several hosts, shared.yaml; run/postgres.py sets
    # the role's password from it) and the password alone for prometheus-postgres-exporter.
    SecretFile("postgres", PASSFILE_SYNAPSE, _embedded, copied=_postgres_here),
    SecretFile("postgres_password", PASSWORD, _embedded_exporter, stored=False, derived_from="postgres"),
    # Several hosts: Redis over TCP (shared.yaml's redis.password_path), and the line redis.conf includes.
    SecretFile("redis", TOKEN, _redis_over_tcp, copied=_redis_here),
    SecretFile("redis_conf", REQUIREPASS, _redis_over_tcp, stored=False, derived_from="redis"),
    # turn_shared_secret_path (shared.yaml) and the built-in coturn's static-auth-secret (files._write_private).
    SecretFile(
        "turn", TOKEN, _turn, variable=Variable("SYNAPSE_TURN_SECRET"),
        copied=_synapse_here, weak_checked=True, exported=_turn,
    ),
    # An external database's password as the passfile the generated homeserver.yaml names. Exports: the passfile
    # of the export's database (Compose's synapse-postgres, or the external one), from its password.
    SecretFile(
        "external_postgres", PASSFILE, _external, variable=DB_PASSWORD,
        stored=False, homeserver_yaml=True, exported=_always,
    ),
    # ... and alone, for prometheus-postgres-exporter.
    SecretFile("external_postgres_password", PASSWORD, _external_exporter, variable=DB_PASSWORD, stored=False),
)  # fmt: skip


def by_key(key: str) -> SecretFile:
    return next(r for r in SECRETS if r.key == key)


def exported(plan: Plan) -> tuple[SecretFile, ...]:
    """The secrets an export of `plan` (the single-host plan) carries, in table order."""
    return tuple(r for r in SECRETS if r.exported is not None and r.exported(plan))


def copies_needed(plan: Plan) -> tuple[str, ...]:
    """Several hosts: the secret files this host (not main's) must have as copies from main's host."""
    return tuple(r.path(plan) for r in SECRETS if r.copied is not None and r.needed(plan) and r.copied(plan))

"""`export kubernetes` output checked by outside tools: the `kubernetes-validate --strict` command at pinned Kubernetes
versions with no network at all, and Synapse's own config loader on the files each pod mounts (as the pods' init
step runs it). No cluster here: the manifests have not run on a real Kubernetes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..conftest import in_ci

pytestmark = pytest.mark.integration

SCRIPT = str(Path(sys.executable).with_name("synapse-workers"))
PYTHON = sys.executable
K8S_VERSIONS = ("1.30.0", "1.37.0")  # bundled by kubernetes-validate 1.37.0 (pyproject's test extra)
COMPLEMENT = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
SETS = {"complement": COMPLEMENT, "full": "full", "persisters": "event_persister:4, synchrotron:3, pusher:2"}


def validator() -> str:
    found = shutil.which("kubernetes-validate", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    if not found:
        message = "kubernetes-validate is not installed: pip install -e '.[test]'"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


def offline() -> list[str]:
    """`unshare -n`: a network namespace with no interfaces (as root, as CI runs), so nothing can be fetched."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("unshare -n is not permitted here (not root): cannot prove the validation runs offline")
    return ["unshare", "-n"]


def export(env: dict[str, str], out: Path, spec: str) -> None:
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", **env, "SYNAPSE_WORKER_TYPES": spec}
    result = subprocess.run(
        [SCRIPT, "export", "kubernetes", "-o", str(out)], env=clean, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr


@pytest.fixture
def env(base_env):
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008", "POSTGRES_HOST": "postgres.db.svc", "SYNAPSE_METRICS": "1"}


@pytest.mark.parametrize("name", SETS)
def test_kubernetes_validate_strict_offline(env, tmp_root, name):
    tool = validator()
    out = tmp_root / "k8s"
    export(env, out, SETS[name])
    files = [str(out / "synapse-workers.yaml"), str(out / "secret.yaml")]
    for version in K8S_VERSIONS:
        # unshare -n: a network namespace with no interfaces, so the schemas must come from the package.
        result = subprocess.run(
            [*offline(), tool, "--strict", "-k", version, *files], capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "ERROR" not in result.stdout
        count = sum(1 for f in files for d in yaml.safe_load_all(Path(f).read_text()) if d)
        assert result.stdout.count(" passed for resource ") == count, result.stdout[-2000:]


def test_kubernetes_validate_fails_on_a_bad_manifest(tmp_root):
    """The command is no rubber stamp: a string replica count and a probe typo fail."""
    tool = validator()

    def sts(replicas, container):
        return {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": {"name": "x"},
            "spec": {
                "serviceName": "x",
                "replicas": replicas,
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "metadata": {"labels": {"a": "b"}},
                    "spec": {"containers": [{"name": "c", "image": "i", **container}]},
                },
            },
        }

    for doc, expected in ((sts("two", {}), "replicas"), (sts(1, {"readinessProb": {}}), "readinessProb")):
        bad = tmp_root / "bad.yaml"
        bad.write_text(yaml.safe_dump(doc))
        result = subprocess.run(
            [*offline(), tool, "--strict", "-k", K8S_VERSIONS[-1], str(bad)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0
        assert expected in result.stdout, result.stdout


def materialise(out: Path) -> list[dict]:
    """Write what each pod mounts to the paths it mounts it at (they lie under the test's tmp dirs, like the
    environment's) and return, per pod, the Synapse app and --config-path files of its container command."""
    docs = [
        d for name in ("synapse-workers.yaml", "secret.yaml") for d in yaml.safe_load_all((out / name).read_text()) if d
    ]
    config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
    secret = next(d for d in docs if d["kind"] == "Secret")["stringData"]
    processes = []
    for sts in (d for d in docs if d["kind"] == "StatefulSet"):
        pod = sts["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = pod["containers"][0]
        for ordinal in range(sts["spec"]["replicas"]):
            pod_name = f"{sts['metadata']['name']}-{ordinal}"
            for mount in container["volumeMounts"]:
                volume = volumes[mount["name"]]
                target = Path(mount["mountPath"])
                if "configMap" in volume:
                    data = config_maps[volume["configMap"]["name"]]
                    items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
                    if "subPath" in mount:
                        items = [{"key": mount["subPath"], "path": None}]
                    for item in items:
                        path = target if item["path"] is None else target / item["path"]
                        path.parent.mkdir(parents=True, exist_ok=True)
                        path.write_text(data[item["key"]])
            # The init container copies the Secret's files into the data dir, 0600.
            data_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data")
            for item in volumes["secrets"]["secret"]["items"]:
                path = Path(data_dir) / item["path"]
                path.write_text(secret[item["key"]])
                path.chmod(0o600)
            command = [arg.replace("$(POD_NAME)", pod_name) for arg in container["command"]]
            assert command[:2] == ["/opt/synapse-workers/venv/bin/python", "-m"]
            files = [command[i + 1] for i, arg in enumerate(command) if arg == "--config-path"]
            processes.append({"name": pod_name, "app": command[2], "config_files": files})
    return processes


@pytest.mark.parametrize("name", ["complement", "persisters"])
def test_synapse_loads_every_pods_config(env, tmp_root, name):
    out = tmp_root / "k8s"
    export(env, out, SETS[name])
    processes = materialise(out)
    assert len(processes) == len({p["name"] for p in processes}) > 1
    result = subprocess.run(
        [PYTHON, "-m", "synapse_workers.synapse_check"],
        input=json.dumps(processes),
        capture_output=True,
        text=True,
        timeout=600,
    )
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["name"] for r in reports] == [p["name"] for p in processes], result.stderr[-2000:]
    assert all(r["ok"] for r in reports), [r for r in reports if not r["ok"]]


def test_the_init_step_command(env, tmp_root):
    """`python -m synapse_workers.synapse_check APP CONFIG...` (the pods' init container) accepts a good pod's files
    and fails with Synapse's message when one is broken."""
    out = tmp_root / "k8s"
    export(env, out, "synchrotron, event_persister")
    processes = materialise(out)
    worker = next(p for p in processes if p["name"] == "synapse-synchrotron-0")
    good = subprocess.run(
        [PYTHON, "-m", "synapse_workers.synapse_check", worker["app"], *worker["config_files"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert good.returncode == 0, good.stderr
    own = Path(worker["config_files"][-1])
    own.write_text(own.read_text().replace("worker_app: synapse.app.generic_worker", "worker_app: synapse.app.nope"))
    bad = subprocess.run(
        [PYTHON, "-m", "synapse_workers.synapse_check", worker["app"], *worker["config_files"]],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 1 and "synapse.app.nope" in bad.stderr

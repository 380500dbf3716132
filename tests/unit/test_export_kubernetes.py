"""`export kubernetes`: schema validation (kubernetes-validate --strict, offline, pinned versions), the invariants
schemas miss (our checker, also against deliberately broken manifests), the wiring stated from Synapse's and
Kubernetes' rules, config hashes, and each pod's Synapse config against what `generate` writes."""

from __future__ import annotations

import copy
import functools
import importlib
import os
import re
from pathlib import Path

import pytest
import yaml

from synapse_workers import catalog
from synapse_workers.load import load_plan
from synapse_workers.render import render_all
from synapse_workers.render.export import KUBERNETES, make_export
from synapse_workers.render.kubernetes import MANIFESTS, SECRET_FILE, render_kubernetes
from synapse_workers.render.kubernetes_check import check_manifests
from synapse_workers.secrets import passfile_line as passfile

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: pip install -e '.[test]'"
)
# kubernetes-validate 1.37.0 json.loads the kind's schema and the large _definitions.json again on every call; it
# never modifies them, so each is read once per session here (about 3 s of `pytest -m "not integration"`).
_schemas = importlib.import_module("kubernetes_validate.utils")
_schemas.schema_contents = functools.lru_cache(maxsize=None)(_schemas.schema_contents)

# Kubernetes versions whose schemas kubernetes-validate 1.37.0 bundles: a supported floor and the newest.
K8S_VERSIONS = ("1.30.0", "1.37.0")
COMPLEMENT = (
    "event_persister:2, background_worker, event_creator, user_dir, media_repository, federation_inbound, "
    "federation_reader, federation_sender, synchrotron, client_reader, appservice, pusher, device_lists:2, "
    "stream_writers=account_data+presence+receipts+to_device+typing"
)
SETS = {
    "monolith": "",
    "complement": COMPLEMENT,
    "full": "full",
    "persisters": "event_persister:4, synchrotron:3, federation_sender:2, pusher:2",
}
PASSWORD = "not-a-real-password"


@pytest.fixture
def env(base_env):
    return {**base_env, "SYNAPSE_HTTP_PORT": "8008", "POSTGRES_HOST": "postgres.db.svc", "POSTGRES_PASSWORD": PASSWORD}


def fake_secrets(plan) -> dict[str, str]:
    export = make_export(plan, KUBERNETES)
    secrets = {
        path: f"secret-{i}-{os.path.basename(path)}-0123456789\n" for i, path in enumerate(export.secret_files())
    }
    secrets[plan.secrets.external_postgres] = passfile(PASSWORD)
    return secrets


def objects_for(env, spec: str, **extra: str) -> tuple[list[dict], object]:
    plan = load_plan({**env, "SYNAPSE_WORKER_TYPES": spec, **extra})
    files = render_kubernetes(make_export(plan, KUBERNETES), fake_secrets(plan))
    docs = [d for name in (MANIFESTS, SECRET_FILE) for d in yaml.safe_load_all(files[name][0]) if d]
    return docs, plan


def by(objects, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


@pytest.mark.parametrize("name", SETS)
def test_strict_schema_validation_at_pinned_versions(env, name):
    objects, _ = objects_for(env, SETS[name], SYNAPSE_METRICS="1")
    for version in K8S_VERSIONS:
        for obj in objects:
            kubernetes_validate.validate(obj, version, strict=True)  # raises ValidationError


def test_strict_validation_catches_a_typo(env):
    """The validator in strict mode is not a no-op: an unknown field fails."""
    objects, _ = objects_for(env, "synchrotron")
    sts = copy.deepcopy(by(objects, "StatefulSet")["synapse-main"])
    container = sts["spec"]["template"]["spec"]["containers"][0]
    container["readinessProb"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, K8S_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("name", SETS)
def test_invariants_hold(env, name):
    objects, _ = objects_for(env, SETS[name], SYNAPSE_METRICS="1")
    assert check_manifests(objects) == []


# ---- the checker catches each broken invariant ---------------------------------------------------------------


def _sts(objects, name="synapse-event-persister"):
    return by(objects, "StatefulSet")[name]


def _rename_sts(objects, new):
    sts = _sts(objects)
    sts["metadata"]["name"] = new


def _port_name(objects, new):
    _sts(objects)["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = new


def _service_port_name(objects, new):
    by(objects, "Service")["synapse-event-persister"]["spec"]["ports"][0]["name"] = new


BREAKAGES = {
    "underscore name": (lambda o: _rename_sts(o, "synapse_event_persister"), "DNS-1123"),
    "upper-case name": (lambda o: _rename_sts(o, "Synapse-Event-Persister"), "DNS-1123"),
    "long StatefulSet name": (lambda o: _rename_sts(o, "synapse-" + "x" * 45), "52"),
    "port name with _": (lambda o: _port_name(o, "replication_port"), "IANA"),
    "port name of 16": (lambda o: _port_name(o, "replication-ports"), "IANA"),
    "Service port name with _": (lambda o: _service_port_name(o, "repl_port"), "IANA"),
    "selector not in template": (
        lambda o: _sts(o)["spec"]["selector"]["matchLabels"].update({"tier": "x"}),
        "does not match",
    ),
    "missing governing Service": (lambda o: _sts(o)["spec"].update(serviceName="does-not-exist"), "serviceName"),
    "governing Service not headless": (
        lambda o: by(o, "Service")["synapse-event-persister"]["spec"].update(clusterIP="10.0.0.1"),
        "headless",
    ),
    "Service selecting nothing": (
        lambda o: by(o, "Service")["synapse-redis"]["spec"]["selector"].update({"app.kubernetes.io/instance": "x"}),
        "matches no pod",
    ),
    "per-pod Service past the replicas": (
        lambda o: by(o, "Service")["synapse-synchrotron-1"]["spec"]["selector"].update(
            {"statefulset.kubernetes.io/pod-name": "synapse-synchrotron-7"}
        ),
        "matches no pod",
    ),
    "targetPort the pods lack": (
        lambda o: by(o, "Service")["synapse-nginx"]["spec"]["ports"][0].update(targetPort="web"),
        "targetPort",
    ),
    "missing ConfigMap": (lambda o: o.remove(by(o, "ConfigMap")["synapse-shared"]), "missing ConfigMap"),
    "missing ConfigMap key": (
        lambda o: by(o, "ConfigMap")["synapse-event-persister-config"]["data"].pop("synapse-event-persister-1.yaml"),
        "wants key",
    ),
    "missing Secret": (lambda o: o.remove(by(o, "Secret")["synapse-secrets"]), "missing Secret"),
    "missing claim": (lambda o: o.remove(by(o, "PersistentVolumeClaim")["synapse-media"]), "PersistentVolumeClaim"),
    "probe on an unknown port": (
        lambda o: _sts(o)["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"].update(port="hc"),
        "readinessProbe",
    ),
    "secret in a ConfigMap": (
        lambda o: by(o, "ConfigMap")["synapse-shared"]["data"].update(
            leak="macaroon_secret_key: " + by(o, "Secret")["synapse-secrets"]["stringData"]["example.test.macaroon.key"]
        ),
        "holds a value of a Secret",
    ),
    "database password in a ConfigMap": (
        lambda o: by(o, "ConfigMap")["synapse-shared"]["data"].update(leak=f"password: {PASSWORD}"),
        "holds a value of a Secret",
    ),
    "duplicate object": (lambda o: o.append(copy.deepcopy(by(o, "Service")["synapse-redis"])), "defined twice"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_checker_catches(env, breakage):
    objects, _ = objects_for(env, "synchrotron:2, event_persister:2")
    assert check_manifests(objects) == []
    mutate, expected = BREAKAGES[breakage]
    mutate(objects)
    problems = check_manifests(objects)
    assert any(expected in p for p in problems), problems


# ---- the wiring, stated from Synapse's and Kubernetes' rules --------------------------------------------------


def pod_names(objects) -> dict[str, str]:
    """Every pod the StatefulSets will make → its StatefulSet (`<name>-<ordinal>`, ordinal < replicas)."""
    return {f"{n}-{i}": n for n, s in by(objects, "StatefulSet").items() for i in range(s["spec"]["replicas"])}


@pytest.mark.parametrize("name", ["complement", "full", "persisters"])
def test_writers_and_instance_map_are_pods(env, name):
    objects, plan = objects_for(env, SETS[name])
    pods = pod_names(objects)
    shared = yaml.safe_load(by(objects, "ConfigMap")["synapse-shared"]["data"]["shared.yaml"])
    services = by(objects, "Service")
    # instance_map: main and every writer, each at its pod's stable DNS name under the headless Service.
    assert set(shared["instance_map"]) >= {"main"}
    for worker, where in shared["instance_map"].items():
        pod = "synapse-main-0" if worker == "main" else worker
        assert pod in pods, worker
        sts = pods[pod]
        assert where == {"host": f"{pod}.{sts}", "port": 9093}
        headless = services[sts]
        assert headless["spec"]["clusterIP"] == "None"
        assert {"name": "replication", "port": 9093, "targetPort": "replication", "protocol": "TCP"} in headless[
            "spec"
        ]["ports"]
    # Synapse: every stream writer is in instance_map ("master" is main's name there).
    for stream, writers in shared.get("stream_writers", {}).items():
        for writer in writers:
            assert writer == "master" or writer in shared["instance_map"], (stream, writer)
    # Every instance list names pods that exist.
    for key in ("pusher_instances", "federation_sender_instances"):
        for worker in shared.get(key, []):
            assert worker in pods, worker
    # As many pods as the plan has workers, and the same number per declared type.
    assert len(pods) == len(plan.workers) + 1
    # Singletons (Synapse allows one) are one replica.
    for proc in plan.workers:
        if any(catalog.ROLES[r].max_instances == 1 for r in proc.roles):
            base = re.sub(r"[0-9]+$", "", proc.name).replace("_", "-")
            assert by(objects, "StatefulSet")[f"synapse-{base}"]["spec"]["replicas"] == 1, proc.name


def test_each_pod_finds_its_own_config(env):
    """The container command names `<workers dir>/$(POD_NAME).yaml`; for every ordinal that file is in the mounted
    ConfigMap, and its worker_name is the pod's name."""
    objects, plan = objects_for(env, SETS["persisters"])
    config_maps = by(objects, "ConfigMap")
    for sts_name, sts in by(objects, "StatefulSet").items():
        pod = sts["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["env"][0] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
        own = container["command"][-1]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for ordinal in range(sts["spec"]["replicas"]):
            pod_name = f"{sts_name}-{ordinal}"
            path = own.replace("$(POD_NAME)", pod_name)
            if sts_name == "synapse-main":
                mount = mounts[path]
                key = mount["subPath"]
            else:
                mount = mounts[os.path.dirname(path)]
                key = os.path.basename(path)
                assert {"key": key, "path": key} in volumes[mount["name"]]["configMap"]["items"]
            doc = yaml.safe_load(config_maps[volumes[mount["name"]]["configMap"]["name"]]["data"][key])
            if sts_name != "synapse-main":
                assert doc["worker_name"] == pod_name
                log = doc["worker_log_config"]
                assert os.path.basename(log) in config_maps[f"{sts_name}-config"]["data"]
        # The init step runs Synapse's config loader on the same files.
        check = next(c for c in pod["initContainers"] if c["name"] == "check")
        assert check["command"][-3:] == [a for a in container["command"] if a.startswith("/") and ".yaml" in a][-3:]
        assert "synapse_workers.synapse_check" in check["command"]


def test_network_policy_keeps_replication_and_metrics_internal(env):
    objects, _ = objects_for(env, "synchrotron, event_persister", SYNAPSE_METRICS="1")
    policy = by(objects, "NetworkPolicy")["synapse-internal"]["spec"]
    synapse_pods = {"app.kubernetes.io/name": "synapse", "app.kubernetes.io/part-of": "synapse-workers"}
    assert policy["podSelector"]["matchLabels"] == synapse_pods
    for sts in by(objects, "StatefulSet").values():
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in synapse_pods.items())
    # Only Synapse pods reach every port; anyone else (nginx) only the public and health ports.
    for rule in policy["ingress"]:
        sources = [s["podSelector"]["matchLabels"] for s in rule["from"]]
        if sources != [synapse_pods]:
            assert {p["port"] for p in rule["ports"]} == {8008, 8080}
    redis = by(objects, "NetworkPolicy")["synapse-redis"]["spec"]
    assert redis["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": synapse_pods}}], "ports": [{"port": 6379, "protocol": "TCP"}]}
    ]
    # Replication and metrics are in no non-headless Service, and nginx never proxies to them.
    for name, svc in by(objects, "Service").items():
        if svc["spec"].get("clusterIP") != "None":
            assert not {p["name"] for p in svc["spec"]["ports"]} & {"replication", "metrics"}, name
    nginx = by(objects, "ConfigMap")["synapse-nginx-config"]["data"]["nginx.conf"]
    assert ":9093" not in nginx and ":9000" not in nginx
    assert re.search(r"location \^~ /_synapse/replication \{\s*return 404;", nginx)


def test_nginx_routes_like_the_single_host_config(env):
    """Same routes and upstreams as `generate`'s nginx.conf; servers are the per-pod Services on 8008."""
    objects, plan = objects_for(env, SETS["complement"])
    exported = by(objects, "ConfigMap")["synapse-nginx-config"]["data"]["nginx.conf"]
    generated = next(t for p, t in render_all(plan).managed.items() if p.endswith("nginx.conf"))
    servers = re.findall(r"server (\S+) max_fails", exported)
    services = by(objects, "Service")
    for server in servers:
        host, port = server.split(":")
        assert port == "8008" and services[host]["spec"]["type"] == "ClusterIP", server
    assert len(servers) == len(re.findall(r"server (\S+) max_fails", generated))
    assert re.findall(r"location ~ (\S+)", exported) == re.findall(r"location ~ (\S+)", generated)
    assert re.findall(r"upstream (\S+) \{", exported) == re.findall(r"upstream (\S+) \{", generated)
    # /health asks main's health listener (there is no launcher in a pod).
    assert "proxy_pass http://synapse-main-0:8080;" in exported


def test_config_hash_rolls_exactly_the_pods_whose_config_changes(env):
    def hashes(objects):
        return {
            o["metadata"]["name"]: o["spec"]["template"]["metadata"]["annotations"]["synapse-workers/config-hash"]
            for o in objects
            if o["kind"] in ("StatefulSet", "Deployment")
        }

    before, _ = objects_for(env, "synchrotron, event_persister")
    after, _ = objects_for(env, "synchrotron, event_persister:2")  # a writer added: every Synapse process restarts
    old, new = hashes(before), hashes(after)
    synapse = {n for n in old if n.startswith("synapse-") and n not in ("synapse-nginx", "synapse-redis")}
    assert synapse == {"synapse-main", "synapse-synchrotron", "synapse-event-persister"}
    for name in synapse:
        assert old[name] != new[name], name
    # nginx's routing does not depend on event persisters; Redis has no config.
    assert old["synapse-nginx"] == new["synapse-nginx"]
    assert old["synapse-redis"] == new["synapse-redis"]
    # An nginx-only setting rolls nginx only.
    tuned, _ = objects_for(env, "synchrotron, event_persister", NGINX_WORKER_CONNECTIONS="4096")
    changed = {n for n, h in hashes(tuned).items() if h != old[n]}
    assert changed == {"synapse-nginx"}


def _normalise(doc, names: dict[str, str]):
    """A Synapse config with process names mapped through `names` and TCP addresses (host, port, bind_addresses)
    blanked: all that may differ between the single-host files and an export's."""
    if isinstance(doc, dict):
        out = {}
        for key, value in doc.items():
            key = names.get(key, key)
            blank = key == "bind_addresses" or (key in ("host", "port") and not isinstance(value, dict | list))
            out[key] = "<address>" if blank else _normalise(value, names)
        return out
    if isinstance(doc, list):
        return [_normalise(v, names) for v in doc]
    if isinstance(doc, str):
        for old, new in names.items():
            if doc == old or doc.endswith((f"/{old}.yaml", f"/{old}.log.config")):
                return doc.replace(old, new)
    return doc


def test_pod_config_equals_generate_apart_from_names_and_addresses(env, tmp_path):
    from synapse_workers.cli import main as cli_main

    spec = SETS["complement"]
    objects, plan = objects_for(env, spec)  # before `generate`: the export refuses an existing homeserver.yaml
    assert cli_main(["generate"], {**env, "SYNAPSE_WORKER_TYPES": spec}) == 0  # what it writes, read back from disk
    export = make_export(plan, KUBERNETES)
    names = {m.plan_name: m.name for m in export.members}
    config_maps = by(objects, "ConfigMap")
    layout = plan.layout
    # homeserver.yaml: byte for byte.
    assert config_maps["synapse-shared"]["data"]["homeserver.yaml"] == Path(plan.homeserver.path).read_text()
    pairs = [(Path(layout.shared_config).read_text(), config_maps["synapse-shared"]["data"]["shared.yaml"])]
    for member in export.members:
        group = next(g for g in export.groups if member in g.members)
        data = config_maps[f"{group.workload}-config"]["data"]
        generated_proc = plan.process(member.plan_name)
        own = "main.yaml" if member.name == "main" else f"{member.name}.yaml"
        pairs.append((Path(generated_proc.config_files[-1]).read_text(), data[own]))
        pairs.append((Path(generated_proc.log_config).read_text(), data[f"{member.name}.log.config"]))
    for generated, exported in pairs:
        g, e = yaml.safe_load(generated), yaml.safe_load(exported)
        if "redis" in g:  # a unix socket here, the Redis Service there
            assert g.pop("redis")["enabled"] and e.pop("redis") == {
                "enabled": True,
                "host": "synapse-redis",
                "port": 6379,
            }
        assert _normalise(g, names) == _normalise(e, {}), (generated[:300], exported[:300])


def test_secrets_only_in_the_secret(env):
    objects, plan = objects_for(env, "synchrotron, event_persister")
    secret = by(objects, "Secret")["synapse-secrets"]
    export = make_export(plan, KUBERNETES)
    assert len(secret["stringData"]) == len(export.secret_files())
    text = yaml.safe_dump_all([o for o in objects if o["kind"] != "Secret"])
    for value in secret["stringData"].values():
        assert value.strip() not in text
    assert PASSWORD not in text
    # Mounted into each Synapse pod's data dir as the files homeserver.yaml and shared.yaml name.
    for sts in by(objects, "StatefulSet").values():
        volume = next(v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")
        paths = {i["path"] for i in volume["secret"]["items"]}
        assert paths == {os.path.basename(p) for p in export.secret_files()}


def test_unix_socket_and_log_switches_become_pod_settings(env):
    """Unix-socket listeners are a single-host optimisation: in pods every listener is TCP. Logs on disk get a
    directory in every pod that writes them."""
    extra = {
        "SYNAPSE_PUBLIC_UNIX_SOCKETS": "1",
        "SYNAPSE_HTTP_REPLICATION_UNIX_SOCKETS": "1",
        "SYNAPSE_METRICS": "1",
        "SYNAPSE_METRICS_UNIX_SOCKETS": "1",
        "SYNAPSE_WORKERS_WRITE_LOGS_TO_DISK": "1",
    }
    objects, plan = objects_for(env, "synchrotron, event_persister", **extra)
    assert check_manifests(objects) == []
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    for name, data in by(objects, "ConfigMap").items():
        for key, text in data["data"].items():
            doc = yaml.safe_load(text) if key.endswith(".yaml") and key != "homeserver.yaml" else None
            for listener in (doc or {}).get("listeners", []) + (doc or {}).get("worker_listeners", []):
                assert "path" not in listener and listener["bind_addresses"] == ["0.0.0.0"], (name, key)
            assert "unix:" not in text or key != "nginx.conf"
    logs = plan.layout.logs_on_disk
    nginx = by(objects, "Deployment")["synapse-nginx"]["spec"]["template"]["spec"]
    assert logs in {m["mountPath"] for m in nginx["containers"][0]["volumeMounts"]}
    for sts in by(objects, "StatefulSet").values():
        init = sts["spec"]["template"]["spec"]["initContainers"][0]
        assert f"mkdir -p {logs}" in init["command"][-1]


def test_a_low_public_port_and_root(env):
    """nginx runs as UID, so a public port below 1024 needs the unprivileged-port sysctl; UID=0 is not non-root."""
    objects, _ = objects_for(env, "synchrotron", SYNAPSE_HTTP_PORT="80", UID="0", GID="0")
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSIONS[-1], strict=True)
    assert check_manifests(objects) == []
    nginx = by(objects, "Deployment")["synapse-nginx"]["spec"]["template"]["spec"]
    assert nginx["securityContext"]["sysctls"] == [{"name": "net.ipv4.ip_unprivileged_port_start", "value": "0"}]
    assert nginx["containers"][0]["ports"][0]["containerPort"] == 80
    for sts in by(objects, "StatefulSet").values():
        context = sts["spec"]["template"]["spec"]["securityContext"]
        assert context["runAsUser"] == 0 and context["runAsNonRoot"] is False and "sysctls" not in context
    objects, _ = objects_for(env, "synchrotron")  # the defaults: 8008, 991
    nginx = by(objects, "Deployment")["synapse-nginx"]["spec"]["template"]["spec"]
    assert "sysctls" not in nginx["securityContext"] and nginx["securityContext"]["runAsNonRoot"] is True

"""The Kubernetes manifests' invariants that schema validation does not catch. Pure; returns problems.

`check_manifests` finds what Kubernetes would refuse (or silently misroute) although its schemas accept it. Each
problem is a sentence naming the object: `export kubernetes` (cli.py) reports any as a bug of ours, not the
user's input, and writes nothing; the tests run it on deliberately broken manifests.
"""

from __future__ import annotations

import base64
import re
from typing import Any

from .export import STATEFULSET_NAME_MAX

POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"  # set on every StatefulSet pod by the controller
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS_1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
PORT_NAME = re.compile(r"[a-z0-9]([a-z0-9]|-(?=[a-z0-9]))*")  # IANA_SVC_NAME: no "--", no "-" at either end
WORKLOADS = ("StatefulSet", "Deployment")


def check_manifests(objects: list[dict[str, Any]]) -> list[str]:
    """Problems Kubernetes would refuse (or silently misroute) that its schemas accept: names (DNS-1123 labels,
    Services DNS-1035, StatefulSets at most 52 characters), port names (IANA: at most 15 characters, no `_`),
    selectors matching their pod templates, every referenced Service/Secret/ConfigMap/claim existing (keys
    included), probes naming a container port, and no Secret value inside a ConfigMap."""
    problems: list[str] = []
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for obj in objects:
        kind, name = obj.get("kind", "?"), obj.get("metadata", {}).get("name", "")
        what = f"{kind} {name!r}"
        if name in by_kind.setdefault(kind, {}):
            problems.append(f"{what}: defined twice")
        by_kind[kind][name] = obj
        if not (len(name) <= 63 and DNS_LABEL.fullmatch(name)):
            problems.append(f"{what}: not a DNS-1123 label (lower case letters, digits, '-'; at most 63)")
        if kind == "Service" and not DNS_1035.fullmatch(name):
            problems.append(f"{what}: a Service name must start with a letter (DNS-1035)")
        if kind == "StatefulSet" and len(name) > STATEFULSET_NAME_MAX:
            problems.append(f"{what}: longer than {STATEFULSET_NAME_MAX} characters (its pods' revision label)")
    services = by_kind.get("Service", {})
    config_maps = by_kind.get("ConfigMap", {})
    secrets = by_kind.get("Secret", {})
    claims = by_kind.get("PersistentVolumeClaim", {})
    templates: dict[str, tuple[dict[str, Any], dict[str, str], int]] = {}  # workload → (pod spec, labels, replicas)
    for kind in WORKLOADS:
        for name, obj in by_kind.get(kind, {}).items():
            what = f"{kind} {name!r}"
            spec = obj["spec"]
            labels = spec["template"]["metadata"].get("labels", {})
            selector = spec["selector"].get("matchLabels", {})
            if not selector or any(labels.get(k) != v for k, v in selector.items()):
                problems.append(f"{what}: selector {selector} does not match its pod template's labels {labels}")
            templates[name] = (
                spec["template"]["spec"],
                labels,
                spec.get("replicas", 1) if kind == "StatefulSet" else 0,
            )
            if kind == "StatefulSet":
                governing = services.get(spec.get("serviceName", ""))
                if governing is None:
                    problems.append(f"{what}: serviceName {spec.get('serviceName')!r} is not a Service here")
                elif governing["spec"].get("clusterIP") != "None":
                    problems.append(f"{what}: serviceName {spec['serviceName']!r} is not headless")
            problems += _check_pod(what, spec["template"]["spec"], config_maps, secrets, claims)
    for name, svc in services.items():
        problems += _check_service(name, svc, templates)
    problems += _check_secret_values(config_maps, secrets)
    return problems


def _port_name_problem(where: str, name: str | None) -> list[str]:
    if name is None:
        return []
    if len(name) > 15 or not PORT_NAME.fullmatch(name) or not re.search("[a-z]", name):
        return [f"{where}: port name {name!r} is not an IANA service name (at most 15 of a-z, 0-9, '-')"]
    return []


def _check_pod(
    what: str, pod: dict[str, Any], config_maps: dict[str, Any], secrets: dict[str, Any], claims: dict[str, Any]
) -> list[str]:
    problems = []
    for volume in pod.get("volumes", []):
        if "configMap" in volume:
            ref, pool, keys = volume["configMap"], config_maps, "data"
        elif "secret" in volume:
            ref, pool, keys = {**volume["secret"], "name": volume["secret"].get("secretName")}, secrets, "stringData"
        elif "persistentVolumeClaim" in volume:
            if volume["persistentVolumeClaim"].get("claimName") not in claims:
                problems.append(f"{what}: volume {volume['name']!r} names a missing PersistentVolumeClaim")
            continue
        else:
            continue
        target = pool.get(ref.get("name"))
        kind = "ConfigMap" if pool is config_maps else "Secret"
        if target is None:
            problems.append(f"{what}: volume {volume['name']!r} names a missing {kind} {ref.get('name')!r}")
            continue
        present = set(target.get(keys, {})) | set(target.get("data", {}))
        for item in ref.get("items", []):
            if item["key"] not in present:
                problems.append(
                    f"{what}: volume {volume['name']!r} wants key {item['key']!r}, not in {kind} {ref.get('name')!r}"
                )
    volume_names = {v["name"] for v in pod.get("volumes", [])}
    for container in pod.get("initContainers", []) + pod.get("containers", []):
        where = f"{what} container {container['name']!r}"
        ports = {p.get("name") for p in container.get("ports", [])}
        for port in container.get("ports", []):
            problems += _port_name_problem(where, port.get("name"))
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.get(probe_kind) or {}
            action = probe.get("httpGet") or probe.get("tcpSocket") or {}
            port = action.get("port")
            if isinstance(port, str) and port not in ports:
                problems.append(f"{where}: {probe_kind} names port {port!r}, which the container does not have")
        for mount in container.get("volumeMounts", []):
            if mount["name"] not in volume_names:
                problems.append(f"{where}: mounts volume {mount['name']!r}, which the pod does not have")
    return problems


def _check_service(
    name: str, svc: dict[str, Any], templates: dict[str, tuple[dict[str, Any], dict[str, str], int]]
) -> list[str]:
    what = f"Service {name!r}"
    problems = []
    for port in svc["spec"].get("ports", []):
        problems += _port_name_problem(what, port.get("name"))
    selector = dict(svc["spec"].get("selector") or {})
    pod_name = selector.pop(POD_NAME_LABEL, None)
    matched = []
    for workload, (pod, labels, replicas) in templates.items():
        if not selector or any(labels.get(k) != v for k, v in selector.items()):
            continue
        if pod_name is not None:
            ordinal = pod_name.removeprefix(f"{workload}-")
            if not (ordinal.isdigit() and int(ordinal) < replicas):
                continue
        matched.append(pod)
    if not matched:
        problems.append(f"{what}: its selector {svc['spec'].get('selector')} matches no pod template")
        return problems
    for port in svc["spec"].get("ports", []):
        target = port.get("targetPort")
        if isinstance(target, str):
            names = {p.get("name") for pod in matched for c in pod["containers"] for p in c.get("ports", [])}
            if target not in names:
                problems.append(f"{what}: targetPort {target!r} is no container port of the pods it selects")
    return problems


def _check_secret_values(config_maps: dict[str, Any], secrets: dict[str, Any]) -> list[str]:
    problems = []
    values = {v for s in secrets.values() for v in secret_values(s)}
    for name, config_map in config_maps.items():
        for key, text in config_map.get("data", {}).items():
            if any(v in text for v in values):
                problems.append(f"ConfigMap {name!r}: key {key!r} holds a value of a Secret")
    return problems


def secret_values(secret: dict[str, Any]) -> list[str]:
    """Every value of a Secret, and each word of 8 characters or more inside one (a password in a passfile)."""
    values = list(secret.get("stringData", {}).values())
    values += [base64.b64decode(v).decode("utf-8", "replace") for v in secret.get("data", {}).values()]
    found = []
    for value in values:
        found.append(value.strip())
        found += [t for t in re.split(r"[\s:]+", value) if len(t) >= 8]  # a password inside a passfile line
    return [v for v in found if v]

"""A release rendered as Kubernetes objects (`llmctl template CHART --target kubernetes`).

The same hardening as the docker driver, in Kubernetes terms: non-root (uid 65532), read-only root
filesystem, no privilege escalation, every capability dropped, the RuntimeDefault seccomp profile,
a writable emptyDir only at /tmp. An init container re-hashes the weights inside the image against the
pinned digest before the server container may start (the server checks again itself), probes use
/health, and the Service is cluster-internal. With replicas > 1 a PodDisruptionBudget keeps one
serving through node drains; `--network-policy` admits only labelled clients and no egress at all
(a model server needs none).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from manager.errors import LlmctlError
from manager.manifest import ModelManifest
from manager.model_image import MODELS_DIR, PORT

UID = 65532
CLIENT_LABEL = "llmctl.dev/client"
API_KEY_SECRET_KEY = "api-key"


class KubernetesRenderError(LlmctlError):
    """A release that cannot be expressed for Kubernetes as asked."""


@dataclass(frozen=True)
class Target:
    release: str
    image: str  # what the cluster pulls: a registry reference (push the llmctl image there first)
    weights_sha256: str  # the digest of the weights file inside the image
    replicas: int = 1
    namespace: str | None = None
    network_policy: bool = False


def _quantity(memory: str) -> str:
    """`8g` (docker's spelling) -> `8Gi`; a bare number is bytes."""
    m = re.fullmatch(r"([0-9]+)([kmg]?)", memory)
    if m is None:
        raise KubernetesRenderError(f"resources.memory {memory!r} is not a size like 512m or 8g")
    return m.group(1) + {"": "", "k": "Ki", "m": "Mi", "g": "Gi"}[m.group(2)]


def _labels(m: ModelManifest, t: Target) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": m.name,
        "app.kubernetes.io/instance": t.release,
        "app.kubernetes.io/version": m.version,
        "app.kubernetes.io/managed-by": "llmctl",
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _meta(name: str, m: ModelManifest, t: Target) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": _labels(m, t)}
    if t.namespace:
        meta["namespace"] = t.namespace
    return meta


def _server_args(m: ModelManifest, t: Target) -> list[str]:
    args = ["--host", "0.0.0.0", "--port", str(PORT), "--sha256", t.weights_sha256]
    for flag, value in (("--threads", m.threads), ("--ctx", m.context), ("--parallel", m.parallel)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _verify_weights_command(path: str, digest: str) -> list[str]:
    script = (
        "import hashlib, sys\n"
        "h = hashlib.sha256()\n"
        f"with open({path!r}, 'rb') as f:\n"
        "    for chunk in iter(lambda: f.read(1 << 24), b''):\n"
        "        h.update(chunk)\n"
        f"ok = 'sha256:' + h.hexdigest() == {digest!r}\n"
        f"print('weights digest ' + ('matches ' if ok else 'MISMATCH: expected ') + {digest!r})\n"
        "sys.exit(0 if ok else 1)\n"
    )
    return ["/usr/bin/python3", "-c", script]


def deployment(m: ModelManifest, t: Target) -> dict[str, Any]:
    weights_path = f"/{MODELS_DIR}/{m.name}.gguf"
    resources: dict[str, Any] = {"requests": {"cpu": "500m", "memory": "256Mi"}}
    limits: dict[str, Any] = {}
    if m.cpus is not None:
        limits["cpu"] = str(m.cpus)
        resources["requests"]["cpu"] = str(m.cpus)
    if m.memory is not None:
        limits["memory"] = _quantity(m.memory)
        resources["requests"]["memory"] = _quantity(m.memory)
    if limits:
        resources["limits"] = limits
    env: list[dict[str, Any]] = [{"name": "LLMCTL_VERIFY_DIR", "value": "/tmp/llmctl-verified"}]
    if m.api_key_env:
        secret = {"name": f"{t.release}-api-key", "key": API_KEY_SECRET_KEY}
        env.append({"name": "LLMCTL_API_KEY", "valueFrom": {"secretKeyRef": secret}})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    selector = {"app.kubernetes.io/name": m.name, "app.kubernetes.io/instance": t.release}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(t.release, m, t),
        "spec": {
            "replicas": t.replicas,
            "selector": {"matchLabels": selector},
            # a new pod serves before an old one goes: upgrades never drop below the replica count
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": _labels(m, t)},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": UID,
                        "runAsGroup": UID,
                        "fsGroup": UID,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": [
                        {
                            "name": "verify-weights",
                            "image": t.image,
                            "command": _verify_weights_command(weights_path, t.weights_sha256),
                            "securityContext": _container_security(),
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                        }
                    ],
                    "containers": [
                        {
                            "name": "model",
                            "image": t.image,
                            "args": _server_args(m, t),
                            "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                            "env": env,
                            "resources": resources,
                            "securityContext": _container_security(),
                            "startupProbe": {**probe, "failureThreshold": 60},
                            "readinessProbe": probe,
                            "livenessProbe": {**probe, "failureThreshold": 3},
                            "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        }
                    ],
                    "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}],
                },
            },
        },
    }


def service(m: ModelManifest, t: Target) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(t.release, m, t),
        "spec": {
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": m.name, "app.kubernetes.io/instance": t.release},
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(m: ModelManifest, t: Target) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(t.release, m, t),
        "spec": {
            "minAvailable": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": m.name, "app.kubernetes.io/instance": t.release}},
        },
    }


def network_policy(m: ModelManifest, t: Target) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(t.release, m, t),
        "spec": {
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": m.name, "app.kubernetes.io/instance": t.release}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {CLIENT_LABEL: "true"}}}],
                    "ports": [{"port": PORT, "protocol": "TCP"}],
                }
            ],
            "egress": [],  # nothing: the weights are in the image, the server calls no one
        },
    }


def render_objects(m: ModelManifest, t: Target) -> list[dict[str, Any]]:
    """Deployment, Service, and (as asked) PodDisruptionBudget and NetworkPolicy."""
    if m.weights_storage == "mount":
        raise KubernetesRenderError(
            f"{m.name}: spec.storage is mount; the kubernetes target needs the weights baked into the image "
            "(--set weights.storage=image)"
        )
    if t.replicas < 1:
        raise KubernetesRenderError(f"--replicas must be at least 1, got {t.replicas}")
    objects = [deployment(m, t), service(m, t)]
    if t.replicas > 1:
        objects.append(disruption_budget(m, t))
    if t.network_policy:
        objects.append(network_policy(m, t))
    return objects


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objects)

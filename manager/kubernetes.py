"""A release rendered as Kubernetes objects (`llmctl template CHART --target kubernetes`, and what the
kubernetes driver applies: manager/drivers/kubernetes.py).

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

from manager.drivers.base import tuning_args
from manager.errors import LlmctlError
from manager.manifest import ModelManifest
from manager.model_image import MODELS_DIR, PORT

UID = 65532
CLIENT_LABEL = "llmctl.dev/client"
API_KEY_SECRET_KEY = "api-key"
# on the pod template, set by the kubernetes driver: which llmctl revision the pods run (a rollout
# undo brings the older value back with the older template), and the weights they serve
REVISION_LABEL = "llmctl.dev/revision"
MODEL_DIGEST_ANNOTATION = "llmctl.dev/model-digest"
MANAGED_BY = {"app.kubernetes.io/managed-by": "llmctl"}


class KubernetesRenderError(LlmctlError):
    """A release that cannot be expressed for Kubernetes as asked."""


@dataclass(frozen=True)
class Target:
    """Where and how `llmctl template --target kubernetes` renders a chart."""

    release: str
    image: str  # what the cluster pulls: a registry reference (push the llmctl image there first)
    weights_sha256: str  # the digest of the weights file inside the image
    replicas: int = 1
    namespace: str | None = None
    network_policy: bool = False


@dataclass(frozen=True)
class Workload:
    """What the objects are rendered from: a chart's manifest with a `Target` (`workload`), or the
    kubernetes driver's instance spec."""

    release: str
    model: str  # app.kubernetes.io/name
    version: str  # app.kubernetes.io/version
    image: str
    weights_path: str  # the weights file inside the image
    weights_sha256: str
    threads: int | None = None
    ctx: int | None = None
    parallel: int | None = None
    repack: bool = True  # False: --no-repack
    cpus: float | None = None
    memory: str | None = None
    api_key: bool = False  # the server reads its API key from the Secret `<release>-api-key`
    replicas: int = 1
    namespace: str | None = None
    network_policy: bool = False
    revision: int | None = None  # the llmctl revision (the driver's): a label on the pod template


def workload(m: ModelManifest, t: Target) -> Workload:
    if m.weights_storage == "mount":
        raise KubernetesRenderError(
            f"{m.name}: spec.storage is mount; the kubernetes target needs the weights baked into the image "
            "(--set weights.storage=image)"
        )
    return Workload(
        release=t.release,
        model=m.name,
        version=m.version,
        image=t.image,
        weights_path=f"/{MODELS_DIR}/{m.name}.gguf",
        weights_sha256=t.weights_sha256,
        threads=m.threads,
        ctx=m.context,
        parallel=m.parallel,
        repack=m.repack,
        cpus=m.cpus,
        memory=m.memory,
        api_key=bool(m.api_key_env),
        replicas=t.replicas,
        namespace=t.namespace,
        network_policy=t.network_policy,
    )


def api_key_secret_name(release: str) -> str:
    return f"{release}-api-key"


def _quantity(memory: str) -> str:
    """`8g` (docker's spelling) -> `8Gi`; a bare number is bytes."""
    m = re.fullmatch(r"([0-9]+)([kmg]?)", memory)
    if m is None:
        raise KubernetesRenderError(f"resources.memory {memory!r} is not a size like 512m or 8g")
    return m.group(1) + {"": "", "k": "Ki", "m": "Mi", "g": "Gi"}[m.group(2)]


def selector(w: Workload) -> dict[str, str]:
    return {"app.kubernetes.io/name": w.model, "app.kubernetes.io/instance": w.release}


def _labels(w: Workload) -> dict[str, str]:
    return {**selector(w), "app.kubernetes.io/version": w.version, **MANAGED_BY}


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _meta(w: Workload) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": w.release, "labels": _labels(w)}
    if w.namespace:
        meta["namespace"] = w.namespace
    return meta


def _server_args(w: Workload) -> list[str]:
    args = ["--host", "0.0.0.0", "--port", str(PORT), "--sha256", w.weights_sha256]
    return args + tuning_args(threads=w.threads, ctx=w.ctx, parallel=w.parallel, repack=w.repack)


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


def deployment(w: Workload) -> dict[str, Any]:
    resources: dict[str, Any] = {"requests": {"cpu": "500m", "memory": "256Mi"}}
    limits: dict[str, Any] = {}
    if w.cpus is not None:
        limits["cpu"] = str(w.cpus)
        resources["requests"]["cpu"] = str(w.cpus)
    if w.memory is not None:
        limits["memory"] = _quantity(w.memory)
        resources["requests"]["memory"] = _quantity(w.memory)
    if limits:
        resources["limits"] = limits
    env: list[dict[str, Any]] = [{"name": "LLMCTL_VERIFY_DIR", "value": "/tmp/llmctl-verified"}]
    if w.api_key:
        secret = {"name": api_key_secret_name(w.release), "key": API_KEY_SECRET_KEY}
        env.append({"name": "LLMCTL_API_KEY", "valueFrom": {"secretKeyRef": secret}})
    probe = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    pod_labels = _labels(w)
    if w.revision is not None:
        pod_labels[REVISION_LABEL] = str(w.revision)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(w),
        "spec": {
            "replicas": w.replicas,
            "selector": {"matchLabels": selector(w)},
            # a new pod serves before an old one goes: upgrades never drop below the replica count
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {MODEL_DIGEST_ANNOTATION: w.weights_sha256}},
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
                            "image": w.image,
                            "command": _verify_weights_command(w.weights_path, w.weights_sha256),
                            "securityContext": _container_security(),
                            "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}},
                        }
                    ],
                    "containers": [
                        {
                            "name": "model",
                            "image": w.image,
                            "args": _server_args(w),
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


def service(w: Workload) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(w),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(w),
            "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def disruption_budget(w: Workload) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _meta(w),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": selector(w)}},
    }


def network_policy(w: Workload) -> dict[str, Any]:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(w),
        "spec": {
            "podSelector": {"matchLabels": selector(w)},
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


def objects(w: Workload) -> list[dict[str, Any]]:
    """Deployment, Service, and (as asked) PodDisruptionBudget and NetworkPolicy."""
    if w.replicas < 1:
        raise KubernetesRenderError(f"--replicas must be at least 1, got {w.replicas}")
    out = [deployment(w), service(w)]
    if w.replicas > 1:
        out.append(disruption_budget(w))
    if w.network_policy:
        out.append(network_policy(w))
    return out


def render_objects(m: ModelManifest, t: Target) -> list[dict[str, Any]]:
    """`llmctl template --target kubernetes`: the objects of a chart's manifest."""
    return objects(workload(m, t))


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "".join("---\n" + yaml.safe_dump(o, sort_keys=False) for o in objects)

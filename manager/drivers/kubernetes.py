"""The kubernetes driver: a release as a Deployment, with its Service, API-key Secret and (for more than
one replica) PodDisruptionBudget, applied through the official Kubernetes Python client.

The objects are the ones `llmctl template --target kubernetes` renders (manager/kubernetes.py), with
two additions on the pod template: the label `llmctl.dev/revision` (the llmctl revision the pods
run) and the annotation `llmctl.dev/model-digest`. The pods run the verified image by digest
(`<repository>@sha256:...`), so the cluster pulls exactly the bytes llmctl verified, and an init
container re-hashes the weights before the server (which checks again) may start.

A revision is a version of the Deployment's pod template, as a swarm revision is a version of a
service's spec, so the driver interface maps onto it the same way:

- `start(spec)` creates the Deployment, or updates it to the new revision (a rolling update with
  `maxSurge: 1, maxUnavailable: 0`: a new pod serves before an old one goes);
- `wait_healthy` follows the rollout as `kubectl rollout status` does, and gives up early when a pod
  of the revision cannot start (the init container refused the weights, the image cannot be pulled,
  the server crash-loops). When it gives up on an update it rolls the Deployment back to the
  revision before, as `kubectl rollout undo` does (the previous ReplicaSet's template), waits for
  that rollout, and returns False: the previous revision keeps serving;
- `list` gives one Instance per Deployment, with the revision its pod template runs; `stop`/`remove`
  of an instance whose revision the Deployment no longer runs do nothing, and of the current one
  delete the Deployment and the objects beside it;
- `rollback(release)` is `kubectl rollout undo`.

Which cluster and namespace: the kubeconfig (`KUBECONFIG`, else ~/.kube/config; in a pod, its service
account), its current context or `LLMCTL_KUBE_CONTEXT`, and the context's namespace or
`LLMCTL_KUBE_NAMESPACE` (else `default`). The Service is cluster-internal: the endpoint llmctl
records is its cluster DNS name, and health comes from the rollout (the pods' readiness probes on
/health), not from a probe from this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from manager import kubernetes as k8s
from manager.drivers.base import (
    DriverError,
    DriverUnavailableError,
    Instance,
    InstanceSpec,
    check_spec,
)
from manager.images import repository_of
from manager.model_image import PORT

CONTEXT_ENV = "LLMCTL_KUBE_CONTEXT"
NAMESPACE_ENV = "LLMCTL_KUBE_NAMESPACE"
RS_REVISION = "deployment.kubernetes.io/revision"  # the Deployment controller's revision of a ReplicaSet
POD_TEMPLATE_HASH = "pod-template-hash"
# kept from the Deployment, not copied from the ReplicaSet, when rolling back (kubectl's list)
_SKIPPED_ANNOTATIONS = {
    "kubectl.kubernetes.io/last-applied-configuration",
    RS_REVISION,
    "deployment.kubernetes.io/revision-history",
    "deployment.kubernetes.io/desired-replicas",
    "deployment.kubernetes.io/max-replicas",
    "deprecated.deployment.rollback.to",
}
# a pod of the revision waiting for one of these will not come up by waiting longer
_STUCK_REASONS = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CrashLoopBackOff",
}
REQUEST_TIMEOUT = (5.0, 30.0)  # connect, read: seconds
POLL = 2.0
ROLLBACK_WAIT = 300.0
MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


def connect(context: str | None = None) -> tuple[Any, str | None]:
    """(ApiClient, the context's namespace) from the kubeconfig, or from the pod's service account when
    llmctl runs in a cluster. `DriverUnavailableError` when there is neither."""
    import yaml
    from kubernetes import client, config

    context = context or os.environ.get(CONTEXT_ENV) or None
    kubeconfig = os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    configuration = client.Configuration()
    hint = f"set KUBECONFIG to a kubeconfig file (and {CONTEXT_ENV} to pick a context), or use --driver docker"
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    if not os.environ.get("KUBECONFIG") and not os.path.exists(kubeconfig) and not in_cluster:
        raise DriverUnavailableError(
            f"no Kubernetes configuration: no {kubeconfig} and not running in a cluster; {hint}"
        )
    if os.environ.get("KUBECONFIG") and not any(os.path.exists(f) for f in kubeconfig.split(os.pathsep) if f):
        raise DriverUnavailableError(f"KUBECONFIG={kubeconfig}: no such file; {hint}")
    try:
        if os.environ.get("KUBECONFIG") or os.path.exists(kubeconfig):
            config.load_kube_config(config_file=kubeconfig, context=context, client_configuration=configuration)
            contexts, active = config.list_kube_config_contexts(config_file=kubeconfig)
            chosen = next((c for c in contexts if c.get("name") == context), active) if context else active
            namespace = ((chosen or {}).get("context") or {}).get("namespace")
        else:
            config.load_incluster_config(client_configuration=configuration)
            with open("/var/run/secrets/kubernetes.io/serviceaccount/namespace") as f:
                namespace = f.read().strip() or None
    except (config.ConfigException, OSError, ValueError, TypeError, KeyError, yaml.YAMLError) as e:
        raise DriverUnavailableError(
            f"no usable Kubernetes configuration ({' '.join(str(e).split())}); {hint}"
        ) from None
    return client.ApiClient(configuration), namespace


def _status_message(body: str | None) -> str:
    """The `message` of a Kubernetes Status answer, else the body's first line."""
    try:
        data = json.loads(body or "")
    except ValueError:
        return (body or "").strip().splitlines()[0][:200] if (body or "").strip() else ""
    return str(data.get("message") or "") if isinstance(data, dict) else ""


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def _template_revision(deployment: dict[str, Any]) -> int:
    labels = ((deployment.get("spec") or {}).get("template") or {}).get("metadata", {}).get("labels") or {}
    value = str(labels.get(k8s.REVISION_LABEL, "0"))
    return int(value) if value.isdigit() else 0


def _progress_reason(deployment: dict[str, Any]) -> str:
    for cond in (deployment.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Progressing":
            return str(cond.get("reason") or "")
    return ""


def rollout_status(deployment: dict[str, Any]) -> tuple[bool, str, str | None]:
    """(done, what it waits for, why it failed) of a Deployment's rollout: `kubectl rollout status`."""
    meta, spec, status = deployment.get("metadata") or {}, deployment.get("spec") or {}, deployment.get("status") or {}
    if int(meta.get("generation", 0)) > int(status.get("observedGeneration", 0)):
        return False, "waiting for the Deployment spec update to be observed", None
    if _progress_reason(deployment) == "ProgressDeadlineExceeded":
        return False, "", "the rollout exceeded its progress deadline (progressDeadlineSeconds)"
    desired = int(spec.get("replicas", 1))
    updated = int(status.get("updatedReplicas", 0))
    replicas = int(status.get("replicas", 0))
    available = int(status.get("availableReplicas", 0))
    if updated < desired:
        return False, f"{updated} of {desired} new replicas have been updated", None
    if replicas > updated:
        return False, f"{replicas - updated} old replicas are pending termination", None
    if available < updated:
        return False, f"{available} of {updated} updated replicas are available", None
    return True, f"{available} of {desired} replicas available", None


def pod_problem(pod: dict[str, Any]) -> str | None:
    """Why a pod will not become ready by waiting longer, or None."""
    name = (pod.get("metadata") or {}).get("name", "?")
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return f"pod {name} failed: {status.get('reason') or ''} {status.get('message') or ''}".strip()
    for kind, statuses in (("init container", "initContainerStatuses"), ("container", "containerStatuses")):
        for cs in status.get(statuses) or []:
            state, last = cs.get("state") or {}, cs.get("lastState") or {}
            for terminated in (state.get("terminated"), last.get("terminated")):
                code = (terminated or {}).get("exitCode")
                if code not in (None, 0):
                    hint = " (the weights are not the pinned bytes)" if cs.get("name") == "verify-weights" else ""
                    return f"pod {name}: {kind} {cs.get('name')} exited {code}{hint}"
            waiting = state.get("waiting") or {}
            if waiting.get("reason") in _STUCK_REASONS:
                message = " ".join(str(waiting.get("message") or "").split())[:200]
                return f"pod {name}: {kind} {cs.get('name')}: {waiting['reason']}" + (f": {message}" if message else "")
    return None


class KubernetesDriver:
    """Model servers as one Deployment per release in a Kubernetes namespace."""

    name = "kubernetes"

    def __init__(self, api_client: Any = None, namespace: str | None = None) -> None:
        from kubernetes import client

        context_namespace = None
        if api_client is None:
            api_client, context_namespace = connect()
        self.namespace = namespace or os.environ.get(NAMESPACE_ENV) or context_namespace or "default"
        self.server = str(api_client.configuration.host)
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.policy = client.PolicyV1Api(api_client)
        self._notes: dict[tuple[str, int], str] = {}  # why wait_healthy gave up, for logs()

    # --- talking to the API server -----------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Map the client's errors to llmctl's, at the boundary."""
        import urllib3
        from kubernetes.client.exceptions import ApiException

        try:
            yield
        except DriverError:
            raise
        except ApiException as e:
            message = _status_message(e.body) or str(e.reason or "")
            if e.status == 401:
                raise DriverUnavailableError(
                    f"{what}: the Kubernetes API at {self.server} refused llmctl's credentials (401 Unauthorized); "
                    "check the kubeconfig's user"
                ) from None
            if e.status == 403:
                raise DriverError(
                    f"{what}: forbidden by the cluster ({message}); the kubeconfig's user needs rights to "
                    f"deployments, replicasets, pods, services, secrets and poddisruptionbudgets in {self.namespace}"
                ) from None
            raise DriverError(f"{what}: the Kubernetes API answered {e.status}: {message}") from None
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise DriverUnavailableError(
                f"{what}: cannot reach the Kubernetes API at {self.server} ({' '.join(str(e).split())[:200]}); "
                "check KUBECONFIG and the cluster"
            ) from None

    def _call(self, fn: Callable[..., Any], *args: Any, missing_ok: bool = False, **kwargs: Any) -> Any:
        """One API call; its JSON answer (None for a 404 when `missing_ok`)."""
        from kubernetes.client.exceptions import ApiException

        try:
            response = fn(*args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        except ApiException as e:
            if missing_ok and e.status == 404:
                return None
            raise
        data = response.data
        return json.loads(data) if data else {}

    def _api(self, kind: str, verb: str) -> Callable[..., Any]:
        """e.g. ("Deployment", "read") -> AppsV1Api.read_namespaced_deployment"""
        group, plural = {
            "Deployment": (self.apps, "deployment"),
            "ReplicaSet": (self.apps, "replica_set"),
            "Service": (self.core, "service"),
            "Secret": (self.core, "secret"),
            "Pod": (self.core, "pod"),
            "PodDisruptionBudget": (self.policy, "pod_disruption_budget"),
        }[kind]
        fn: Callable[..., Any] = getattr(group, f"{verb}_namespaced_{plural}")
        return fn

    def _read(self, kind: str, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self._call(self._api(kind, "read"), name, self.namespace, missing_ok=True)
        return found

    def _list(self, kind: str, selector: str) -> list[dict[str, Any]]:
        found = self._call(self._api(kind, "list"), self.namespace, label_selector=selector)
        return list(found.get("items") or [])

    def _delete(self, kind: str, name: str) -> None:
        self._call(self._api(kind, "delete"), name, self.namespace, missing_ok=True, propagation_policy="Foreground")

    def _apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """`_write` `obj` over what the cluster has of that name (refused if that is not llmctl's)."""
        current = self._read(obj["kind"], obj["metadata"]["name"])
        if current is not None:
            self._check_ours(current)
        return self._write(obj, current)

    def _write(self, obj: dict[str, Any], current: dict[str, Any] | None) -> dict[str, Any]:
        """Create `obj` (no `current`), or merge-patch `current` to it (a patch keeps what the cluster
        filled in, such as a Service's clusterIP). The patch carries `current`'s resourceVersion: it
        is refused if someone changed the object since it was read."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        if current is None:
            created: dict[str, Any] = self._call(self._api(kind, "create"), self.namespace, obj)
            return created
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": current["metadata"]["resourceVersion"]}}
        patched: dict[str, Any] = self._call(
            self._api(kind, "patch"), name, self.namespace, body, _content_type=MERGE_PATCH
        )
        return patched

    def _check_ours(self, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        if (meta.get("labels") or {}).get("app.kubernetes.io/managed-by") != "llmctl":
            raise DriverError(
                f"{obj.get('kind', 'an object')} {self.namespace}/{meta.get('name')} exists and is not llmctl's "
                "(no label app.kubernetes.io/managed-by=llmctl); remove it or pick another release name"
            )

    # --- reading the cluster -----------------------------------------------------------------------

    def _deployment(self, release: str) -> dict[str, Any] | None:
        found = self._read("Deployment", release)
        if found is not None:
            self._check_ours(found)
        return found

    def _mine(self, instance: Instance) -> dict[str, Any] | None:
        """The instance's Deployment if it still exists (the same one: by UID)."""
        found = self._deployment(instance.release)
        return found if found is not None and found["metadata"].get("uid") == instance.id else None

    def endpoint(self, release: str) -> str:
        return f"http://{release}.{self.namespace}.svc.cluster.local:{PORT}"

    def _instance(
        self, deployment: dict[str, Any], *, revision: int | None = None, health: str | None = None
    ) -> Instance:
        meta, status = deployment["metadata"], deployment.get("status") or {}
        template = (deployment.get("spec") or {}).get("template") or {}
        annotations = (template.get("metadata") or {}).get("annotations") or {}
        containers = (template.get("spec") or {}).get("containers") or []
        runs = _template_revision(deployment)
        done, _, failed = rollout_status(deployment)
        if revision is not None and revision != runs:
            state = "exited"  # the Deployment moved on (or back): that revision's pods are gone
        elif int(status.get("availableReplicas", 0)) > 0:
            state = "running"
        else:
            state = "created"
        if health is None:
            health = "unknown" if state == "exited" else "healthy" if done else "unhealthy" if failed else "starting"
            if health == "starting" and _progress_reason(deployment) == "NewReplicaSetAvailable":
                health = "unhealthy"  # this template's rollout completed once: replicas were lost since
        started = _time(meta.get("creationTimestamp"))
        for cond in status.get("conditions") or []:  # when the current template's rollout last changed
            if cond.get("type") == "Progressing":
                started = _time(cond.get("lastUpdateTime")) or started
        return Instance(
            id=str(meta.get("uid", "")),
            release=(meta.get("labels") or {}).get("app.kubernetes.io/instance", meta.get("name", "")),
            revision=runs if revision is None else revision,
            driver=self.name,
            endpoint=self.endpoint(meta.get("name", "")),
            state=state,
            health=health,
            started=(started or datetime.fromtimestamp(0, UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            model_digest=str(annotations.get(k8s.MODEL_DIGEST_ANNOTATION, "")),
            replicas=int((deployment.get("spec") or {}).get("replicas", 1)),
            image=next((str(c.get("image", "")) for c in containers if c.get("name") == "model"), ""),
        )

    def _pod_problem(self, release: str, revision: int) -> str | None:
        selector = f"app.kubernetes.io/instance={release},{k8s.REVISION_LABEL}={revision}"
        for pod in self._list("Pod", selector):
            problem = pod_problem(pod)
            if problem:
                return problem
        return None

    # --- the objects of a revision -----------------------------------------------------------------

    @staticmethod
    def pinned_image(spec: InstanceSpec) -> str:
        """`<repository>@<verified digest>`: what the pods run. `DriverError` for an image the cluster
        cannot pull (only in llmctl's local store) or one that needs its weights mounted."""
        if not spec.image or not re.fullmatch(r"sha256:[0-9a-f]{64}", spec.image_digest):
            raise DriverError("the kubernetes driver needs the verified image's registry reference and digest")
        repository = repository_of(spec.image.partition("@")[0])
        host = repository.split("/", 1)[0] if "/" in repository else ""
        if not ("." in host or ":" in host or host == "localhost"):
            raise DriverError(
                f"image {spec.image} is not in a registry the cluster can pull from: push it "
                "(`llmctl push IMAGE REGISTRY/REPO:TAG`) and install with --set image=REGISTRY/REPO:TAG"
            )
        if spec.weights is not None:
            raise DriverError(
                f"image {spec.image} serves mounted weights; the kubernetes driver needs the weights baked into "
                "the image (--set weights.storage=image)"
            )
        return f"{repository}@{spec.image_digest}"

    def _workload(self, spec: InstanceSpec, image: str, replicas: int) -> k8s.Workload:
        return k8s.Workload(
            release=spec.release,
            model=spec.model or spec.release,
            version=spec.model_version or "unknown",
            image=image,
            weights_path=spec.weights_in_image,
            weights_sha256=spec.weights_sha256,
            threads=spec.threads,
            ctx=spec.ctx,
            parallel=spec.parallel,
            repack=spec.repack,
            cpus=spec.cpus,
            memory=spec.memory,
            api_key=spec.api_key is not None,
            replicas=replicas,
            namespace=self.namespace,
            revision=spec.revision,
        )

    # --- the interface -----------------------------------------------------------------------------

    def start(self, spec: InstanceSpec) -> Instance:
        check_spec(spec)
        image = self.pinned_image(spec)
        if spec.replicas is not None and spec.replicas < 1:
            raise DriverError(f"replicas must be at least 1, not {spec.replicas}")
        with self._errors(f"cannot start Deployment {self.namespace}/{spec.release}"):
            current = self._deployment(spec.release)
            if current is not None and _template_revision(current) == spec.revision:
                raise DriverError(f"Deployment {self.namespace}/{spec.release} already runs revision {spec.revision}")
            replicas = spec.replicas or (int((current.get("spec") or {}).get("replicas", 1)) if current else 1)
            w = self._workload(spec, image, replicas)
            objects = {o["kind"]: o for o in k8s.objects(w)}
            if spec.api_key is not None:  # the Secret first: the pods read it as they start
                self._apply(self._secret(spec.release, spec.api_key))
            self._apply(objects["Service"])
            if "PodDisruptionBudget" in objects:
                self._apply(objects["PodDisruptionBudget"])
            else:
                self._delete("PodDisruptionBudget", spec.release)
            applied = self._write(objects["Deployment"], current)  # read and checked above
            return self._instance(applied, revision=spec.revision, health="unknown")

    def _secret(self, release: str, api_key: str) -> dict[str, Any]:
        name = k8s.api_key_secret_name(release)
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"app.kubernetes.io/instance": release, **k8s.MANAGED_BY},
            },
            "type": "Opaque",
            "stringData": {k8s.API_KEY_SECRET_KEY: api_key},
        }

    def wait_healthy(self, instance: Instance, timeout: float) -> bool:
        """True once the Deployment's rollout of the instance's revision is complete (every replica
        updated and available, i.e. passing its readiness probe on /health). False as soon as the
        revision left the Deployment, a pod of it is stuck or the progress deadline passed, or after
        `timeout` seconds; an update is then rolled back to the revision before (and that awaited)."""
        deadline = time.monotonic() + timeout
        key = (instance.id, instance.revision)
        release = instance.release
        with self._errors(f"cannot follow the rollout of Deployment {self.namespace}/{release}"):
            while True:
                deployment = self._mine(instance)
                if deployment is None:
                    self._notes[key] = "the Deployment was removed"
                    return False
                if _template_revision(deployment) != instance.revision:
                    self._notes[key] = f"the Deployment runs revision {_template_revision(deployment)} now"
                    return False
                done, waiting, failed = rollout_status(deployment)
                if done:
                    self._notes.pop(key, None)
                    return True
                reason = failed or self._pod_problem(release, instance.revision)
                if reason is None and time.monotonic() >= deadline:
                    reason = f"not done after {timeout:.0f} s: {waiting}"
                if reason is not None:
                    break
                time.sleep(POLL)
            self._notes[key] = reason
            previous = self._undo(release, instance.revision)
            if previous is not None:
                self._notes[key] = f"{reason}; rolled back to revision {previous}"
                if not self._settle(release, previous):
                    self._notes[key] += " (that rollout has not finished yet)"
            return False

    def _undo(self, release: str, revision: int) -> int | None:
        """`kubectl rollout undo` of a Deployment that runs `revision`: its pod template replaced by the
        one of the newest ReplicaSet that ran another revision. The llmctl revision it brings back,
        or None when there is none (a first install) or the Deployment no longer runs `revision`."""
        deployment = self._deployment(release)
        if deployment is None or _template_revision(deployment) != revision:
            return None
        if (deployment.get("spec") or {}).get("paused"):
            raise DriverError(f"Deployment {self.namespace}/{release} is paused; resume it before rolling back")
        uid = deployment["metadata"]["uid"]
        owned = [
            rs
            for rs in self._list("ReplicaSet", f"app.kubernetes.io/instance={release}")
            if any(ref.get("uid") == uid for ref in rs["metadata"].get("ownerReferences") or [])
        ]

        def rs_revision(rs: dict[str, Any]) -> int:
            value = str((rs["metadata"].get("annotations") or {}).get(RS_REVISION, "0"))
            return int(value) if value.isdigit() else 0

        for rs in sorted(owned, key=rs_revision, reverse=True):
            if _template_revision(rs) in (0, revision):
                continue
            template = json.loads(json.dumps(rs["spec"]["template"]))
            template.get("metadata", {}).get("labels", {}).pop(POD_TEMPLATE_HASH, None)
            kept = {
                k: v for k, v in (deployment["metadata"].get("annotations") or {}).items() if k in _SKIPPED_ANNOTATIONS
            }
            copied = {
                k: v for k, v in (rs["metadata"].get("annotations") or {}).items() if k not in _SKIPPED_ANNOTATIONS
            }
            patch = [
                {"op": "test", "path": "/metadata/resourceVersion", "value": deployment["metadata"]["resourceVersion"]},
                {"op": "replace", "path": "/spec/template", "value": template},
                {"op": "replace", "path": "/metadata/annotations", "value": {**kept, **copied}},
            ]
            self._call(self._api("Deployment", "patch"), release, self.namespace, patch, _content_type=JSON_PATCH)
            return _template_revision(rs)
        return None

    def _settle(self, release: str, revision: int, timeout: float = ROLLBACK_WAIT) -> bool:
        """Wait until the Deployment's rollout of `revision` is complete (a rollback finished)."""
        deadline = time.monotonic() + timeout
        while True:
            deployment = self._deployment(release)
            if deployment is None or _template_revision(deployment) != revision:
                return False
            done, _, failed = rollout_status(deployment)
            if done or failed or time.monotonic() >= deadline:
                return done
            time.sleep(POLL)

    def rollback(self, release: str, timeout: float = ROLLBACK_WAIT) -> Instance:
        """`kubectl rollout undo`: the Deployment back on the pod template of the revision before,
        waited for. `DriverError` if there is no Deployment, no earlier revision, or it did not settle."""
        with self._errors(f"cannot roll back Deployment {self.namespace}/{release}"):
            deployment = self._deployment(release)
            if deployment is None:
                raise DriverError(f"release {release!r} has no Deployment in namespace {self.namespace}")
            previous = self._undo(release, _template_revision(deployment))
            if previous is None:
                raise DriverError(f"Deployment {self.namespace}/{release} has no earlier revision to roll back to")
            if not self._settle(release, previous, timeout):
                raise DriverError(f"the rollback of {self.namespace}/{release} to revision {previous} did not finish")
            settled = self._deployment(release)
            assert settled is not None
            return self._instance(settled)

    def health(self, instance: Instance) -> str:
        with self._errors(f"cannot read Deployment {self.namespace}/{instance.release}"):
            deployment = self._mine(instance)
            if deployment is None or _template_revision(deployment) != instance.revision:
                return "unknown"
            return self._instance(deployment).health

    def stop(self, instance: Instance, timeout: float = 30) -> None:
        """Delete the Deployment (its pods get SIGTERM and their grace period), its Service, Secret and
        PodDisruptionBudget, if it runs the instance's revision; wait until the Deployment is gone (its
        pods first: foreground deletion), at most `timeout` + 15 seconds. Nothing to do if it is gone
        or runs another revision."""
        release = instance.release
        with self._errors(f"cannot delete Deployment {self.namespace}/{release}"):
            deployment = self._mine(instance)
            if deployment is None or _template_revision(deployment) != instance.revision:
                return
            self._delete("Deployment", release)
            for kind, name in (
                ("Service", release),
                ("PodDisruptionBudget", release),
                ("Secret", k8s.api_key_secret_name(release)),
            ):
                found = self._read(kind, name)
                if (
                    found is not None
                    and (found["metadata"].get("labels") or {}).get("app.kubernetes.io/managed-by") == "llmctl"
                ):
                    self._delete(kind, name)
            deadline = time.monotonic() + max(0.0, timeout) + 15
            while self._mine(instance) is not None and time.monotonic() < deadline:
                time.sleep(POLL)

    def remove(self, instance: Instance) -> None:
        with self._errors(f"cannot read Deployment {self.namespace}/{instance.release}"):
            deployment = self._mine(instance)
            if deployment is not None and _template_revision(deployment) == instance.revision:
                raise DriverError(
                    f"Deployment {self.namespace}/{instance.release} runs revision {instance.revision}; stop it first"
                )
            self._notes.pop((instance.id, instance.revision), None)

    def list(self, release: str | None = None) -> list[Instance]:
        selector = "app.kubernetes.io/managed-by=llmctl"
        if release is not None:
            selector += f",app.kubernetes.io/instance={release}"
        with self._errors(f"cannot list Deployments in {self.namespace}"):
            return [self._instance(d) for d in self._list("Deployment", selector)]

    def logs(self, instance: Instance, tail: int = 50) -> str:
        """Why `wait_healthy` gave up, a stuck pod of the revision, and the last `tail` lines of the
        model container of its newest pod."""
        from kubernetes.client.exceptions import ApiException

        lines: list[str] = []
        note = self._notes.get((instance.id, instance.revision))
        if note:
            lines.append(note)
        with self._errors(f"cannot read the logs of {self.namespace}/{instance.release}"):
            selector = f"app.kubernetes.io/instance={instance.release},{k8s.REVISION_LABEL}={instance.revision}"
            pods = sorted(
                self._list("Pod", selector),
                key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "",
                reverse=True,
            )
            problems = [p for p in (pod_problem(pod) for pod in pods) if p]
            lines += [p for p in problems[:2] if not note or p not in note]
            for pod in pods:
                try:
                    response: Any = self.core.read_namespaced_pod_log(
                        pod["metadata"]["name"],
                        self.namespace,
                        container="model",
                        tail_lines=max(1, tail),
                        _preload_content=False,
                        _request_timeout=REQUEST_TIMEOUT,
                    )
                except ApiException as e:
                    if e.status in (400, 404):  # the container has not started (or the pod is gone): no log
                        continue
                    raise
                lines += bytes(response.data).decode("utf-8", errors="replace").splitlines()
                break
        return "\n".join(lines) + ("\n" if lines else "")

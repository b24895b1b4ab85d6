"""Release actions: install, upgrade, rollback, uninstall (the work behind the Helm-like verbs).

Every action on a release holds that release's lock (`ReleaseStore.operation`), first recovers what
a killed llmctl left behind (pending revisions become failed, their instances are removed), and
records each step in the store before it is taken, so that no crash leaves a release stuck.

The path of one revision: chart + values -> Model manifest -> image (reused when built from the same
inputs, else built and signed) -> verified against the trust policy -> the driver starts an
instance -> health check -> deployed. An upgrade starts the new revision beside the old one and
retires the old one only once the new one is healthy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from manager import audit, build, chart_repos, charts, images, policy
from manager.cache import open_store
from manager.drivers import Driver, Instance, InstanceSpec, get_driver
from manager.errors import LlmctlError
from manager.manifest import ModelManifest, parse_manifest
from manager.model_image import WEIGHTS_DIGEST_LABEL, WEIGHTS_MOUNTED_LABEL, WEIGHTS_PATH_LABEL
from manager.releases import HISTORY_MAX, ReleaseNotFoundError, ReleaseStore, Revision, utc_now
from manager.verify_image import verify_image

BUILTIN_CHARTS = Path(__file__).resolve().parent.parent / "charts"


class ActionError(LlmctlError):
    """An install, upgrade, rollback or uninstall that cannot go ahead (nothing was changed)."""


@dataclass
class Options:
    """What the verbs take beside the release name and chart (Helm's flags)."""

    values_files: Sequence[Path] = ()
    sets: Sequence[str] = ()
    set_strings: Sequence[str] = ()
    version: str | None = None
    timeout: float = 300.0  # seconds to wait for the instance to become healthy
    atomic: bool = False
    dry_run: bool = False
    reuse_values: bool = False
    driver: str | None = None  # docker | process | swarm | kubernetes; default: docker when the engine answers
    replicas: int | None = None  # swarm, kubernetes: tasks or pods (None: keep the current count, 1 when new)
    key: str | None = None  # signing key for images built on the way
    policy_file: Path | None = None
    history_max: int = HISTORY_MAX
    progress: bool = True
    connection: Any = None  # manager.transfer.Connection for registries (None: the defaults)
    say: Callable[[str], None] = field(default=lambda message: None)


@dataclass
class Rendered:
    chart: charts.ChartMeta
    values: dict[str, Any]
    manifest_text: str
    manifest: ModelManifest


# --- chart -> manifest ------------------------------------------------------------------------------


def resolve_chart(chart_ref: str, opts: Options) -> Path:
    """A chart reference as install takes it; `oci://` charts are pulled and their signature checked
    against the trust policy first."""
    if chart_ref.startswith("oci://"):
        from manager import transfer

        conn = opts.connection or transfer.Connection()
        return transfer.chart_pull(chart_ref, opts.version, conn, policy_file=opts.policy_file)
    return chart_repos.resolve(chart_ref, opts.version, BUILTIN_CHARTS)


def render(
    chart_ref: str, opts: Options, *, name: str, revision: int, upgrade: bool, base: dict[str, Any] | None = None
) -> Rendered:
    """Resolve the chart, merge values (Helm's precedence) and render its Model manifest."""
    chart = charts.load_chart(resolve_chart(chart_ref, opts))
    # what the user asked for is stored (and reused by --reuse-values); the chart's defaults are not
    user_values = charts.merge_values(
        dataclasses.replace(chart, values={}), opts.values_files, opts.sets, opts.set_strings, base=base
    )
    values = charts.merge_values(chart, opts.values_files, opts.sets, opts.set_strings, base=base)
    text, _ = charts.render_manifest(chart, values, charts.ReleaseInfo(name, revision, upgrade))
    source = f"chart {chart.meta.name} {chart.meta.version}: templates/model.yaml (rendered)"
    manifest = parse_manifest(text, source, Path.cwd())
    return Rendered(chart.meta, user_values, text, manifest)


def served_weights_digest(manifest: ModelManifest) -> str:
    """The digest of the file the image serves: the pinned one, or for derived weights the one the
    locally built image carries (derived weights are only known once made)."""
    if manifest.requantize is None:
        return manifest.weights_sha256
    if build.find_built(manifest) is not None:
        return images.config_labels(manifest.tag)[1][WEIGHTS_DIGEST_LABEL]
    raise ActionError(
        f"{manifest.name} serves weights derived here ({manifest.requantize}); build the image first "
        f"(`llmctl build {manifest.name} ...`) so that their digest is known"
    )


def template(chart_ref: str, opts: Options, name: str = "release") -> str:
    """`llmctl template CHART`: the manifest an install would use."""
    return render(chart_ref, opts, name=name, revision=1, upgrade=False).manifest_text


# --- manifest -> verified image -> instance ---------------------------------------------------------


def ensure_image(manifest: ModelManifest, opts: Options) -> tuple[str, str]:
    """(image ref, verified digest) for `manifest`: the image it names in a registry (`spec.image`),
    pulled; or the one the local store holds built from the same inputs; or one built (and signed)
    now. Whichever it is, the trust policy decides before anything runs."""
    if manifest.image:  # a pull verifies against the policy, and drops what it refuses
        from manager import transfer

        opts.say(f"pulling {manifest.image}")
        conn = opts.connection or transfer.Connection()
        pulled = transfer.pull(manifest.image, conn, policy_file=opts.policy_file)
        ref, verified = pulled.name, pulled.verification
    elif build.find_built(manifest) is None:  # a build ends with the same check
        opts.say(f"building image {manifest.tag} (weights, base, runtime; signed)")
        result = build.build_model(
            manifest, load=False, progress=opts.progress, key=opts.key, policy_file=opts.policy_file
        )
        ref, verified = manifest.tag, result.verification
    else:
        ref = manifest.tag
        verified = verify_image(ref, policy=policy.load_policy(opts.policy_file), enforce_policy=True)
    opts.say(f"verified {ref} ({verified.digest}): " + "; ".join(verified.checks[1:]))
    return ref, verified.digest


def _engine_has(tag: str, image_id: str) -> bool:
    run = subprocess.run(["docker", "image", "inspect", "-f", "{{.Id}}", tag], capture_output=True, text=True)
    return run.returncode == 0 and run.stdout.strip() == image_id


def instance_spec(
    name: str, revision: int, manifest: ModelManifest, image: str, digest: str, driver: Driver
) -> InstanceSpec:
    """How the driver runs this revision: the verified image (docker) or its weights from the cache
    (process), with the manifest's server, resource, network and security settings."""
    ref = images.resolve(image)
    if ref.digest != digest:
        raise ActionError(f"{image} changed while installing ({digest} became {ref.digest}); run the command again")
    image_id, labels = images.config_labels(ref.name)
    weights_digest = labels[WEIGHTS_DIGEST_LABEL]
    weights_file = open_store().path(weights_digest)
    mounted = labels.get(WEIGHTS_MOUNTED_LABEL) == "true"
    if driver.name == "process" and not mounted and not weights_file.is_file():
        weights_file = _weights_from_image(ref.name, labels[WEIGHTS_PATH_LABEL], weights_digest)
    if driver.name in ("docker", "swarm") and not _engine_has(image, image_id):
        from registry.oci.daemon import load
        from registry.oci.layout import read_layout

        load(read_layout(images.layout_dir(), ref.name, check_diff_ids=False), image)
    api_key = None
    if manifest.api_key_env:
        api_key = os.environ.get(manifest.api_key_env)
        if not api_key:
            raise ActionError(
                f"the chart asks for an API key in ${manifest.api_key_env} (security.apiKeyEnv), but it is not set"
            )
    return InstanceSpec(
        release=name,
        revision=revision,
        image=image,
        image_id=image_id,
        weights=weights_file if (driver.name == "process" or mounted) else None,
        weights_in_image=labels[WEIGHTS_PATH_LABEL],
        weights_sha256=weights_digest,
        port=manifest.port,
        host=manifest.host,
        threads=manifest.threads,
        ctx=manifest.context,
        parallel=manifest.parallel,
        repack=manifest.repack,
        cpus=manifest.cpus,
        memory=manifest.memory,
        api_key=api_key,
        image_digest=digest,
        model=manifest.name,
        model_version=manifest.version,
    )


def _weights_from_image(image: str, path: str, digest: str) -> Path:
    """The process driver serves files, not images: take the weights out of a verified image (pulled
    from a registry, say) into the cache, checking their digest on the way."""
    from registry.oci.contents import sha256_of_file
    from registry.oci.layout import read_layout

    store = open_store()
    store.blob_dir.mkdir(parents=True, exist_ok=True)
    stored = read_layout(images.layout_dir(), image, check_diff_ids=False)
    with open(store.partial_path(digest), "wb") as out:
        actual = sha256_of_file(stored, path, copy_to=out)
    if actual != digest:
        store.partial_path(digest).unlink(missing_ok=True)
        raise ActionError(f"{image}: {path} in the image has {actual}, not {digest}; refusing it")
    return store.commit(digest, source=f"{image} {path}")


def _start_healthy(driver: Driver, spec: InstanceSpec, timeout: float, say: Callable[[str], None]) -> Instance:
    """Start an instance and wait for its health check; on failure it is removed and the error says
    why (with the end of its log)."""
    instance = driver.start(spec)
    audit.record("start", spec.release, "ok", revision=spec.revision, instance=instance.id, driver=driver.name)
    say(f"started {driver.name} instance {instance.id} at {instance.endpoint}; waiting for /health")
    if driver.wait_healthy(instance, timeout):
        return instance
    tail = " | ".join(line.strip() for line in driver.logs(instance, tail=5).splitlines() if line.strip())
    _retire(driver, instance)
    raise ActionError(f"revision {spec.revision} did not become healthy within {timeout:.0f} s: {tail or 'no output'}")


def _retire(driver: Driver, instance: Instance) -> None:
    try:
        driver.stop(instance, timeout=30)
    finally:
        driver.remove(instance)


def _driver_for(rev: Revision | None, opts: Options) -> Driver:
    """A release keeps its driver; a new one gets the asked-for driver or the default."""
    return get_driver(rev.driver if rev is not None and opts.driver is None else opts.driver)


def _clean_orphans(store: ReleaseStore, name: str, driver: Driver, say: Callable[[str], None]) -> None:
    """Instances of this release that no deployed revision owns (left by a killed llmctl) go."""
    deployed = store.deployed(name)
    for inst in driver.list(name):
        # an --atomic rollback revision is served by the previous revision's instance: owned by id
        owned = deployed is not None and (inst.revision == deployed.revision or inst.id == deployed.instance_id)
        if not owned:
            say(f"removing instance {inst.id} of revision {inst.revision}: no deployed revision owns it")
            _retire(driver, inst)


def _begin(store: ReleaseStore, name: str, opts: Options, driver: Driver | None) -> None:
    for note in store.recover(name):
        opts.say(f"recovered: {note}")
    if driver is not None:
        _clean_orphans(store, name, driver, opts.say)


def _latest(store: ReleaseStore, name: str) -> Revision | None:
    try:
        return store.get(name)
    except ReleaseNotFoundError:
        return None


# --- the verbs --------------------------------------------------------------------------------------


def install(name: str, chart_ref: str, opts: Options) -> Revision:
    """`llmctl install NAME CHART`."""
    store = ReleaseStore()
    with store.operation(name, "install"):
        _begin(store, name, opts, None)
        latest = _latest(store, name)
        if latest is not None and latest.status not in ("uninstalled", "failed"):
            raise ActionError(
                f"release '{name}' already exists (revision {latest.revision}, {latest.status}); "
                f"use `llmctl upgrade {name} {chart_ref}`, or pick another name"
            )
        if latest is not None and latest.status == "failed" and store.deployed(name) is not None:
            raise ActionError(f"release '{name}' has a deployed revision; use `llmctl upgrade {name} {chart_ref}`")
        revision = store.next_revision(name)
        rendered = render(chart_ref, opts, name=name, revision=revision, upgrade=False)
        if opts.dry_run:
            return _dry_run(name, revision, rendered, opts)
        driver = _driver_for(None, opts)
        return _deploy(store, name, revision, rendered, driver, opts, previous=None, verb="install")


def upgrade(name: str, chart_ref: str, opts: Options, *, install_missing: bool = False) -> Revision:
    """`llmctl upgrade NAME CHART [--install] [--reuse-values]`."""
    store = ReleaseStore()
    with store.operation(name, "upgrade"):
        _begin(store, name, opts, None)
        current = store.deployed(name)
        if current is None:
            if not install_missing:
                raise ActionError(
                    f"release '{name}' has no deployed revision; use `llmctl install` or `upgrade --install`"
                )
            revision = store.next_revision(name)
            rendered = render(chart_ref, opts, name=name, revision=revision, upgrade=False)
            if opts.dry_run:
                return _dry_run(name, revision, rendered, opts)
            driver = _driver_for(None, opts)
            return _deploy(store, name, revision, rendered, driver, opts, previous=None, verb="install")
        driver = _driver_for(current, opts)
        revision = store.next_revision(name)
        base = current.values if opts.reuse_values else None
        rendered = render(chart_ref, opts, name=name, revision=revision, upgrade=True, base=base)
        if opts.dry_run:
            return _dry_run(name, revision, rendered, opts)
        return _deploy(store, name, revision, rendered, driver, opts, previous=current, verb="upgrade")


def rollback(name: str, target: int | None, opts: Options) -> Revision:
    """`llmctl rollback NAME [REVISION]`: a new revision with an older one's chart, values and manifest."""
    store = ReleaseStore()
    with store.operation(name, "rollback"):
        _begin(store, name, opts, None)
        current = store.deployed(name)
        history = store.history(name)
        if target is None:
            older = [r for r in history if current is None or r.revision < current.revision]
            older = [r for r in older if r.status in ("superseded", "deployed")]
            if not older:
                raise ActionError(f"release '{name}' has no earlier revision to roll back to")
            target = older[-1].revision
        old = store.get(name, target)
        driver = _driver_for(current or old, opts)
        revision = store.next_revision(name)
        manifest = parse_manifest(old.manifest, f"release {name} revision {target} (stored manifest)", Path.cwd())
        meta = charts.ChartMeta(charts.API_VERSION, old.chart, old.chart_version, old.app_version)
        rendered = Rendered(
            meta,
            old.values,
            old.manifest,
            manifest,
        )
        if opts.dry_run:
            return _dry_run(name, revision, rendered, opts)
        return _deploy(
            store,
            name,
            revision,
            rendered,
            driver,
            opts,
            previous=current,
            verb="rollback",
            note=f"Rollback to {target}",
        )


def uninstall(
    name: str, *, keep_history: bool = False, driver_name: str | None = None, say: Callable[[str], None] = print
) -> str:
    """`llmctl uninstall NAME [--keep-history]`: stop and remove its instances, then its records."""
    store = ReleaseStore()
    with store.operation(name, "uninstall"):
        store.recover(name)
        latest = store.get(name)
        if latest.status == "uninstalled":
            raise ActionError(f"release '{name}' is already uninstalled; `llmctl list -a` shows it")
        store.set_status(name, latest.revision, "uninstalling", "Uninstalling")
        driver = get_driver(driver_name or latest.driver)
        for inst in driver.list(name):
            say(f"stopping {driver.name} instance {inst.id} (revision {inst.revision})")
            _retire(driver, inst)
        if keep_history:
            for rev in store.history(name):
                if rev.status == "deployed":
                    store.set_status(name, rev.revision, "superseded")
            store.set_status(name, latest.revision, "uninstalled", "Uninstallation complete")
        else:
            store.delete(name)
        audit.record("uninstall", name, "ok", keep_history=keep_history)
    return f'release "{name}" uninstalled'


def _dry_run(name: str, revision: int, rendered: Rendered, opts: Options) -> Revision:
    opts.say("dry run: nothing was built, started or recorded")
    return _record(name, revision, rendered, "pending-install", "Dry run", image_digest="", driver="process")


def _record(
    name: str, revision: int, rendered: Rendered, status: str, description: str, *, image_digest: str, driver: str
) -> Revision:
    meta = rendered.chart
    return Revision(
        name=name,
        revision=revision,
        status=status,
        chart=meta.name,
        chart_version=meta.version,
        app_version=meta.app_version,
        values=rendered.values,
        manifest=rendered.manifest_text,
        image=rendered.manifest.image or rendered.manifest.tag,
        image_digest=image_digest,
        driver=driver,
        description=description,
    )


def _deploy(
    store: ReleaseStore,
    name: str,
    revision: int,
    rendered: Rendered,
    driver: Driver,
    opts: Options,
    *,
    previous: Revision | None,
    verb: str,
    note: str | None = None,
) -> Revision:
    """Check the driver can run it, remove orphaned instances, record the revision as pending, make
    and verify the image, start it beside the previous one, wait for health, then retire the
    previous revision. On failure the new revision is `failed`,
    its instance is gone and the previous one still serves; `--atomic` also removes a failed
    install and records a rollback revision for a failed upgrade."""
    if opts.replicas not in (None, 1) and driver.name not in ("swarm", "kubernetes"):
        raise ActionError(
            f"--replicas needs --driver swarm or kubernetes: the {driver.name} driver runs one instance per revision"
        )
    if driver.name == "kubernetes" and not rendered.manifest.image:
        raise ActionError(
            f"the kubernetes driver runs images the cluster pulls from a registry, and {rendered.manifest.name} names "
            "none: build and push the image (`llmctl build`, `llmctl push IMAGE REGISTRY/REPO:TAG`), then "
            "install with --set image=REGISTRY/REPO:TAG"
        )
    _clean_orphans(store, name, driver, opts.say)
    pending = {"install": "pending-install", "upgrade": "pending-upgrade", "rollback": "pending-rollback"}[verb]
    rev = _record(
        name, revision, rendered, pending, f"{verb.capitalize()} in progress", image_digest="", driver=driver.name
    )
    store.add(rev)
    try:
        image, digest = ensure_image(rendered.manifest, opts)
        store.set_status(name, revision, pending, image_digest=digest)
        spec = dataclasses.replace(
            instance_spec(name, revision, rendered.manifest, image, digest, driver), replicas=opts.replicas
        )
        old_instances = driver.list(name)
        host_port = driver.name in ("docker", "process")  # one host port per instance (swarm and k8s: one service)
        if (
            previous is not None
            and host_port
            and spec.port
            and any(i.endpoint.endswith(f":{spec.port}") for i in old_instances)
        ):
            # a fixed port cannot serve two revisions at once: the old one steps aside first
            opts.say(f"port {spec.port} is fixed: stopping revision {previous.revision} first")
            for inst in old_instances:
                _retire(driver, inst)
            old_instances = []
        instance = _start_healthy(driver, spec, opts.timeout, opts.say)
    except (LlmctlError, Exception) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        store.set_status(name, revision, "failed", f"{verb.capitalize()} failed: {message}")
        audit.record(verb, name, "failed", revision=revision, chart=rev.chart, reason=message)
        if opts.atomic:
            _atomic_undo(store, name, revision, previous, driver, opts)
        if isinstance(e, LlmctlError):
            raise
        raise ActionError(f"{verb} of release '{name}' failed: {message}") from e
    for inst in old_instances:
        if inst.revision != revision:
            _retire(driver, inst)
    if previous is not None:
        store.set_status(name, previous.revision, "superseded", previous.description)
    description = (
        note or {"install": "Install complete", "upgrade": "Upgrade complete", "rollback": "Rollback complete"}[verb]
    )
    store.set_status(name, revision, "deployed", description, endpoint=instance.endpoint, instance_id=instance.id)
    audit.record(
        verb,
        name,
        "ok",
        revision=revision,
        chart=f"{rev.chart}-{rev.chart_version}",
        image=image,
        digest=digest,
        driver=driver.name,
        endpoint=instance.endpoint,
    )
    store.prune(name, opts.history_max)
    return store.get(name, revision)


def _atomic_undo(
    store: ReleaseStore, name: str, failed: int, previous: Revision | None, driver: Driver, opts: Options
) -> None:
    if previous is None:  # a failed atomic install leaves no release behind
        for inst in driver.list(name):
            _retire(driver, inst)
        store.delete(name)
        audit.record("rollback", name, "ok", atomic=True, removed=True)
        opts.say(f"--atomic: install failed, release '{name}' removed")
        return
    # the previous revision never stopped serving: record the rollback to it as a new revision
    back = store.next_revision(name)
    store.add(
        Revision(
            **{
                **previous.__dict__,
                "revision": back,
                "status": "deployed",
                "description": f"Rollback to {previous.revision} (--atomic: revision {failed} failed)",
                "created": utc_now(),
                "updated": utc_now(),
            }
        )
    )
    store.set_status(name, previous.revision, "superseded", previous.description)
    audit.record("rollback", name, "ok", atomic=True, revision=back, to=previous.revision)
    opts.say(f"--atomic: upgrade failed, rolled back to revision {previous.revision} as revision {back}")


# --- reading ----------------------------------------------------------------------------------------


def status(name: str) -> dict[str, Any]:
    """`llmctl status NAME`: the latest revision and its instance as the driver sees it now."""
    store = ReleaseStore()
    rev = store.get(name)
    out: dict[str, Any] = {k: v for k, v in rev.to_json().items() if k not in ("manifest", "values")}
    out["instance"] = None
    if rev.status == "deployed":
        try:
            driver = get_driver(rev.driver)
            found = [i for i in driver.list(name) if i.revision == rev.revision]
            if found:
                inst = found[0]
                inst.health = driver.health(inst)
                out["instance"] = inst.to_json()
        except LlmctlError as e:
            out["instance"] = {"error": str(e)}
    return out


def instances(driver_name: str | None = None) -> list[Instance]:
    """`llmctl ps`: every instance of every driver that answers."""
    found: list[Instance] = []
    names = [driver_name] if driver_name else ["docker", "swarm", "kubernetes", "process"]
    for n in names:
        try:
            driver = get_driver(n)
            listed = driver.list()
        except LlmctlError:
            if driver_name:
                raise
            continue  # not set up here (no engine, no swarm, no kubeconfig) or not answering
        for inst in listed:
            inst.health = driver.health(inst)
            found.append(inst)
    return found


def values_json(rev: Revision) -> str:
    return json.dumps(rev.values, indent=2)

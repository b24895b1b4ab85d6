"""`kind: Stack`: releases declared in a file (kept in Git) and brought to that state by `llmctl apply`.

A stack file lists releases (name, chart, version, values, values files, driver). `plan` compares
each one with the release store and the running instances and says, without changing anything,
what `apply` would do: `install` (no deployed revision), `upgrade` (chart, values, image or driver
differ), `repair` (deployed as declared, but its instance is missing, exited, unhealthy, serves other
weights, or an orphan instance is left beside it), `none`; with `prune`, `uninstall` for releases
this stack applied earlier that are no longer in the file. `apply` carries the plan out through
`manager.actions`, in file order, and stops at the first failure. `drift` reports, for any release,
how its instances differ from its record.

Ownership: a stack only ever prunes releases it applied itself. `data_dir()/stacks/NAME.json` lists,
per release, the revision the stack last applied or adopted and that revision's creation time; a
release whose recorded revision is gone, was recreated, or was uninstalled since, is no longer the
stack's (a human reinstalled it by hand) and is never pruned. See docs/gitops.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from manager import actions, audit, build, paths
from manager.drivers import Driver, Instance, get_driver
from manager.errors import LlmctlError
from manager.manifest import ModelManifest, parse_manifest
from manager.model_image import BUILD_INPUTS_LABEL, WEIGHTS_DIGEST_LABEL
from manager.releases import ReleaseNotFoundError, ReleaseStore, Revision, utc_now
from manager.yamlschema import format_path, parse_file

API_VERSION = "llmctl.dev/v1"
DOCS_HINT = "see docs/gitops.md for the stack format"
RELEASE_NAME = r"^[a-z0-9]([a-z0-9-]{0,51}[a-z0-9])?$"  # as releases.validate_name
STACK_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # also a file name under data_dir()/stacks
ACTIONS = ("install", "upgrade", "repair", "uninstall", "none")
REPLICATED = ("swarm", "kubernetes")  # the drivers that run a release as N replicas
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")

STACK_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://llmctl.dev/schemas/stack-v1.json",
    "title": "llmctl Stack",
    "description": "Releases that `llmctl apply -f FILE` installs, upgrades, repairs and (with --prune) removes.",
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "releases"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": API_VERSION},
        "kind": {"const": "Stack"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {
                "name": {
                    "type": "string",
                    "pattern": STACK_NAME,
                    "description": "who owns the releases: apply --prune only removes releases applied under this name",
                },
                "description": {"type": "string"},
            },
        },
        "releases": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "chart"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": RELEASE_NAME, "description": "release name"},
                    "chart": {
                        "type": "string",
                        "minLength": 1,
                        "description": "NAME, REPO/NAME, oci://..., or a chart path relative to the stack file",
                    },
                    "version": {"type": "string", "minLength": 1, "description": "exact chart version"},
                    "values": {"type": "object", "description": "inline values, applied after valuesFiles"},
                    "valuesFiles": {
                        "type": "array",
                        "items": {"type": "string", "minLength": 1},
                        "description": "values files relative to the stack file, in order (later wins)",
                    },
                    "driver": {
                        "enum": ["docker", "process", "swarm", "kubernetes"],
                        "description": "default: a new release gets llmctl's default, an existing one keeps its driver",
                    },
                    "replicas": {
                        "type": "integer",
                        "minimum": 1,
                        "description": "swarm and kubernetes (driver must say which): tasks or pods; "
                        "default: a new release gets 1, an existing one keeps its count",
                    },
                },
            },
        },
    },
}


# -- errors ------------------------------------------------------------------------------------------


class StackError(LlmctlError):
    """A stack file that cannot be read or planned, or a stack operation that cannot go ahead."""


class StackApplyError(StackError):
    """`apply` stopped at a release that failed; the releases before it were applied (`done`)."""

    def __init__(self, message: str, *, done: list[Change], failed: Change, remaining: list[Change]) -> None:
        super().__init__(message)
        self.done = done
        self.failed = failed
        self.remaining = remaining


# -- the file ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StackRelease:
    """One release as the stack file declares it."""

    name: str
    chart: str  # as written in the file
    chart_ref: str  # what install gets: a path made absolute against the stack file, else as written
    version: str | None
    values: dict[str, Any]
    values_files: tuple[Path, ...]  # absolute
    driver: str | None
    replicas: int | None  # swarm and kubernetes only
    line: int  # of its `- name:` entry in the file


@dataclass(frozen=True)
class Stack:
    name: str  # metadata.name: the owner recorded for the releases it applies
    source: str  # the file as named on the command line (errors say source:line)
    path: Path
    releases: tuple[StackRelease, ...]

    def where(self, release: StackRelease) -> str:
        return f"{self.source}:{release.line}"

    def release(self, name: str) -> StackRelease:
        return next(r for r in self.releases if r.name == name)


def load_stack(path: Path) -> Stack:
    """Read and validate a stack file; `StackError` says file:line: field path (schema, duplicate
    names, missing values files or chart paths)."""
    doc = parse_file(path, STACK_SCHEMA, what="stack", error=StackError, docs_hint=DOCS_HINT)
    if doc.data.get("kind") != "Stack":  # the schema's const says so too; keep the message short
        raise doc.error(("kind",), "expected Stack")
    base = path.resolve().parent
    seen: dict[str, int] = {}
    releases = []
    for i, item in enumerate(doc.data["releases"]):
        name = item["name"]
        if name in seen:
            raise doc.error(("releases", i, "name"), f"release {name!r} is listed twice (first at line {seen[name]})")
        seen[name] = doc.line(("releases", i, "name"))
        files = []
        for j, file in enumerate(item.get("valuesFiles", [])):
            resolved = (base / Path(file).expanduser()).resolve()
            if not resolved.is_file():
                raise doc.error(
                    ("releases", i, "valuesFiles", j), f"{file}: no such file (paths are relative to the stack file)"
                )
            files.append(resolved)
        if "replicas" in item and item.get("driver") not in REPLICATED:
            raise doc.error(
                ("releases", i, "replicas"),
                "replicas needs `driver: swarm` or `driver: kubernetes` (the other drivers run one instance)",
            )
        chart_ref = _chart_ref(item["chart"], base)
        if chart_ref is None:
            raise doc.error(
                ("releases", i, "chart"),
                f"{item['chart']}: no such chart directory or archive (paths are relative to the stack file)",
            )
        releases.append(
            StackRelease(
                name=name,
                chart=item["chart"],
                chart_ref=chart_ref,
                version=item.get("version"),
                values=item.get("values", {}),
                values_files=tuple(files),
                driver=item.get("driver"),
                replicas=item.get("replicas"),
                line=doc.line(("releases", i)),
            )
        )
    return Stack(doc.data["metadata"]["name"], str(path), path.resolve(), tuple(releases))


def _chart_ref(ref: str, base: Path) -> str | None:
    """A chart path is relative to the stack file (a directory there wins over a chart name); names,
    REPO/NAME and oci:// references go to install as written. None: a path that does not exist."""
    if ref.startswith("oci://"):
        return ref
    local = base / Path(ref).expanduser()
    if local.exists():
        return str(local.resolve())
    if ref.startswith((".", "/", "~")) or ref.endswith((".tgz", ".tar.gz")):
        return None
    return ref


def schema_json() -> str:
    """The published JSON Schema of a stack file."""
    return json.dumps(STACK_SCHEMA, indent=2) + "\n"


# -- what a plan says ----------------------------------------------------------------------------------


class _Unset:
    """A key that is not there (an added or removed value)."""

    def __repr__(self) -> str:
        return "(unset)"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Difference:
    """One reason for an upgrade: `path` went from `old` to `new` (`UNSET` when absent)."""

    kind: str  # chart | values | driver | image | manifest | replicas
    path: str  # server.parallel for values; "chart", "driver", "image", "image inputs", "manifest spec.x", "replicas"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.path} {_show(self.old)} -> {_show(self.new)}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "path": self.path}
        if self.old is not UNSET:
            out["old"] = self.old
        if self.new is not UNSET:
            out["new"] = self.new
        return out


def _show(value: Any, limit: int = 60) -> str:
    if value is UNSET:
        return "(unset)"
    if isinstance(value, str) and _DIGEST.fullmatch(value):
        return value[:19]  # sha256: and 12 hex digits, as `docker images` shows
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Drift:
    """How a release's instances differ from its record."""

    release: str
    revision: int | None  # the deployed revision (an orphan: its own revision)
    driver: str
    kind: str  # missing | exited | restarting | unhealthy | model | image | instance | orphan | unreachable
    detail: str  # a phrase: "instance exited", "orphan instance of revision 2 (running)", ...
    instance: str | None = None  # the instance id, when there is one

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Change:
    """What apply does (or did) to one release."""

    action: str  # one of ACTIONS
    release: str
    chart: str  # chart name (an uninstall: the installed one)
    version: str
    source: str = ""  # stack.yaml:LINE of the release's entry ("" for an uninstall)
    driver: str | None = None  # asked for in the file
    differences: list[Difference] = field(default_factory=list)
    drift: list[Drift] = field(default_factory=list)
    previous_owner: str | None = None  # another stack's release that this one takes over
    revision: int | None = None  # after apply: the release's deployed revision
    endpoint: str | None = None  # after apply

    @property
    def changed(self) -> bool:
        return self.action != "none"

    def describe(self) -> str:
        """One line: `+ install sc2 (demo 1.0.0)`, `~ upgrade sc2: server.parallel 2 -> 4`, ..."""
        if self.action == "install":
            text = f"+ install {self.release} ({self.chart} {self.version})"
        elif self.action == "upgrade":
            text = f"~ upgrade {self.release}: " + ", ".join(str(d) for d in self.differences)
            if self.drift:
                text += " (also repairs: " + "; ".join(d.detail for d in self.drift) + ")"
        elif self.action == "repair":
            text = f"! repair {self.release}: " + "; ".join(d.detail for d in self.drift)
        elif self.action == "uninstall":
            text = f"- uninstall {self.release}"
        else:
            text = f"= {self.release} unchanged"
        if self.previous_owner:
            text += f" [taken over from stack '{self.previous_owner}']"
        return text

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "release": self.release,
            "chart": self.chart,
            "version": self.version,
            "source": self.source,
            "driver": self.driver,
            "differences": [d.to_json() for d in self.differences],
            "drift": [d.to_json() for d in self.drift],
            "previousOwner": self.previous_owner,
            "revision": self.revision,
            "endpoint": self.endpoint,
        }


def summary(changes: Sequence[Change]) -> dict[str, int]:
    """How many changes of each action."""
    return {a: sum(c.action == a for c in changes) for a in ACTIONS}


# -- ownership -------------------------------------------------------------------------------------------


def ownership_path(stack_name: str) -> Path:
    """`data_dir()/stacks/NAME.json`: the releases stack NAME applied."""
    return paths.data_dir() / "stacks" / f"{stack_name}.json"


def _read_ownership(stack_name: str) -> tuple[str, dict[str, dict[str, Any]]]:
    """(the stack file it was last applied from, release -> {revision, created})."""
    path = ownership_path(stack_name)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return "", {}
    except (OSError, ValueError) as e:
        raise StackError(f"{path}: cannot read the releases stack '{stack_name}' applied: {e}") from None
    releases = data.get("releases") if isinstance(data, dict) else None
    if not isinstance(releases, dict):
        raise StackError(f"{path}: not a stack ownership file (no 'releases' object)")
    return str(data.get("file", "")), releases


def _write_ownership(stack_name: str, file: str, releases: dict[str, dict[str, Any]]) -> None:
    """Replace the ownership file atomically (readers see the old or the new one, never a part)."""
    path = ownership_path(stack_name)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    doc = {"stack": stack_name, "file": file, "updated": utc_now(), "releases": releases}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _stack_names() -> list[str]:
    directory = paths.data_dir() / "stacks"
    if not directory.is_dir():
        return []
    return [p.stem for p in sorted(directory.glob("*.json")) if not p.name.startswith(".")]


def _still_owned(store: ReleaseStore, name: str, entry: dict[str, Any]) -> bool:
    """The recorded revision still exists, is the one the stack saw (same creation time), and the
    release has not been uninstalled since: otherwise someone recreated it by hand."""
    try:
        rev = store.get(name, int(entry.get("revision", 0)))
        history = store.history(name)
    except (ReleaseNotFoundError, ValueError, TypeError):
        return False
    if rev.created != entry.get("created"):
        return False
    return not any(r.status == "uninstalled" for r in history if r.revision >= rev.revision)


def owned(stack_name: str) -> list[str]:
    """The releases stack `stack_name` applied and still owns (see `_still_owned`), by name."""
    store = ReleaseStore()
    return sorted(n for n, e in _read_ownership(stack_name)[1].items() if _still_owned(store, n, e))


def _owners(store: ReleaseStore) -> dict[str, str]:
    """release -> the stack that owns it, over every ownership file."""
    out: dict[str, str] = {}
    for stack_name in _stack_names():
        for name, entry in _read_ownership(stack_name)[1].items():
            if _still_owned(store, name, entry):
                out[name] = stack_name
    return out


def _record_owner(stack: Stack, store: ReleaseStore, name: str) -> None:
    """Note that `stack` owns `name` as of its latest revision, and that no other stack does."""
    try:
        latest = store.get(name)
    except ReleaseNotFoundError:
        return
    _, mine = _read_ownership(stack.name)
    mine[name] = {"revision": latest.revision, "created": latest.created}
    _write_ownership(stack.name, str(stack.path), mine)
    for other in _stack_names():
        if other != stack.name:
            file, theirs = _read_ownership(other)
            if theirs.pop(name, None) is not None:
                _write_ownership(other, file, theirs)


def _forget_owner(stack: Stack, name: str) -> None:
    _, mine = _read_ownership(stack.name)
    if mine.pop(name, None) is not None:
        _write_ownership(stack.name, str(stack.path), mine)


def unlisted(stack: Stack) -> list[str]:
    """Releases this stack applied that are no longer in its file (what `--prune` would uninstall)."""
    store = ReleaseStore()
    listed = {r.name for r in stack.releases}
    return [n for n in owned(stack.name) if n not in listed and _latest(store, n) is not None]


@contextlib.contextmanager
def _stack_lock(stack_name: str) -> Iterator[None]:
    """One apply of a stack at a time (releases have their own locks; this guards the ownership file)."""
    path = ownership_path(stack_name).with_suffix(".lock")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackError(
                f"stack '{stack_name}' is being applied by another llmctl; wait for it to finish"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- drift ------------------------------------------------------------------------------------------------


class _Drivers:
    """Drivers by name, connected once; an unavailable one is remembered with its error."""

    def __init__(self) -> None:
        self._found: dict[str, Driver | LlmctlError] = {}

    def get(self, name: str) -> Driver:
        if name not in self._found:
            try:
                self._found[name] = get_driver(name)
            except LlmctlError as e:
                self._found[name] = e
        found = self._found[name]
        if isinstance(found, LlmctlError):
            raise found
        return found


def _image_config(digest: str) -> tuple[str, dict[str, str]] | None:
    """(config digest = Docker's image ID, config labels) of the image with manifest `digest` in the
    local store, read from its blobs (the tag may name another image by now); None when the store no
    longer has it."""
    if not _DIGEST.fullmatch(digest or ""):
        return None
    from manager import images

    blobs = images.layout_dir() / "blobs" / "sha256"
    try:
        manifest = json.loads((blobs / digest.removeprefix("sha256:")).read_bytes())
        config_digest = str(manifest["config"]["digest"])
        if not _DIGEST.fullmatch(config_digest):
            return None
        config = json.loads((blobs / config_digest.removeprefix("sha256:")).read_bytes())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    labels = (config.get("config") or {}).get("Labels") if isinstance(config, dict) else None
    return config_digest, dict(labels) if isinstance(labels, dict) else {}


def image_labels(digest: str) -> dict[str, str] | None:
    """The config labels of the image with manifest `digest` in the local store (None: not there)."""
    found = _image_config(digest)
    return None if found is None else found[1]


def _runs_verified_image(rev: Revision, inst: Instance) -> bool | None:
    """Whether `inst` runs the image the revision verified: a container or swarm task its config
    digest (the image ID), a Kubernetes pod its manifest digest (`repository@digest`). None when it
    cannot be told (a process, or the image left the local store)."""
    if not inst.image or not rev.image_digest:
        return None
    if inst.driver == "kubernetes":
        return inst.image.endswith("@" + rev.image_digest)
    found = _image_config(rev.image_digest)
    return None if found is None else inst.image == found[0]


def _expected_weights(rev: Revision) -> str | None:
    """The weights digest the deployed revision's instance must serve: its image's label; without the
    image, the manifest's pinned file unless the weights are derived from it."""
    labels = image_labels(rev.image_digest)
    if labels and labels.get(WEIGHTS_DIGEST_LABEL):
        return labels[WEIGHTS_DIGEST_LABEL]
    manifest = _stored_manifest(rev)
    if manifest is not None and not manifest.requantize:
        return manifest.weights_sha256
    return None


def _stored_manifest(rev: Revision) -> ModelManifest | None:
    try:
        return parse_manifest(rev.manifest, f"release {rev.name} revision {rev.revision} (stored)", Path.cwd())
    except LlmctlError:
        return None


def _instances(store: ReleaseStore, name: str, drivers: _Drivers) -> tuple[list[Instance], list[Drift]]:
    """Every instance of `name` on the drivers its revisions used; an unreachable driver is a drift
    of the deployed revision when it is that revision's driver."""
    history = store.history(name)
    deployed = store.deployed(name)
    found: list[Instance] = []
    problems: list[Drift] = []
    for driver_name in sorted({r.driver for r in history}):
        try:
            found += drivers.get(driver_name).list(name)
        except LlmctlError as e:
            if deployed is not None and deployed.driver == driver_name:
                detail = f"driver {driver_name} unavailable: {' '.join(str(e).split())}"
                problems.append(Drift(name, deployed.revision, driver_name, "unreachable", detail))
    return found, problems


def release_drift(
    name: str,
    *,
    store: ReleaseStore | None = None,
    drivers: _Drivers | None = None,
    listed: tuple[list[Instance], list[Drift]] | None = None,
) -> list[Drift]:
    """How release `name`'s instances differ from its record (empty: none). `listed`: what
    `_instances` returned for it already (the drivers are then not asked again)."""
    store = store or ReleaseStore()
    drivers = drivers or _Drivers()
    deployed = store.deployed(name)
    found, problems = listed if listed is not None else _instances(store, name, drivers)
    out = list(problems)
    if deployed is not None and not out:
        mine = [i for i in found if _serves(deployed, i)]
        if not mine:
            detail = f"instance missing (revision {deployed.revision} has no {deployed.driver} instance)"
            out.append(Drift(name, deployed.revision, deployed.driver, "missing", detail))
        for inst in mine[:1]:
            out += _instance_drift(deployed, inst)
    for inst in found:
        if deployed is None or not _serves(deployed, inst):
            why = "no deployed revision" if deployed is None else f"deployed is revision {deployed.revision}"
            detail = f"orphan instance of revision {inst.revision} ({inst.state}; {why})"
            out.append(Drift(name, inst.revision, inst.driver, "orphan", detail, inst.id))
    return out


def _serves(rev: Revision, inst: Instance) -> bool:
    """`inst` is the deployed revision's instance: its own, or the one it recorded (an --atomic
    rollback revision keeps serving from the previous revision's instance)."""
    return inst.driver == rev.driver and (inst.revision == rev.revision or inst.id == rev.instance_id)


def _instance_drift(rev: Revision, inst: Instance) -> list[Drift]:
    out: list[Drift] = []

    def add(kind: str, detail: str) -> None:
        out.append(Drift(rev.name, rev.revision, inst.driver, kind, detail, inst.id))

    if inst.state == "exited":
        add("exited", "instance exited")
    elif inst.state == "restarting":
        add("restarting", "instance restarting (its server crashed)")
    elif inst.state == "running" and inst.health == "unhealthy":
        add("unhealthy", "instance unhealthy (GET /health does not answer 200)")
    expected = _expected_weights(rev)
    if expected and inst.model_digest != expected:
        add("model", f"model digest {_show(inst.model_digest or UNSET)} (the release's image serves {_show(expected)})")
    if _runs_verified_image(rev, inst) is False:
        add("image", f"image {_show(inst.image)} (the release verified {_show(rev.image_digest)})")
    if rev.instance_id and inst.id != rev.instance_id:
        add("instance", f"instance {inst.id[:12]} is not the one llmctl started ({rev.instance_id[:12]})")
    return out


def drift(names: Sequence[str] | None = None) -> list[Drift]:
    """`llmctl drift [NAME...]`: drift of every release in the store (or of those named, which must
    exist), plus process-driver instances of releases the store does not know (orphans). Docker
    containers of unknown releases are not reported: the engine may be shared with another home."""
    store = ReleaseStore()
    drivers = _Drivers()
    if names:
        for n in names:
            store.get(n)  # ReleaseNotFoundError names it
        known = list(dict.fromkeys(names))
    else:
        known = [r.name for r in store.list(all=True)]
    out: list[Drift] = []
    for name in known:
        out += release_drift(name, store=store, drivers=drivers)
    if not names:
        try:
            strays = [i for i in drivers.get("process").list() if i.release not in set(known)]
        except LlmctlError:
            strays = []
        for inst in strays:
            detail = f"orphan instance of revision {inst.revision} ({inst.state}; the release has no record)"
            out.append(Drift(inst.release, inst.revision, inst.driver, "orphan", detail, inst.id))
    return out


# -- plan ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _values_layers(release: StackRelease) -> Iterator[tuple[Path, ...]]:
    """The -f files for a release: its valuesFiles, then its inline values written to a private
    temporary file (the last -f, so they win), removed afterwards."""
    if not release.values:
        yield release.values_files
        return
    with tempfile.TemporaryDirectory(prefix="llmctl-stack-") as tmp:  # mode 0700: values may hold secrets
        inline = Path(tmp) / f"{release.name}.values.yaml"
        inline.write_text(yaml.safe_dump(release.values, sort_keys=False))
        yield (*release.values_files, inline)


def _options(release: StackRelease, files: tuple[Path, ...], opts: actions.Options) -> actions.Options:
    return dataclasses.replace(
        opts,
        values_files=files,
        sets=(),
        set_strings=(),
        version=release.version,
        driver=release.driver,
        replicas=release.replicas,
        reuse_values=False,
        dry_run=False,
    )


def _diff_tree(old: Any, new: Any, path: tuple[str | int, ...] = ()) -> list[Difference]:
    """Leaf-level differences of two JSON-like trees; lists compare whole. `true` and `1` differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[Difference] = []
        for key in [*old, *(k for k in new if k not in old)]:
            out += _diff_tree(old.get(key, UNSET), new.get(key, UNSET), (*path, key))
        return out
    same = old is not UNSET and new is not UNSET and json.dumps(old, sort_keys=True) == json.dumps(new, sort_keys=True)
    return [] if same else [Difference("values", format_path(path), old, new)]


def _image_differences(deployed: Revision, desired: ModelManifest) -> list[Difference]:
    """The image the upgrade would run against the deployed one. A registry image (spec.image) is
    not resolved here: a changed reference shows in the values and manifest."""
    if desired.image:
        return []
    new_inputs = build.inputs_digest(desired)
    old = _stored_manifest(deployed)
    if old is not None and not old.image:
        old_inputs = build.inputs_digest(old)
        if old_inputs != new_inputs:
            return [Difference("image", "image inputs", old_inputs, new_inputs)]
    built = build.find_built(desired)
    if built == deployed.image_digest:
        return []
    labels = image_labels(deployed.image_digest)
    if labels and labels.get(BUILD_INPUTS_LABEL) == new_inputs:
        return []  # the running image is exactly what would be built (the tag names another one now)
    return [Difference("image", "image", deployed.image_digest, built or "(rebuilt: llmctl's runtime or base changed)")]


def _manifest_differences(deployed: Revision, rendered: actions.Rendered) -> list[Difference]:
    """What changed in the rendered manifest when neither chart nor values did (a chart edited in place)."""
    try:
        old = yaml.safe_load(deployed.manifest)
    except yaml.YAMLError:
        old = None
    new = yaml.safe_load(rendered.manifest_text)
    return [
        Difference("manifest", f"manifest {d.path}", d.old, d.new)
        for d in _diff_tree(old if isinstance(old, dict) else {}, new)
    ]


def _replica_differences(release: StackRelease, deployed: Revision, found: list[Instance]) -> list[Difference]:
    """The declared replica count against the one the deployed revision's service or Deployment has
    (an unreachable driver or a missing instance shows as drift instead)."""
    if release.replicas is None:
        return []
    current = next((i.replicas for i in found if _serves(deployed, i)), None)
    if current is None or current == release.replicas:
        return []
    return [Difference("replicas", "replicas", current, release.replicas)]


def _plan_release(
    stack: Stack,
    release: StackRelease,
    store: ReleaseStore,
    drivers: _Drivers,
    owners: dict[str, str],
    base: actions.Options,
) -> Change:
    deployed = store.deployed(release.name)
    revision = store.next_revision(release.name)
    try:
        with _values_layers(release) as files:
            opts = _options(release, files, base)
            rendered = actions.render(
                release.chart_ref, opts, name=release.name, revision=revision, upgrade=deployed is not None
            )
    except LlmctlError as e:
        raise StackError(f"{stack.where(release)}: release '{release.name}': {' '.join(str(e).split())}") from e
    meta = rendered.chart
    owner = owners.get(release.name)
    change = Change(
        action="install",
        release=release.name,
        chart=meta.name,
        version=meta.version,
        source=stack.where(release),
        driver=release.driver,
        previous_owner=owner if owner not in (None, stack.name) else None,
    )
    if deployed is None:
        return change
    change.revision, change.endpoint = deployed.revision, deployed.endpoint
    diffs: list[Difference] = []
    if (deployed.chart, deployed.chart_version) != (meta.name, meta.version):
        diffs.append(
            Difference("chart", "chart", f"{deployed.chart} {deployed.chart_version}", f"{meta.name} {meta.version}")
        )
    diffs += _diff_tree(deployed.values, rendered.values)
    if not diffs:
        diffs += _manifest_differences(deployed, rendered)
    if release.driver and release.driver != deployed.driver:
        diffs.append(Difference("driver", "driver", deployed.driver, release.driver))
    diffs += _image_differences(deployed, rendered.manifest)
    listed = _instances(store, release.name, drivers)  # asked once, for replicas and drift
    diffs += _replica_differences(release, deployed, listed[0])
    change.differences = diffs
    change.drift = release_drift(release.name, store=store, drivers=drivers, listed=listed)
    change.action = "upgrade" if diffs else "repair" if change.drift else "none"
    return change


def _latest(store: ReleaseStore, name: str) -> Revision | None:
    try:
        return store.get(name)
    except ReleaseNotFoundError:
        return None


def plan(stack: Stack, *, prune: bool, connection: Any = None) -> list[Change]:
    """What `apply` would do, release by release in file order, then (with `prune`) the uninstalls
    in name order. Changes nothing. `StackError` names the release and file:line when a chart
    cannot be resolved or rendered with its values. `connection`: how to reach registries, for
    `oci://` charts (manager.transfer.Connection; None: the defaults)."""
    store = ReleaseStore()
    drivers = _Drivers()
    owners = _owners(store)
    base = actions.Options(progress=False, connection=connection)
    changes = [_plan_release(stack, r, store, drivers, owners, base) for r in stack.releases]
    if prune:
        for name in unlisted(stack):
            latest = _latest(store, name)
            if latest is not None and latest.status != "uninstalled":
                changes.append(Change("uninstall", name, latest.chart, latest.chart_version, driver=latest.driver))
    return changes


# -- apply -----------------------------------------------------------------------------------------------


def apply(stack: Stack, *, prune: bool, dry_run: bool, opts: actions.Options) -> list[Change]:
    """Bring the releases to what the stack declares (see `plan`); returns the plan with each
    change's resulting revision and endpoint. Every release is planned (charts resolved, values
    validated, manifests rendered) before anything changes; then the changes run in order and the
    first failure raises `StackApplyError` naming the release: the ones before it stay applied, the
    ones after it are not attempted. `dry_run`: the plan only."""
    if dry_run:
        return plan(stack, prune=prune, connection=opts.connection)
    with _stack_lock(stack.name):
        store = ReleaseStore()
        changes = plan(stack, prune=prune, connection=opts.connection)
        done: list[Change] = []
        for i, change in enumerate(changes):
            if change.changed:
                opts.say(f"stack {stack.name}: {change.describe()[2:]}")
            try:
                _execute(stack, change, store, opts)
            except LlmctlError as e:
                if change.action != "uninstall":
                    _record_owner(stack, store, change.release)  # a failed install is the stack's to clean up
                _audit_apply(stack, done, "failed", failed=change.release)
                raise _apply_error(stack, change, e, done, changes[i + 1 :]) from e
            if change.action == "uninstall":
                _forget_owner(stack, change.release)
            else:
                _record_owner(stack, store, change.release)
            done.append(change)
        if any(c.changed for c in changes):
            _audit_apply(stack, done, "ok")
        return changes


def _execute(stack: Stack, change: Change, store: ReleaseStore, opts: actions.Options) -> None:
    if change.action == "uninstall":
        actions.uninstall(change.release, say=opts.say)
        change.revision = change.endpoint = None
        return
    if change.action == "none":
        return
    release = stack.release(change.release)
    if change.action == "repair" and all(d.kind == "orphan" for d in change.drift):
        _remove_orphans(change.release, store, opts.say)
        return
    with _values_layers(release) as files:
        release_opts = _options(release, files, opts)
        if change.action == "install":
            rev = actions.install(change.release, release.chart_ref, release_opts)
        elif change.action == "upgrade":
            before = store.deployed(change.release)
            rev = actions.upgrade(change.release, release.chart_ref, release_opts)
            if before is not None and rev.driver != before.driver:
                _remove_old_driver_instances(change.release, before.driver, store, opts.say)
        else:  # repair: the same chart (at the deployed version) and the stored values, as a new revision
            deployed = store.deployed(change.release)
            version = deployed.chart_version if deployed is not None else release.version
            repair_opts = dataclasses.replace(
                release_opts, values_files=(), reuse_values=True, version=version, driver=None
            )
            rev = actions.upgrade(change.release, release.chart_ref, repair_opts)
    change.revision, change.endpoint = rev.revision, rev.endpoint


def _retire(driver: Driver, inst: Instance, say: Callable[[str], None], why: str) -> None:
    say(f"removing {driver.name} instance {inst.id} of {inst.release} revision {inst.revision}: {why}")
    try:
        driver.stop(inst, timeout=30)
    finally:
        driver.remove(inst)
    audit.record("stop", inst.release, "ok", revision=inst.revision, instance=inst.id, driver=driver.name, reason=why)


def _remove_orphans(name: str, store: ReleaseStore, say: Callable[[str], None]) -> None:
    """Repair of a release whose only drift is orphan instances: they go, the deployed one keeps serving."""
    with store.operation(name, "upgrade"):
        for note in store.recover(name):
            say(f"recovered: {note}")
        deployed = store.deployed(name)
        drivers = _Drivers()
        for inst in _instances(store, name, drivers)[0]:
            if deployed is None or not _serves(deployed, inst):
                _retire(drivers.get(inst.driver), inst, say, "no deployed revision owns it")


def _remove_old_driver_instances(name: str, old_driver: str, store: ReleaseStore, say: Callable[[str], None]) -> None:
    """After an upgrade moved a release to another driver, its instances on the old one go."""
    with store.operation(name, "upgrade"):
        driver = get_driver(old_driver)
        for inst in driver.list(name):
            _retire(driver, inst, say, "the release moved to another driver")


def _apply_error(stack: Stack, change: Change, e: Exception, done: list[Change], rest: list[Change]) -> StackApplyError:
    where = f" ({change.source})" if change.source else ""
    message = (
        f"stack '{stack.name}': {change.action} of release '{change.release}'{where} failed: {' '.join(str(e).split())}"
    )
    applied = [c for c in done if c.changed]
    if applied:
        message += "; applied before it: " + ", ".join(c.describe() for c in applied)
    else:
        message += "; nothing else was changed"
    pending = [c.release for c in rest if c.changed]
    if pending:
        message += "; not attempted: " + ", ".join(pending)
    return StackApplyError(message, done=done, failed=change, remaining=rest)


def _audit_apply(stack: Stack, done: list[Change], outcome: str, failed: str | None = None) -> None:
    details: dict[str, Any] = {
        "file": str(stack.path),
        "changes": [f"{c.action} {c.release}" for c in done if c.changed],
    }
    if failed:
        details["failed"] = failed
    audit.record("apply", stack.name, outcome, **details)

"""The Helm-like verbs of ``llmctl``: parsing and printing only; the work is in `manager.actions`,
`manager.charts`, `manager.chart_repos` and `manager.releases`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RELEASE_VERBS = (
    "install",
    "upgrade",
    "rollback",
    "uninstall",
    "list",
    "status",
    "history",
    "get",
    "template",
    "lint",
    "show",
    "search",
    "repo",
    "package",
    "ps",
)


def say(message: str) -> None:
    print(f"==> {message}", file=sys.stderr, flush=True)


def values_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--values",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="values file (repeatable; later wins)",
    )
    p.add_argument(
        "--set", action="append", default=[], metavar="K=V", help="set values: a.b=c, list[0]=x, a={x,y} (repeatable)"
    )
    p.add_argument(
        "--set-string", action="append", default=[], metavar="K=V", help="like --set, values kept as strings"
    )
    p.add_argument("--version", metavar="V", help="chart version (exact)")


def _deploy_flags(p: argparse.ArgumentParser) -> None:
    values_flags(p)
    p.add_argument("--wait", action="store_true", help="accepted for Helm users: llmctl always waits for health")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="health-check wait (default 300)")
    p.add_argument(
        "--atomic", action="store_true", help="on failure, undo: remove a failed install, roll back a failed upgrade"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="render and validate only: nothing is built, started or recorded"
    )
    p.add_argument(
        "--driver",
        choices=("docker", "process", "swarm", "kubernetes"),
        help="where it runs (default: docker when the engine answers, else process); kubernetes uses the "
        "kubeconfig (KUBECONFIG, LLMCTL_KUBE_CONTEXT, LLMCTL_KUBE_NAMESPACE) and needs --set image=REGISTRY/REPO:TAG",
    )
    p.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="swarm, kubernetes: tasks of the service or pods of the Deployment (default: keep; 1 when new)",
    )
    p.add_argument("--key", metavar="KEY", help="signing key for an image built on the way (store name or path)")
    p.add_argument("--policy", type=Path, metavar="FILE", help="trust policy (default: <config>/policy.yaml)")
    p.add_argument(
        "--history-max", type=int, default=10, metavar="N", help="revisions kept per release (default 10, 0: all)"
    )
    p.add_argument("--no-progress", action="store_true", help="print no download progress")
    connection_flags(p)


def connection_flags(p: argparse.ArgumentParser) -> None:
    """How to reach registries (oci:// charts, images pulled by `image`)."""
    p.add_argument("--ca-file", type=Path, metavar="PEM", help="CA bundle for registries' TLS certificates")
    p.add_argument(
        "--insecure", action="store_true", help="do not verify registries' TLS certificates (only if you must)"
    )
    p.add_argument("--plain-http", action="store_true", help="plain HTTP to loopback registries")


def _output_flag(p: argparse.ArgumentParser, choices: tuple[str, ...] = ("table", "json")) -> None:
    p.add_argument("-o", "--output", choices=choices, default=choices[0], help="output format")


def add_release_parsers(commands: argparse._SubParsersAction) -> None:
    """Register every release and chart verb."""
    p = commands.add_parser(
        "install",
        help="install a chart as a release",
        description=(
            "Render CHART's Model manifest with your values, build (or reuse) its signed image, verify it against "
            "the trust policy, start it with a driver (docker, process, swarm or kubernetes) and wait until it is "
            "healthy. CHART is a shipped chart name (llmctl search), REPO/NAME from a chart repository, or a path to "
            "a chart directory or .tgz."
        ),
        epilog="example: llmctl install sc2 starcoder2-7b-q4 --set server.parallel=4",
    )
    p.add_argument("name", metavar="NAME", help="release name (lower-case letters, digits and '-')")
    p.add_argument("chart", metavar="CHART")
    _deploy_flags(p)

    p = commands.add_parser(
        "upgrade",
        help="upgrade a release to a new chart or values",
        description=(
            "Start a new revision beside the running one, wait for its health check, then retire the old one. "
            "A failed upgrade leaves the old revision serving; --atomic also records the rollback."
        ),
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("chart", metavar="CHART")
    p.add_argument("-i", "--install", action="store_true", help="install if the release does not exist")
    p.add_argument("--reuse-values", action="store_true", help="start from the current revision's values")
    _deploy_flags(p)

    p = commands.add_parser(
        "rollback",
        help="roll a release back to an earlier revision",
        description="Deploy an earlier revision's chart, values and manifest as a new revision.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("revision", type=int, nargs="?", metavar="REVISION", help="default: the previous revision")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    p.add_argument("--dry-run", action="store_true")
    p.add_argument("--policy", type=Path, metavar="FILE")
    connection_flags(p)  # the revision's image may be pulled again from its registry

    p = commands.add_parser(
        "uninstall",
        help="stop a release and delete it",
        description="Stop and remove the release's instances, then its records.",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--keep-history", action="store_true", help="keep the records (status uninstalled)")

    p = commands.add_parser(
        "list", aliases=["ls"], help="list releases", description="Releases and their latest revision."
    )
    p.add_argument("-a", "--all", action="store_true", help="also uninstalled releases")
    _output_flag(p)

    p = commands.add_parser(
        "status",
        help="show a release and its instance",
        description="The latest revision, where it runs and its health.",
    )
    p.add_argument("name", metavar="NAME")
    _output_flag(p)

    p = commands.add_parser(
        "history", help="list a release's revisions", description="Every revision of a release, oldest first."
    )
    p.add_argument("name", metavar="NAME")
    _output_flag(p)

    p = commands.add_parser(
        "get", help="print a release's values or manifest", description="What a revision was installed with."
    )
    p.add_argument("what", choices=("values", "manifest"))
    p.add_argument("name", metavar="NAME")
    p.add_argument("--revision", type=int, metavar="N", help="default: the latest revision")
    p.add_argument("-o", "--output", choices=("yaml", "json"), default="yaml", help="values format")

    p = commands.add_parser(
        "template",
        help="render a chart's manifest",
        description="Print the Model manifest CHART renders with your values.",
    )
    p.add_argument("chart", metavar="CHART")
    p.add_argument("--name", default="release", help="release name the templates see")
    values_flags(p)
    p.add_argument(
        "--target",
        choices=("manifest", "kubernetes"),
        default="manifest",
        help="manifest: the Model manifest; kubernetes: Deployment, Service (+ PodDisruptionBudget, NetworkPolicy)",
    )
    p.add_argument("--replicas", type=int, default=1, help="kubernetes: pods (a PodDisruptionBudget when > 1)")
    p.add_argument("--namespace", help="kubernetes: namespace of the objects")
    p.add_argument("--network-policy", action="store_true", help="kubernetes: admit only labelled clients, no egress")
    connection_flags(p)

    p = commands.add_parser(
        "lint", help="check a chart", description="Report what would stop CHART from installing, and what is missing."
    )
    p.add_argument("chart", type=Path, metavar="CHART_DIR")
    _output_flag(p)

    p = commands.add_parser(
        "show",
        help="show a chart's Chart.yaml or values",
        description="Print a chart's Chart.yaml, values.yaml or README.",
    )
    p.add_argument("what", choices=("chart", "values", "readme"))
    p.add_argument("chart", metavar="CHART")
    p.add_argument("--version", metavar="V")

    p = commands.add_parser(
        "search", help="search charts", description="Search the shipped charts and your chart repositories."
    )
    p.add_argument("keyword", nargs="?", default="", metavar="KEYWORD")
    p.add_argument("--versions", action="store_true", help="every version, not just the latest")
    _output_flag(p)

    p = commands.add_parser(
        "package",
        help="package a chart into NAME-VERSION.tgz",
        description="A reproducible chart archive (same bytes every time).",
    )
    p.add_argument("chart", type=Path, metavar="CHART_DIR")
    p.add_argument("-d", "--destination", type=Path, default=Path("."), metavar="DIR")

    repo = commands.add_parser(
        "repo",
        help="chart repositories",
        description="Chart repositories: directories or HTTP URLs with an index.yaml.",
    )
    verbs = repo.add_subparsers(dest="repo_verb", metavar="VERB", required=True)
    r = verbs.add_parser("add", help="add a repository")
    r.add_argument("name", metavar="NAME")
    r.add_argument("url", metavar="URL")
    r.add_argument("--force-update", action="store_true", help="replace a repository of that name")
    r = verbs.add_parser("list", help="list repositories")
    _output_flag(r)
    r = verbs.add_parser("remove", help="remove a repository")
    r.add_argument("names", nargs="+", metavar="NAME")
    r = verbs.add_parser("update", help="fetch the repositories' indexes again")
    r.add_argument("names", nargs="*", metavar="NAME")
    r = verbs.add_parser("index", help="write index.yaml for a directory of chart archives")
    r.add_argument("directory", type=Path, metavar="DIR")
    r.add_argument("--url", metavar="URL", help="the URL the directory will be served from")

    p = commands.add_parser(
        "ps",
        help="list running model instances",
        description="Every instance: release, endpoint, model digest, uptime, health.",
    )
    p.add_argument("--driver", choices=("docker", "process", "swarm", "kubernetes"))
    _output_flag(p)


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    cells = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def options_from(o: argparse.Namespace) -> Any:
    from manager.actions import Options
    from manager.transfer import Connection

    return Options(
        values_files=getattr(o, "values", []),
        sets=getattr(o, "set", []),
        set_strings=getattr(o, "set_string", []),
        version=getattr(o, "version", None),
        timeout=getattr(o, "timeout", 300.0),
        atomic=getattr(o, "atomic", False),
        dry_run=getattr(o, "dry_run", False),
        reuse_values=getattr(o, "reuse_values", False),
        driver=getattr(o, "driver", None),
        replicas=getattr(o, "replicas", None) if getattr(o, "command", None) in ("install", "upgrade") else None,
        key=getattr(o, "key", None),
        policy_file=getattr(o, "policy", None),
        history_max=getattr(o, "history_max", 10),
        progress=not getattr(o, "no_progress", False),
        connection=Connection(
            ca_file=getattr(o, "ca_file", None),
            insecure=getattr(o, "insecure", False),
            plain_http=getattr(o, "plain_http", False),
        ),
        say=say,
    )


def _uptime(started: str) -> str:
    try:
        seconds = int((datetime.now(UTC) - datetime.fromisoformat(started.replace("Z", "+00:00"))).total_seconds())
    except ValueError:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _print_revision(rev: Any, dry_run: bool) -> None:
    if dry_run:
        print(rev.manifest, end="")
        return
    print(f"NAME: {rev.name}\nREVISION: {rev.revision}\nSTATUS: {rev.status}\nCHART: {rev.chart}-{rev.chart_version}")
    print(f"IMAGE: {rev.image}@{rev.image_digest}\nDRIVER: {rev.driver}\nENDPOINT: {rev.endpoint}")
    print(f"DESCRIPTION: {rev.description}")
    if rev.endpoint:
        body = '{"prompt": "def fib(n):", "max_tokens": 16}'
        print(f"\ntry it:  curl -s {rev.endpoint}/v1/completions -H 'Content-Type: application/json' -d '{body}'")


def _deploy(o: argparse.Namespace) -> int:
    from manager import actions

    opts = options_from(o)
    if o.command == "install":
        rev = actions.install(o.name, o.chart, opts)
    elif o.command == "upgrade":
        rev = actions.upgrade(o.name, o.chart, opts, install_missing=o.install)
    else:
        rev = actions.rollback(o.name, o.revision, opts)
    _print_revision(rev, opts.dry_run)
    return 0


def _uninstall(o: argparse.Namespace) -> int:
    from manager import actions

    print(actions.uninstall(o.name, keep_history=o.keep_history, say=say))
    return 0


def _revisions(revs: Sequence[Any], output: str, columns: dict[str, Any]) -> int:
    """`list` and `history`: a table of revisions, or their JSON without the manifest text."""
    if output == "json":
        print(json.dumps([{k: v for k, v in r.to_json().items() if k != "manifest"} for r in revs], indent=2))
    else:
        print(_table([[str(get(r)) for get in columns.values()] for r in revs], list(columns)))
    return 0


def _list(o: argparse.Namespace) -> int:
    from manager.releases import ReleaseStore

    columns = {
        "NAME": lambda r: r.name,
        "REVISION": lambda r: r.revision,
        "STATUS": lambda r: r.status,
        "CHART": lambda r: f"{r.chart}-{r.chart_version}",
        "APP VERSION": lambda r: r.app_version,
        "DRIVER": lambda r: r.driver,
        "ENDPOINT": lambda r: r.endpoint or "-",
        "UPDATED": lambda r: r.updated,
    }
    return _revisions(ReleaseStore().list(all=o.all), o.output, columns)


def _history(o: argparse.Namespace) -> int:
    from manager.releases import ReleaseStore

    columns = {
        "REVISION": lambda r: r.revision,
        "UPDATED": lambda r: r.updated,
        "STATUS": lambda r: r.status,
        "CHART": lambda r: f"{r.chart}-{r.chart_version}",
        "APP VERSION": lambda r: r.app_version,
        "DESCRIPTION": lambda r: r.description,
    }
    return _revisions(ReleaseStore().history(o.name), o.output, columns)


def _status(o: argparse.Namespace) -> int:
    from manager import actions

    st = actions.status(o.name)
    if o.output == "json":
        print(json.dumps(st, indent=2))
        return 0
    keys = ("name", "revision", "status", "chart", "chart_version", "image", "image_digest", "driver", "endpoint")
    for key in (*keys, "description", "updated"):
        print(f"{key.upper().replace('_', ' ')}: {st.get(key)}")
    inst = st.get("instance")
    if inst and "error" not in inst:
        print(f"INSTANCE: {inst['id']} {inst['state']}, {inst['health']}, up {_uptime(inst['started'])}")
    elif inst:
        print(f"INSTANCE: unknown ({inst['error']})")
    return 0


def _get(o: argparse.Namespace) -> int:
    import yaml

    from manager.releases import ReleaseStore

    rev = ReleaseStore().get(o.name, o.revision)
    if o.what == "manifest":
        print(rev.manifest, end="")
    elif o.output == "json":
        print(json.dumps(rev.values, indent=2))
    else:
        print(yaml.safe_dump(rev.values, sort_keys=False) if rev.values else "{}\n", end="")
    return 0


def _template(o: argparse.Namespace) -> int:
    from manager import actions

    if o.target == "manifest":
        print(actions.template(o.chart, options_from(o), name=o.name), end="")
        return 0
    from manager import kubernetes

    m = actions.render(o.chart, options_from(o), name=o.name, revision=1, upgrade=False).manifest
    target = kubernetes.Target(
        release=o.name,
        image=m.image or m.tag,
        weights_sha256=actions.served_weights_digest(m),
        replicas=o.replicas,
        namespace=o.namespace,
        network_policy=o.network_policy,
    )
    print(kubernetes.to_yaml(kubernetes.render_objects(m, target)), end="")
    return 0


def _lint(o: argparse.Namespace) -> int:
    from manager import charts

    findings = charts.lint(o.chart)
    errors = sum(m.severity == "error" for m in findings)
    if o.output == "json":
        print(json.dumps([m.__dict__ for m in findings], indent=2))
    else:
        for m in findings:
            print(f"[{m.severity.upper()}] {m.file}: {m.message}")
        print(f"1 chart linted, {1 if errors else 0} chart(s) failed")
    return 1 if errors else 0


def _show(o: argparse.Namespace) -> int:
    from manager import actions, chart_repos, charts

    chart = charts.load_chart(chart_repos.resolve(o.chart, o.version, actions.BUILTIN_CHARTS))
    if o.what == "chart":
        print(charts.show_chart(chart), end="")
    elif o.what == "values":
        print(charts.show_values(chart), end="")
    else:
        print(chart.readme or f"{chart.meta.name} has no README\n", end="")
    return 0


def _search(o: argparse.Namespace) -> int:
    from manager import actions, chart_repos

    hits = chart_repos.search(o.keyword, actions.BUILTIN_CHARTS, all_versions=o.versions)
    if o.output == "json":
        print(json.dumps([h.__dict__ for h in hits], indent=2))
        return 0
    rows = [
        (h.name if h.repo == "builtin" else f"{h.repo}/{h.name}", h.version, h.app_version, h.description) for h in hits
    ]
    print(_table(rows, ("NAME", "CHART VERSION", "APP VERSION", "DESCRIPTION")) if rows else "no results")
    return 0


def _package(o: argparse.Namespace) -> int:
    from manager import charts

    print(f"packaged {charts.package(o.chart, o.destination)}")
    return 0


def _ps(o: argparse.Namespace) -> int:
    from manager import actions

    found = actions.instances(o.driver)
    if o.output == "json":
        print(json.dumps([i.to_json() for i in found], indent=2))
        return 0
    rows = [
        (i.release, str(i.revision), i.driver, i.endpoint, i.model_digest[:19], _uptime(i.started), i.health)
        for i in found
    ]
    print(_table(rows, ("RELEASE", "REVISION", "DRIVER", "ENDPOINT", "MODEL", "UPTIME", "HEALTH")))
    return 0


def run_release(o: argparse.Namespace) -> int:
    """Run one release or chart verb."""
    handlers = {
        "install": _deploy,
        "upgrade": _deploy,
        "rollback": _deploy,
        "uninstall": _uninstall,
        "list": _list,
        "ls": _list,
        "status": _status,
        "history": _history,
        "get": _get,
        "template": _template,
        "lint": _lint,
        "show": _show,
        "search": _search,
        "package": _package,
        "repo": _run_repo,
        "ps": _ps,
    }
    return handlers[o.command](o)


def _run_repo(o: argparse.Namespace) -> int:
    from manager import chart_repos

    verb = o.repo_verb
    if verb == "add":
        chart_repos.add(o.name, o.url, force=o.force_update)
        print(f'"{o.name}" has been added to your repositories')
    elif verb == "list":
        repos = chart_repos.list_repos()
        if o.output == "json":
            print(json.dumps([r.__dict__ for r in repos], indent=2, default=str))
        else:
            print(_table([(r.name, str(r.url)) for r in repos], ("NAME", "URL")) if repos else "no repositories")
    elif verb == "remove":
        for name in o.names:
            chart_repos.remove(name)
            print(f'"{name}" has been removed from your repositories')
    elif verb == "update":
        for name in chart_repos.update(o.names or None):
            print(f'updated "{name}"')
    elif verb == "index":
        print(f"wrote {chart_repos.index(o.directory, o.url)}")
    return 0

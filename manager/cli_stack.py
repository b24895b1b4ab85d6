"""`llmctl apply | diff | drift`: parsing and printing only; the work is in `manager.stack`.

Exit codes (CI gates on them): `diff` 0 when nothing would change, 2 when something would; `drift`
0 when every instance matches its record, 2 when one does not; `apply` 0 when it is done (also
`--dry-run`). Errors are 1, via the CLI root.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

STACK_VERBS = ("apply", "diff", "drift")
CHANGES = 2  # exit code: something would change / drift found


def add_stack_parsers(commands: argparse._SubParsersAction) -> None:
    """Register `apply`, `diff` and `drift`."""
    from manager.cli_release import connection_flags

    p = commands.add_parser(
        "apply",
        help="bring the releases of a stack file to what it declares",
        description=(
            "Install, upgrade and repair the releases FILE declares (kind: Stack), in file order; with --prune, "
            "uninstall releases this stack applied before that are no longer in the file (never one installed by "
            "hand). Every release is checked first; the first failure stops the run, earlier releases stay applied."
        ),
        epilog="example: llmctl apply -f stack.yaml --prune",
    )
    _stack_flags(p)
    p.add_argument("--dry-run", action="store_true", help="print the plan (as diff does) and change nothing; exit 0")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS", help="health-check wait per release")
    p.add_argument("--atomic", action="store_true", help="a failed upgrade rolls back, a failed install is removed")
    p.add_argument("--key", metavar="KEY", help="signing key for images built on the way (store name or path)")
    p.add_argument("--policy", type=Path, metavar="FILE", help="trust policy (default: <config>/policy.yaml)")
    p.add_argument(
        "--history-max", type=int, default=10, metavar="N", help="revisions kept per release (default 10, 0: all)"
    )
    p.add_argument("--no-progress", action="store_true", help="print no download progress")
    connection_flags(p)  # releases may name registry images (image: ...) and oci:// charts

    p = commands.add_parser(
        "diff",
        help="show what apply would change (exit 2 if anything)",
        description=(
            "Compare FILE with the release store and the running instances, without changing anything: "
            "installs (+), upgrades (~, with what differs), repairs of drifted releases (!) and, with --prune, "
            "uninstalls (-). Exit 0: nothing to do; 2: apply would change something; 1: error."
        ),
        epilog="example: llmctl diff -f stack.yaml -o json",
    )
    _stack_flags(p)
    connection_flags(p)  # oci:// charts are pulled to render them

    p = commands.add_parser(
        "drift",
        help="compare running instances with the release records (exit 2 if they differ)",
        description=(
            "For every deployed release (or those named): its instance missing, exited, restarting or unhealthy, "
            "serving other weights than its image, replaced, or instances no deployed revision owns (orphans). "
            "Exit 0: no drift; 2: drift found; 1: error."
        ),
    )
    p.add_argument("names", nargs="*", metavar="NAME", help="releases to check (default: all)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")


def _stack_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", "--filename", type=Path, required=True, metavar="FILE", help="the stack file (kind: Stack)")
    p.add_argument("--prune", action="store_true", help="uninstall releases this stack applied that left the file")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")


def run_stack(o: argparse.Namespace) -> int:
    """Run `apply`, `diff` or `drift`; returns the exit code."""
    if o.command == "drift":
        return _drift(o)
    from manager import stack
    from manager.cli_release import options_from

    loaded = stack.load_stack(o.filename)
    if o.command == "diff" or o.dry_run:
        changes = stack.plan(loaded, prune=o.prune, connection=options_from(o).connection)
        _print_plan(loaded, changes, o.output, prune=o.prune, dry_run=o.command == "apply")
        if o.command == "apply":
            return 0
        return CHANGES if any(c.changed for c in changes) else 0
    return _apply(loaded, o)


def _apply(loaded: Any, o: argparse.Namespace) -> int:
    from manager import stack
    from manager.cli_release import options_from

    opts = options_from(o)
    try:
        changes = stack.apply(loaded, prune=o.prune, dry_run=False, opts=opts)
    except stack.StackApplyError as e:
        if o.output == "json":
            doc = _document(loaded, e.done, prune=o.prune)
            doc["failed"] = {**e.failed.to_json(), "error": " ".join(str(e).split())}
            doc["notAttempted"] = [c.release for c in e.remaining if c.changed]
            print(json.dumps(doc, indent=2))
        else:
            for change in e.done:
                if change.changed:
                    print(_done_line(change))
        raise
    if o.output == "json":
        print(json.dumps(_document(loaded, changes, prune=o.prune), indent=2))
        return 0
    for change in changes:
        if change.changed:
            print(_done_line(change))
    counts = stack.summary(changes)
    if any(c.changed for c in changes):
        done = ", ".join(f"{counts[a]} {past}" for a, past in _PAST.items() if counts[a])
        print(f"Applied stack {loaded.name}: {done}; {counts['none']} unchanged.")
    else:
        print(f"Nothing to do: {counts['none']} release(s) match {loaded.source}.")
    _print_notes(loaded, changes, o.prune)
    return 0


_PAST = {"install": "installed", "upgrade": "upgraded", "repair": "repaired", "uninstall": "uninstalled"}


def _done_line(change: Any) -> str:
    line = change.describe()
    if change.action == "uninstall":
        return f"{line}: done"
    where = f" at {change.endpoint}" if change.endpoint else ""
    return f"{line}: done, revision {change.revision}{where}"


def _document(loaded: Any, changes: Sequence[Any], *, prune: bool) -> dict[str, Any]:
    from manager import stack

    return {
        "stack": loaded.name,
        "file": loaded.source,
        "changed": any(c.changed for c in changes),
        "summary": stack.summary(changes),
        "changes": [c.to_json() for c in changes],
        "unlisted": [] if prune else stack.unlisted(loaded),
    }


def _print_plan(loaded: Any, changes: Sequence[Any], output: str, *, prune: bool, dry_run: bool) -> None:
    from manager import stack

    if output == "json":
        print(json.dumps({**_document(loaded, changes, prune=prune), "dryRun": dry_run}, indent=2))
        return
    for change in changes:
        if change.changed:
            print(change.describe())
    counts = stack.summary(changes)
    if any(c.changed for c in changes):
        print(
            f"Plan: {counts['install']} to install, {counts['upgrade']} to upgrade, {counts['repair']} to repair, "
            f"{counts['uninstall']} to uninstall; {counts['none']} unchanged."
        )
    else:
        print(f"No changes: {counts['none']} release(s) match {loaded.source}.")
    _print_notes(loaded, changes, prune)


def _print_notes(loaded: Any, changes: Sequence[Any], prune: bool) -> None:
    """What is not a change but worth knowing: releases taken over from another stack, releases
    that left the file and stay installed without --prune."""
    from manager import stack

    for change in changes:
        if not change.changed and change.previous_owner:
            owner = change.previous_owner
            print(f"note: {change.release} belonged to stack {owner}; apply records it as {loaded.name}'s")
    if prune:
        return
    for name in stack.unlisted(loaded):
        where = f"{name} was applied by stack {loaded.name} but is no longer in {loaded.source}"
        print(f"note: {where}; --prune uninstalls it")


def _drift(o: argparse.Namespace) -> int:
    from manager import stack
    from manager.cli_release import _table

    found = stack.drift(o.names or None)
    if o.output == "json":
        print(json.dumps([d.to_json() for d in found], indent=2))
    elif found:
        rows = [(d.release, str(d.revision or "-"), d.driver, d.kind, d.detail) for d in found]
        print(_table(rows, ("RELEASE", "REVISION", "DRIVER", "KIND", "DETAIL")))
    else:
        print("no drift: every deployed release runs as recorded")
    return CHANGES if found else 0

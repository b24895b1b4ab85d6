"""The ``llmctl`` command: parses arguments, hands the work to one place, prints errors on one line.

Here: ``model``, ``cache``, ``key``, ``build``, ``verify``, ``policy``, ``audit`` and ``sbom``. The
release and chart verbs are in `manager.cli_release`, the stack verbs in `manager.cli_stack`, the
registry verbs in `manager.cli_registry`. Each verb's work lives in one module of `manager`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "llmctl"
MODEL_VERBS = ("info", "generate", "push", "pull")


def version() -> str:
    """The installed distribution's version, or ``0+unknown`` when running from an uninstalled tree."""
    from registry.sbom import tool_version

    return tool_version()


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the whole command line."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Install, verify and run local code LLMs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    model = commands.add_parser(
        "model",
        help="inspect or run a GGUF file; push or pull weights as OCI artifacts",
        description=(
            "info|generate: inspect a GGUF model file or generate text with it (llmctl's own runtime). "
            "push|pull: weights as signed CNCF ModelPack OCI artifacts (see llmctl model push --help)."
        ),
    )
    model.add_argument("verb", choices=MODEL_VERBS, help="what to do with the model")
    model.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="arguments for the verb (see: llmctl model VERB --help)",
    )
    add_cache_parser(commands)
    add_key_parser(commands)
    add_build_parser(commands)
    add_verify_parsers(commands)
    add_audit_parser(commands)
    from manager.cli_release import add_release_parsers

    add_release_parsers(commands)
    from manager.cli_stack import add_stack_parsers

    add_stack_parsers(commands)
    from manager.cli_registry import add_registry_parsers

    add_registry_parsers(commands)
    sbom = commands.add_parser(
        "sbom",
        help="print the CycloneDX SBOM of a built image",
        description="Print the CycloneDX 1.6 document written when IMAGE was built (see docs/sbom.md).",
    )
    sbom.add_argument("image", metavar="IMAGE", help="llmctl/NAME:VERSION or the image digest sha256:<hex>")
    return parser


def add_build_parser(commands: argparse._SubParsersAction) -> None:
    """``llmctl build CHART_OR_MANIFEST``."""
    from manager.cli_release import values_flags

    build = commands.add_parser(
        "build",
        help="build a model image from a chart or a manifest",
        description=(
            "Build the model image a Model manifest (or the one a chart renders with your values) describes: "
            "check the trust policy, fetch and verify the weights (cache), stack the base, weights and runtime "
            "layers reproducibly, sign the image and attest its SBOM and provenance, write it to the OCI layout "
            "in <data>/images/layout, verify it, and load it into the Docker engine as llmctl/NAME:VERSION. "
            "Prints the image digest. The same inputs always give the same digest."
        ),
        epilog="examples: llmctl build model.yaml; llmctl build starcoder2-7b-q4 --set weights.url=https://mirror/...",
    )
    build.add_argument(
        "source",
        metavar="CHART_OR_MANIFEST",
        help="a Model manifest file (YAML or JSON), or a chart (name, REPO/NAME, dir, .tgz)",
    )
    values_flags(build)
    build.add_argument("--no-load", action="store_true", help="write the OCI layout and SBOM only")
    build.add_argument("--dockerfile", action="store_true", help="print the equivalent Dockerfile instead of building")
    build.add_argument("--no-progress", action="store_true", help="print no download progress")
    build.add_argument(
        "--key",
        metavar="KEY",
        help="sign with this key: a name in the key store or a cosign.key path (default: the store's 'cosign' key)",
    )
    build.add_argument("--no-sign", action="store_true", help="do not sign (only if the trust policy allows it)")
    build.add_argument("--policy", type=Path, metavar="FILE", help="trust policy (default: <config>/policy.yaml)")
    build.add_argument(
        "--weights",
        choices=("image", "mount"),
        help="bake the weights into the image, or mount them read-only from the cache at run time "
        "(default: the manifest's spec.weights.storage, else image)",
    )


def run_build(options: argparse.Namespace) -> int:
    """Run ``llmctl build`` and print its result."""
    from manager import actions, build
    from manager.cli_release import options_from
    from manager.manifest import load_manifest

    source = Path(options.source)
    if source.is_file() and not source.name.endswith((".tgz", ".tar.gz")):
        manifest = load_manifest(source)
    else:
        manifest = actions.render(
            options.source, options_from(options), name="build", revision=1, upgrade=False
        ).manifest
    if options.dockerfile:
        print(build.render_dockerfile(manifest), end="")
        return 0
    result = build.build_model(
        manifest,
        load=not options.no_load,
        progress=not options.no_progress,
        key=options.key,
        sign=not options.no_sign,
        policy_file=options.policy,
        weights_storage=options.weights,
    )
    print(f"image:  {result.tag}{'' if result.loaded else ' (not loaded)'}")
    print(f"digest: {result.digest}")
    print(f"id:     {result.image_id}")
    print(f"layout: {result.layout}")
    print(f"sbom:   {result.sbom}")
    print(f"signed: {result.signer or 'no'}")
    return 0


def add_verify_parsers(commands: argparse._SubParsersAction) -> None:
    """``llmctl verify IMAGE`` and ``llmctl policy check IMAGE``."""
    verify = commands.add_parser(
        "verify",
        help="verify an image's signature, attestations and weights",
        description=(
            "Verify a built image from the local store: every blob against its digest, the cosign signature, "
            "the signed attestations (CycloneDX SBOM, SLSA provenance), and the SBOM's weight digests against "
            "the bytes in the image. With --key, like `cosign verify --key`; without, the trust policy decides "
            "which keys are trusted and what is required. Exit 1 on any failure."
        ),
        epilog="example: llmctl verify llmctl/demo:1.0.0 --key cosign.pub",
    )
    verify.add_argument("image", metavar="IMAGE", help="llmctl/NAME:VERSION or sha256:<hex>")
    verify.add_argument(
        "--key", type=Path, action="append", default=[], metavar="PUB", help="trusted public key (repeatable)"
    )
    verify.add_argument("--policy", type=Path, metavar="FILE", help="trust policy (default: <config>/policy.yaml)")
    verify.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    policy = commands.add_parser(
        "policy",
        help="check images against the trust policy",
        description=(
            "The trust policy (<config>/policy.yaml, or --policy; docs/policy.md) says which keys are trusted "
            "for which repositories, whether signatures, SBOMs and provenance are required, and which licences "
            "are allowed. It is enforced by build and before anything runs."
        ),
    )
    verbs = policy.add_subparsers(dest="policy_verb", metavar="VERB", required=True)
    check = verbs.add_parser(
        "check", help="check an image against the policy", description="Exit 1 if the policy rejects IMAGE."
    )
    check.add_argument("image", metavar="IMAGE", help="llmctl/NAME:VERSION or sha256:<hex>")
    show = verbs.add_parser(
        "show", help="print the policy in effect", description="Print the rules of the policy in effect."
    )
    for p in (check, show):
        p.add_argument("--policy", type=Path, metavar="FILE", help="trust policy (default: <config>/policy.yaml)")
        p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")


def add_audit_parser(commands: argparse._SubParsersAction) -> None:
    """``llmctl audit show|verify|checkpoint``."""
    audit = commands.add_parser(
        "audit",
        help="the append-only audit log",
        description=(
            "Every build, verification, policy decision, push, pull, install, upgrade, rollback, start and "
            "uninstall is appended to a hash-chained log (<data>/audit.log): each entry carries the hash of the "
            "one before, so an edited, removed or reordered entry is detected. Signed checkpoints (with an llmctl "
            "key) also catch a rewritten or truncated history up to the checkpoint."
        ),
    )
    verbs = audit.add_subparsers(dest="audit_verb", metavar="VERB", required=True)
    show = verbs.add_parser("show", help="list the entries", description="List the audit log's entries, oldest first.")
    show.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")
    check = verbs.add_parser(
        "verify", help="check the chain", description="Check the hash chain and the checkpoints; exit 1 on tampering."
    )
    check.add_argument(
        "--key",
        type=Path,
        action="append",
        default=[],
        metavar="PUB",
        help="checkpoint public key (default: the key store's)",
    )
    check.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    cp = verbs.add_parser(
        "checkpoint", help="sign the log's head", description="Sign the current head of the log with an llmctl key."
    )
    cp.add_argument("--key", metavar="KEY", help="key name in the store or a cosign.key path (default: cosign)")


def run_audit(options: argparse.Namespace) -> int:
    """Run one ``llmctl audit`` verb."""
    from manager import audit

    if options.audit_verb == "show":
        print(audit.show(as_json=options.output == "json"))
        return 0
    if options.audit_verb == "checkpoint":
        cp = audit.checkpoint(options.key)
        print(f"checkpoint at entry {cp.seq}: {cp.hash}, signed by {cp.key}")
        return 0
    report = audit.verify(options.key or None)
    if options.output == "json":
        print(json.dumps(report.to_dict(), indent=2))
    elif report.ok:
        print(f"ok: {report.entries} entries, chain intact; {report.checkpoints_verified} checkpoint(s) verified")
    for problem in report.problems if options.output != "json" else []:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
    return 0 if report.ok else 1


def run_verify(options: argparse.Namespace) -> int:
    """Run ``llmctl verify`` or ``llmctl policy check|show``."""
    from manager import policy, verify_image

    if options.command == "policy" and options.policy_verb == "show":
        loaded = policy.load_policy(options.policy)
        if options.output == "json":
            print(json.dumps({"source": loaded.source, "rules": [policy.rule_json(r) for r in loaded.rules]}, indent=2))
        else:
            print(f"# {loaded.source}")
            for rule in loaded.rules:
                print(policy.describe_rule(rule))
        return 0
    result = verify_image.verify_image(
        options.image,
        key_files=options.key if options.command == "verify" else (),
        policy=policy.load_policy(options.policy),
        enforce_policy=options.command == "policy",
    )
    print(verify_image.as_json(result) if options.output == "json" else verify_image.report(result))
    return 0


def add_key_parser(commands: argparse._SubParsersAction) -> None:
    """``llmctl key generate|import|export|ls``."""
    key = commands.add_parser(
        "key",
        help="create and manage signing keys (cosign's formats)",
        description=(
            "Signing keys in cosign's formats: ECDSA P-256, the private key encrypted with scrypt and NaCl "
            "secretbox (cosign.key), the public key as PEM (cosign.pub). Keys are kept in <config>/keys "
            "(~/.config/llmctl/keys, or $LLMCTL_HOME/config/keys). The password comes from "
            "LLMCTL_KEY_PASSWORD (or COSIGN_PASSWORD), else it is asked for on the terminal."
        ),
    )
    verbs = key.add_subparsers(dest="key_verb", metavar="VERB", required=True)
    gen = verbs.add_parser("generate", help="create a key pair", description="Create a new ECDSA P-256 key pair.")
    imp = verbs.add_parser(
        "import",
        help="import an unencrypted P-256 private key",
        description="Encrypt an unencrypted PEM P-256 private key in cosign's format (cosign import-key-pair).",
    )
    imp.add_argument("pem", type=Path, metavar="PEM_FILE", help="EC PRIVATE KEY or PKCS#8 PRIVATE KEY PEM file")
    for p in (gen, imp):
        p.add_argument("--name", default="cosign", help="key name (default: cosign)")
        p.add_argument("--force", action="store_true", help="replace an existing key of that name")
    exp = verbs.add_parser(
        "export",
        help="print a public key (or the encrypted private key)",
        description="Print the public key PEM, to give to verifiers; --private prints the encrypted private key file.",
    )
    exp.add_argument("--name", default="cosign", help="key name (default: cosign)")
    exp.add_argument("--private", action="store_true", help="the encrypted private key instead of the public key")
    ls = verbs.add_parser("ls", help="list keys", description="List keys: name, fingerprint, files.")
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")


def run_key(options: argparse.Namespace) -> int:
    """Run one ``llmctl key`` verb and print its result."""
    from manager import keys

    verb = options.key_verb
    if verb in ("generate", "import"):
        if verb == "generate":
            info = keys.generate(options.name, force=options.force)
        else:
            info = keys.import_pem(options.pem, options.name, force=options.force)
        print(f"private key: {info.private_key}\npublic key:  {info.public_key}\nfingerprint: {info.fingerprint}")
        return 0
    if verb == "export":
        sys.stdout.buffer.write(keys.export(options.name, private=options.private))
        return 0
    if verb == "ls":
        found = keys.list_keys()
        if options.output == "json":
            print(
                json.dumps(
                    [
                        {
                            "name": k.name,
                            "fingerprint": k.fingerprint,
                            "private_key": str(k.private_key or ""),
                            "public_key": str(k.public_key),
                        }
                        for k in found
                    ],
                    indent=2,
                )
            )
        else:
            for k in found:
                print(f"{k.name}  {k.fingerprint}  {k.public_key}{'' if k.private_key else '  (public only)'}")
        return 0
    raise AssertionError(verb)


CACHE_HELP = """\
The weights cache is content-addressed: each file is stored once under its sha256 digest in
<cache>/blobs/sha256/<hex> (<cache> is ~/.cache/llmctl, or $LLMCTL_HOME/cache). Pins
(<cache>/pins/<name>) keep blobs from being garbage-collected.
"""


def add_cache_parser(commands: argparse._SubParsersAction) -> None:
    """``llmctl cache fetch|ls|verify|gc``."""
    cache = commands.add_parser(
        "cache",
        help="fetch, list, verify and clean the weights cache",
        description="Fetch, list, verify and clean the content-addressed weights cache.",
        epilog=CACHE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = cache.add_subparsers(dest="cache_verb", metavar="VERB", required=True)

    fetch = verbs.add_parser(
        "fetch",
        help="download or copy a file into the cache and check its sha256",
        description=(
            "Download (https://, http://) or copy (file://, local path) SOURCE into the cache, hashing it "
            "while it streams; the file is kept only if its sha256 equals --sha256. An interrupted download "
            "resumes where it stopped; connection errors, stalls and 5xx answers are retried with backoff. "
            "A blob already in the cache is re-verified instead of fetched. Prints the blob's path."
        ),
        epilog="example: llmctl cache fetch https://example.org/m.gguf --sha256 sha256:<64 hex> --pin my-model",
    )
    fetch.add_argument("source", metavar="SOURCE", help="https://, http:// or file:// URL, or a local path")
    fetch.add_argument("--sha256", required=True, metavar="DIGEST", help="expected digest: sha256:<64 hex> or <64 hex>")
    fetch.add_argument("--pin", metavar="NAME", help="pin the blob under NAME so that `cache gc` keeps it")
    fetch.add_argument("--retries", type=int, default=5, metavar="N", help="retries after failures (default 5)")
    fetch.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="give up on a stalled connection after this"
    )
    fetch.add_argument("--no-progress", action="store_true", help="print no progress")

    ls = verbs.add_parser(
        "ls",
        help="list cached blobs",
        description="List cached blobs: digest, size, source and the pins that keep them.",
    )
    ls.add_argument("-o", "--output", choices=("table", "json"), default="table", help="output format")

    verify = verbs.add_parser(
        "verify",
        help="re-hash cached blobs; remove corrupt ones",
        description=(
            "Re-hash the given blobs (all blobs when none are given). A blob whose bytes no longer match "
            "its digest is removed from the cache and named; the exit code is then 1."
        ),
    )
    verify.add_argument("digests", nargs="*", metavar="DIGEST", help="blobs to check (default: all)")

    gc = verbs.add_parser(
        "gc",
        help="remove unpinned blobs and partial downloads",
        description="Remove partial downloads and every blob that no pin keeps. Prints what it removes.",
    )
    gc.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def run_cache(options: argparse.Namespace) -> int:
    """Run one ``llmctl cache`` verb and print its result."""
    from manager import cache

    verb = options.cache_verb
    if verb == "fetch":
        path = cache.fetch_blob(
            options.source,
            options.sha256,
            pin=options.pin,
            progress=not options.no_progress,
            retries=options.retries,
            timeout=options.timeout,
        )
        print(path)
        return 0
    if verb == "ls":
        blobs = cache.list_blobs()
        if options.output == "json":
            print(json.dumps([b.to_json() for b in blobs], indent=2))
            return 0
        rows = [(b.digest, _size(b.size), ",".join(b.pins) or "-", b.source or "-") for b in blobs]
        header = ("DIGEST", "SIZE", "PINS", "SOURCE")
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
        for row in [header, *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
        return 0
    if verb == "verify":
        results = cache.verify_blobs(options.digests)
        bad = [r.digest for r in results if not r.ok]
        for r in results:
            print(f"{'ok' if r.ok else 'CORRUPT'}  {r.digest}")
        for digest in bad:
            print(
                f"{PROG}: error: blob {digest} is corrupt and was removed from the cache; "
                "fetch it again with `llmctl cache fetch`",
                file=sys.stderr,
            )
        return 1 if bad else 0
    if verb == "gc":
        removed = cache.collect_garbage(dry_run=options.dry_run)
        prefix = "would remove" if options.dry_run else "removed"
        for path in removed:
            print(f"{prefix} {path}")
        if not removed:
            print("nothing to remove")
        return 0
    raise AssertionError(verb)


def run_model(verb: str, args: Sequence[str], *, debug: bool = False) -> int:
    """Run ``python -m runtime VERB ARGS...`` in-process and return its exit code."""
    from runtime import cli as runtime_cli

    return runtime_cli.main([verb, *args, *(["--debug"] if debug else [])])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmctl`` console script; returns the process exit code."""
    parser = build_parser()
    options = parser.parse_args(argv)
    if options.command is None:
        parser.print_help(sys.stderr)
        return 2

    from manager.errors import LlmctlError
    from registry.errors import RegistryError
    from runtime.errors import ModelError

    try:
        if options.command == "cache":
            return run_cache(options)
        if options.command == "key":
            return run_key(options)
        if options.command == "build":
            return run_build(options)
        from manager.cli_release import RELEASE_VERBS, run_release

        if options.command in (*RELEASE_VERBS, "ls"):
            return run_release(options)
        from manager.cli_stack import STACK_VERBS, run_stack

        if options.command in STACK_VERBS:
            return run_stack(options)
        from manager.cli_registry import REGISTRY_VERBS, run_registry

        if options.command in REGISTRY_VERBS:
            return run_registry(options)
        if options.command == "audit":
            return run_audit(options)
        if options.command in ("verify", "policy"):
            return run_verify(options)
        if options.command == "sbom":
            from manager.build import sbom_path

            sys.stdout.write(sbom_path(options.image).read_text())
            return 0
        if options.verb in ("push", "pull"):
            from manager.cli_registry import run_model_artifact

            return run_model_artifact(options.verb, list(options.args))
        return run_model(options.verb, options.args, debug=options.debug)
    except (LlmctlError, RegistryError, ModelError) as exc:  # every user-facing error family
        if options.debug:
            raise
        message = " ".join(str(exc).split())  # one line, whatever the message holds
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if options.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

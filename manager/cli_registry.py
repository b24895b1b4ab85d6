"""Registry verbs of ``llmctl``: login, push, pull, mirror, and model and chart artifacts. Parsing and
printing only; the work is in `manager.transfer`."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

REGISTRY_VERBS = ("registry", "push", "pull", "mirror", "chart")
MODEL_ARTIFACT_VERBS = ("push", "pull")


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ca-file", type=Path, metavar="PEM", help="CA bundle for the registry's TLS certificate")
    p.add_argument(
        "--insecure", action="store_true", help="do not verify the registry's TLS certificate (only if you must)"
    )
    p.add_argument(
        "--plain-http", action="store_true", help="talk plain HTTP (loopback registries only, unless --insecure)"
    )


def _connection(o: argparse.Namespace) -> Any:
    from manager.transfer import Connection

    return Connection(ca_file=o.ca_file, insecure=o.insecure, plain_http=o.plain_http)


def add_registry_parsers(commands: argparse._SubParsersAction) -> None:
    reg = commands.add_parser(
        "registry",
        help="log in to and out of registries",
        description="Credentials for registries, kept in <config>/auth.json (mode 0600); Docker's config.json is read.",
    )
    verbs = reg.add_subparsers(dest="registry_verb", metavar="VERB", required=True)
    login = verbs.add_parser("login", help="check and store credentials", description="Log in to REGISTRY (host:port).")
    login.add_argument("registry", metavar="REGISTRY")
    login.add_argument("-u", "--username", required=True)
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin (else: asked for)")
    _connection_flags(login)
    logout = verbs.add_parser("logout", help="forget credentials", description="Remove REGISTRY's stored credentials.")
    logout.add_argument("registry", metavar="REGISTRY")

    p = commands.add_parser(
        "push",
        help="push a built image with its signature, attestations and SBOM",
        description=(
            "Push IMAGE from the local store to REF (registry:port/repository:tag) with its cosign signature, "
            "attestations and SBOM (tags sha256-<digest>.sig|.att|.sbom). IMAGE must pass the trust policy first."
        ),
        epilog="example: llmctl push llmctl/starcoder2-7b-q4:1.0.0 registry.internal:5000/llm/starcoder2-7b-q4:1.0.0",
    )
    p.add_argument("image", metavar="IMAGE")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--policy", type=Path, metavar="FILE")
    _connection_flags(p)

    p = commands.add_parser(
        "pull",
        help="pull an image and verify it against the trust policy",
        description=(
            "Pull REF with its attachments into the local store, then verify it against the trust policy (signature, "
            "attestations, SBOM weight digests, licence). A refused image is removed from the store again."
        ),
    )
    p.add_argument("ref", metavar="REF")
    p.add_argument("--policy", type=Path, metavar="FILE")
    _connection_flags(p)

    p = commands.add_parser(
        "mirror",
        help="copy images, models and charts with their attachments between registries or to a directory",
        description=(
            "Copy SRC to DST with every signature and attestation, digests unchanged. Either side may be a registry "
            "reference or an OCI layout directory, oci-layout:/path:REPOSITORY:TAG (a USB stick, a one-way transfer)."
        ),
        epilog="example: llmctl mirror registry.a:5000/llm/sc2:1.0.0 oci-layout:/media/usb/llmctl:llm/sc2:1.0.0",
    )
    p.add_argument("source", metavar="SRC")
    p.add_argument("destination", metavar="DST")
    _connection_flags(p)

    chart = commands.add_parser(
        "chart", help="push or pull charts as OCI artifacts", description="Charts in OCI registries."
    )
    cverbs = chart.add_subparsers(dest="chart_verb", metavar="VERB", required=True)
    cp = cverbs.add_parser(
        "push", help="package, sign and push a chart", description="Push CHART_DIR to oci://REGISTRY/PATH/NAME:VERSION."
    )
    cp.add_argument("chart", type=Path, metavar="CHART_DIR")
    cp.add_argument("ref", metavar="oci://REGISTRY/PATH")
    cp.add_argument("--key", help="signing key (default: the store's cosign key)")
    _connection_flags(cp)
    cl = cverbs.add_parser(
        "pull", help="pull and verify a chart", description="Pull oci://REGISTRY/PATH/NAME into the chart cache."
    )
    cl.add_argument("ref", metavar="oci://REGISTRY/PATH/NAME")
    cl.add_argument("--version", metavar="V")
    cl.add_argument("--policy", type=Path, metavar="FILE")
    _connection_flags(cl)


def model_artifact_parser(verb: str) -> argparse.ArgumentParser:
    """`llmctl model push|pull`: weights as signed OCI artifacts in the CNCF ModelPack layout."""
    if verb == "push":
        p = argparse.ArgumentParser(
            prog="llmctl model push",
            description="Push WEIGHTS (a GGUF path or a cache digest) to REF as a signed CNCF ModelPack artifact.",
        )
        p.add_argument("weights", metavar="WEIGHTS")
        p.add_argument("ref", metavar="REF")
        p.add_argument("--name", required=True, help="model name, e.g. starcoder2-7b-q4")
        p.add_argument("--version", required=True)
        p.add_argument("--license", default="bigcode-openrail-m")
        p.add_argument("--key", help="signing key (default: the store's cosign key)")
    else:
        p = argparse.ArgumentParser(
            prog="llmctl model pull",
            description="Pull REF's weights into the cache: signature per the trust policy, digests verified.",
        )
        p.add_argument("ref", metavar="REF")
        p.add_argument("--policy", type=Path, metavar="FILE")
    _connection_flags(p)
    return p


def run_model_artifact(verb: str, args: list[str]) -> int:
    from manager import transfer

    o = model_artifact_parser(verb).parse_args(args)
    if verb == "push":
        card = _model_card(Path(o.weights), o.name, o.version, o.license)
        _print_copy(
            f"pushed model {o.name} to {o.ref}", transfer.model_push(o.weights, o.ref, card, _connection(o), key=o.key)
        )
    else:
        for path in transfer.model_pull(o.ref, _connection(o), policy_file=o.policy):
            print(path)
    return 0


def _print_copy(what: str, result: Any) -> None:
    print(f"{what}: {result.digest}")
    print(
        f"  blobs: {result.blobs_copied} copied, {result.blobs_skipped} already there, {result.blobs_mounted} mounted"
    )
    for name in result.attachments:
        print(f"  with {name}")


def run_registry(o: argparse.Namespace) -> int:
    from manager import transfer

    if o.command == "registry":
        if o.registry_verb == "logout":
            print(f"logged out of {o.registry}" if transfer.logout(o.registry) else f"not logged in to {o.registry}")
            return 0
        password = (
            sys.stdin.readline().rstrip("\n") if o.password_stdin else getpass.getpass(f"password for {o.username}: ")
        )
        transfer.login(o.registry, o.username, password, _connection(o))
        print(f"login succeeded: {o.registry}")
        return 0
    if o.command == "push":
        _print_copy(f"pushed {o.image} to {o.ref}", transfer.push(o.image, o.ref, _connection(o), policy_file=o.policy))
        return 0
    if o.command == "pull":
        pulled = transfer.pull(o.ref, _connection(o), policy_file=o.policy)
        _print_copy(f"pulled and verified {pulled.name}", pulled.copied)
        return 0
    if o.command == "mirror":
        _print_copy(f"mirrored {o.source} to {o.destination}", transfer.mirror(o.source, o.destination, _connection(o)))
        return 0
    if o.chart_verb == "push":
        _print_copy(f"pushed chart {o.chart}", transfer.chart_push(o.chart, o.ref, _connection(o), key=o.key))
    else:
        print(transfer.chart_pull(o.ref, o.version, _connection(o), policy_file=o.policy))
    return 0


def _model_card(weights: Path, name: str, version: str, license: str) -> Any:
    from manager.cache import open_store
    from manager.sbom_model import quantization_name
    from registry.modelpack import ModelCard
    from runtime.gguf import read_gguf

    path = open_store().path(str(weights)) if str(weights).startswith("sha256:") else weights
    try:
        with read_gguf(path) as f:
            family = str(f.get("general.architecture"))
            quant = quantization_name(f.get("general.file_type"))
    except OSError as e:
        from manager.transfer import TransferError

        raise TransferError(f"{weights}: cannot read the weights: {e.strerror or e}") from None
    return ModelCard(name=name, version=version, family=family, quantization=quant, licenses=(license,))

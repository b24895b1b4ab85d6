"""The ``llmctl`` command: parses arguments, hands the work to one place, prints errors on one line.

For now the only verbs are ``llmctl model info FILE`` and ``llmctl model generate ...``, which
delegate to the runtime's own command line (``python -m runtime``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

PROG = "llmctl"
MODEL_VERBS = ("info", "generate")


def version() -> str:
    """The installed distribution's version, or ``0+unknown`` when running from an uninstalled tree."""
    try:
        return metadata.version("llmctl")
    except metadata.PackageNotFoundError:
        return "0+unknown"


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
        help="inspect a GGUF model file or generate text with it",
        description="Inspect a GGUF model file or generate text with it (llmctl's own runtime).",
    )
    model.add_argument("verb", choices=MODEL_VERBS, help="what to do with the model")
    model.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="...",
        help="arguments for the verb (see: llmctl model VERB --help)",
    )
    return parser


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

    from runtime.errors import ModelError

    # "model" is the only command so far.
    try:
        return run_model(options.verb, options.args, debug=options.debug)
    except ModelError as exc:
        if options.debug:
            raise
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if options.debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

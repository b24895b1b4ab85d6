"""What the end-to-end release tests share: an llmctl home with a signing key and the demo image
already built (so each test only copies it), the demo chart's weights, and running `llmctl` in-process.

Each module makes one prepared home (`prepared_home`, in a module-scoped fixture), and each test a copy
of it (`home_copy`) whose releases are uninstalled afterwards, so no model server outlives its test.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from manager import base_image, cli, keys
from manager.releases import ReleaseStore
from runtime.testing.make_model import make_model

CACHE = Path.home() / ".cache" / "llmctl"


def demo_weights(directory: Path) -> tuple[Path, str]:
    """The demo chart's generated weights (tiny, Q8_0, seed 1) and their `sha256:<hex>`."""
    weights = make_model(directory / "demo.gguf", preset="tiny", wtype="q8_0", seed=1)
    return weights, "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()


def demo_sets(weights: Path, digest: str) -> list[str]:
    """The --set flags that point the demo chart at `weights`."""
    return ["--set", f"weights.path={weights}", "--set", f"weights.sha256={digest}"]


def new_home(directory: Path) -> Path:
    """An empty llmctl home sharing this machine's cached base rootfs (built once per machine)."""
    base_image.cached_rootfs(CACHE / "base-rootfs", deb_cache=CACHE / "debs", allow_newer=True)
    home = directory / "home"
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "base-rootfs").symlink_to(CACHE / "base-rootfs")
    return home


@contextmanager
def prepared_home(directory: Path, password: str, sets: list[str]) -> Iterator[Path]:
    """A new home with the default key whose local store already holds the demo image (built by an
    install with the process driver, then uninstalled); LLMCTL_HOME points at it while in use."""
    home = new_home(directory)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMCTL_HOME", str(home))
        mp.setenv("LLMCTL_KEY_PASSWORD", password)
        keys.generate()
        assert cli.main(["install", "prepare", "demo", *sets, "--driver", "process"]) == 0
        assert cli.main(["uninstall", "prepare"]) == 0
        yield home


def home_copy(prepared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str) -> Iterator[Path]:
    """A test's own copy of a prepared home (for `yield from` in a fixture); its releases are
    uninstalled at the end."""
    copy = tmp_path / "home"
    shutil.copytree(prepared, copy, symlinks=True)
    monkeypatch.setenv("LLMCTL_HOME", str(copy))
    monkeypatch.setenv("LLMCTL_KEY_PASSWORD", password)
    yield copy
    for rev in ReleaseStore().list():
        cli.main(["uninstall", rev.name])


def llmctl(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run `llmctl ARGS` in-process: (exit code, stdout, stderr); never a traceback."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """stdout of an `llmctl` run that must succeed."""
    code, out, err = llmctl(capsys, *args)
    assert code == 0, err
    return out


def fails(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one-line error of an `llmctl` run that must fail with exit 1."""
    code, out, err = llmctl(capsys, *args)
    assert code == 1, out
    last = err.strip().splitlines()[-1]
    assert last.startswith("llmctl: error: ")
    return last

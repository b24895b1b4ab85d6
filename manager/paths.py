"""Where llmctl keeps its files: XDG base directories, or one tree under ``$LLMCTL_HOME``.

Without ``LLMCTL_HOME`` the directories follow the XDG base directory spec
(``$XDG_CONFIG_HOME/llmctl``, ``$XDG_DATA_HOME/llmctl``, ``$XDG_CACHE_HOME/llmctl``, defaulting to
``~/.config``, ``~/.local/share`` and ``~/.cache``). With it set, everything lives under
``$LLMCTL_HOME/{config,data,cache}`` (tests point it at a temporary directory).
"""

from __future__ import annotations

import os
from pathlib import Path

APP = "llmctl"


def _home() -> Path | None:
    value = os.environ.get("LLMCTL_HOME")
    return Path(value).expanduser() if value else None


def _xdg(variable: str, default: str) -> Path:
    value = os.environ.get(variable)
    base = Path(value).expanduser() if value and Path(value).is_absolute() else Path.home() / default
    return base / APP


def config_dir() -> Path:
    """User configuration (keys, policy, defaults)."""
    home = _home()
    return home / "config" if home else _xdg("XDG_CONFIG_HOME", ".config")


def data_dir() -> Path:
    """Persistent state (release records, audit log)."""
    home = _home()
    return home / "data" if home else _xdg("XDG_DATA_HOME", ".local/share")


def cache_dir() -> Path:
    """Re-creatable data (the weights blob store); safe to delete."""
    home = _home()
    return home / "cache" if home else _xdg("XDG_CACHE_HOME", ".cache")

"""Where a result came from: this package's version and the git commit of its source."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def package_version() -> str | None:
    try:
        return version("ddpm-schedules")
    except PackageNotFoundError:
        return None


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout this package runs from (+ "-dirty" with uncommitted changes); None outside git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "") if commit else None

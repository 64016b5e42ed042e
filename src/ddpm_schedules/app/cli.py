"""What the entry points share: a bad input ends in one line naming the value and the fix, not a traceback."""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

from hydra.errors import InstantiationException

from ddpm_schedules.storage.resume import Preempted


def user_error(e: BaseException) -> ValueError | None:
    """The ValueError behind an exception (Hydra wraps the ones raised while instantiating)."""
    while e is not None:
        if isinstance(e, ValueError):
            return e
        e = e.__cause__ or e.__context__
    return None


def run(fn: Callable[[Any], dict[str, float]], cfg: Any) -> dict[str, float]:
    """Call ``fn(cfg)``; a bad input is printed as one line and exits with status 2 (HYDRA_FULL_ERROR=1 re-raises)."""
    try:
        return fn(cfg)
    except Preempted as e:  # already logged with where the partial sums are
        sys.exit(e.code)
    except (ValueError, InstantiationException) as e:
        cause = user_error(e)
        if cause is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2)

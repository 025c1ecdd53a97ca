"""One exception type for user-facing errors, and the helper every CLI uses to print them as one line."""
from __future__ import annotations

import sys
from typing import Callable


class CloverError(Exception):
    """An error caused by bad input (a path, a flag, a file); its message says what is wrong and how to fix it."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point: a CloverError becomes one `error: ...` line on stderr and exit status 2."""
    try:
        main()
    except CloverError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None

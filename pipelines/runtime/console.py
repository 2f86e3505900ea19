"""What a run prints: prefsift's own stage lines go to stderr with one prefix."""

from __future__ import annotations

import sys


def say(msg: str) -> None:
    print(f"[prefsift] {msg}", file=sys.stderr, flush=True)

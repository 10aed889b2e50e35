"""``derpfleet``: the operator's command line (being built; see issue 5)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("derpfleet: the operator is not built yet", file=sys.stderr)
    return 2

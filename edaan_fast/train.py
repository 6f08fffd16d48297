"""``python -m edaan_fast.train``: train EDAAN source -> target and report target metrics."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    sys.stderr.write(
        "edaan_fast.train: the trainer is not yet available in this version of edaan_fast; "
        "the fused operators (edaan_fast.ops) are.\n"
    )
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The coordinator's SuperLink (``python -m safn.server.superlink_main``).

`safn-server` starts this module instead of the bare ``flower-superlink`` console script: the
same SuperLink (same arguments, same APIs), with safn's SuperLink patches applied first
(`safn_flower.patches.superlink`: a site's pull that finds no work is held until work comes).
``SAFN_HELD_PULL_S`` sets how long (seconds, default `HOLD_S`; 0 keeps Flower's immediate
answer, for comparisons: benchmarks/net_overhead.py).
"""

from __future__ import annotations

import os
import sys

HELD_PULL_ENV = "SAFN_HELD_PULL_S"


def main() -> None:
    from safn_flower.patches import superlink as patches

    patches.prepare(float(os.environ.get(HELD_PULL_ENV, patches.HOLD_S)))
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *sys.argv[1:]]
    flower_superlink()


if __name__ == "__main__":
    main()

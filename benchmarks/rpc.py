"""Many small messages, group commit on and off: now the ``small`` section of benchmarks.run.

    python -m benchmarks.rpc [--rounds 2] [--each 300] [--quick]

Kept as a shortcut for the comparison it used to run on its own: it runs

    python -m benchmarks.run --only small --variant "without group commit=yamux-group-commit" --rounds R

(64-byte request/response on 1 and 20 clients, plus the section's Redis and
tunnel-opening cases, peerup as shipped and with ``PEERUP_PATCHES_OFF=
yamux-group-commit``, rounds alternating). Results go into
benchmarks/results/latest.json (``small``) and docs/performance.md; the
variant table there replaces the old rpc.json table.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import run

VARIANT = "without group commit=yamux-group-commit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.rpc", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per variant (default 2)")
    parser.add_argument("--each", type=int, help="64-byte round trips per client with 20 clients (default 300)")
    parser.add_argument("--quick", action="store_true", help="small sizes (writes latest-quick.json)")
    args = parser.parse_args(argv)
    forward = ["--only", "small", "--variant", VARIANT, "--rounds", str(max(1, args.rounds))]
    if args.each:
        forward += ["--echo-each", str(max(10, args.each))]
    if args.quick:
        forward.append("--quick")
    return run.main(forward)


if __name__ == "__main__":
    sys.exit(main())

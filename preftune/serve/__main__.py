"""``python -m preftune.serve [--host H] [--port P]``: the server without the rest of the CLI.

Used by tests and benchmarks to start a server process; ``preftune serve`` does the same.
"""

from __future__ import annotations

import argparse
import sys

from preftune.errors import PreftuneError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preftune.serve", description="Run the preftune feedback service.")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    from preftune.serve.server import run_server

    try:
        run_server(host=args.host, port=args.port)
    except PreftuneError as err:
        print(f"error: {err.message}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())

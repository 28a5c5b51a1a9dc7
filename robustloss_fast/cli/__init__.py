"""The command line: ``python -m robustloss_fast`` / ``robustloss-fast``.

Subcommands:

* ``bench``: time the fused kernels on this machine against ``F.cross_entropy``
  and DM written in plain PyTorch (eager and compiled);
* ``plot``: draw the emphasis density functions w(p) of any schemes;
* ``demo``: train a small MLP on noisy digit labels with CCE, MAE, GCE, IMAE
  and DM and compare how much of the noise each one memorises.

User errors (bad arguments, a missing optional dependency) print one message
and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from ._common import CLIError, parse_scheme

__all__ = ["main", "build_parser", "parse_scheme", "CLIError"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from . import bench, demo, plot

    ap = argparse.ArgumentParser(
        prog="robustloss-fast",
        description=(
            "robustloss_fast: fused DM / IMAE robust losses, a drop-in for cross-entropy that "
            "resists label noise. Try: 'robustloss-fast demo' (noisy-label training, ~1 min on CPU), "
            "'robustloss-fast plot' (what each loss emphasises), 'robustloss-fast bench' (speed here)."
        ),
        epilog="Run 'robustloss-fast COMMAND --help' for a command's options.",
    )
    ap.add_argument("--version", action="version", version=f"robustloss_fast {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND")
    bench.add_parser(sub)
    plot.add_parser(sub)
    demo.add_parser(sub)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage error or missing extra)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help/--version (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"robustloss-fast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly; point stdout at
        # devnull so the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1

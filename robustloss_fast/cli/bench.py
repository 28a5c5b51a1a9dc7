"""``robustloss-fast bench``: this machine's kernels against F.cross_entropy and plain-PyTorch DM."""

from __future__ import annotations

import argparse
import re
from typing import List

import torch

from ._common import CLIError, Progress, positive_int, require

_DTYPES = ("float32", "float16", "bfloat16", "float64")


def parse_shapes(text: str):
    """``"256x10:float32,64x1000"`` -> [Case(256, 10, "float32"), Case(64, 1000, "float32")]."""
    from .._bench import Case

    cases = []
    for item in text.split(","):
        item = item.strip()
        m = re.fullmatch(r"(\d+)\s*[xX]\s*(\d+)(?::\s*(\w+))?", item)
        if m is None:
            raise argparse.ArgumentTypeError(
                f"bad shape {item!r}: write NxC or NxC:dtype, comma-separated, e.g. '256x10:float32,64x1000'"
            )
        n, c, dtype = int(m.group(1)), int(m.group(2)), m.group(3) or "float32"
        if n < 1 or c < 2:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: need N >= 1 rows and C >= 2 classes")
        if dtype not in _DTYPES:
            raise argparse.ArgumentTypeError(f"bad dtype {dtype!r} in {item!r}; choose one of {', '.join(_DTYPES)}")
        cases.append(Case(n, c, dtype))
    return cases


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_parser(sub) -> None:
    ap = sub.add_parser(
        "bench",
        help="time the loss kernels on this machine against F.cross_entropy and plain-PyTorch DM",
        description=(
            "Time one forward + backward step of DM (lam=1, beta=8) with every backend that works here, "
            "against torch.nn.functional.cross_entropy and DM written in PyTorch (eager and "
            "torch.compile'd), and measure peak extra memory. Prints a table at the end. "
            "Default: the quick shapes for the device found; --full for all shapes (minutes)."
        ),
        epilog="example: robustloss-fast bench --json bench.json --png bench.png",
    )
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the quick shapes (the default)")
    size.add_argument("--full", action="store_true", help="all the shapes of the benchmark (minutes)")
    size.add_argument(
        "--shapes",
        type=parse_shapes,
        metavar="NxC[:dtype],...",
        help="custom cases, e.g. '4096x10:float32,512x32000:bfloat16'",
    )
    ap.add_argument("--device", default=None, help="cpu or cuda[:i] (default: cuda if available, else cpu)")
    ap.add_argument(
        "--variants",
        metavar="NAME,...",
        help="comma-separated subset of the variants (default: all that run here; see --list)",
    )
    ap.add_argument("--list", action="store_true", help="list the variants available on the device and exit")
    ap.add_argument("--repeats", type=positive_int, default=15, help="timed samples per variant (default: 15)")
    ap.add_argument("--warmup", type=positive_int, default=3, help="warm-up steps per variant (default: 3)")
    ap.add_argument("--json", metavar="PATH", help="write the full result as JSON")
    ap.add_argument("--png", metavar="PATH", help="write a speedup / memory chart (needs matplotlib)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement (faster)")
    ap.set_defaults(func=run)


def _device(text) -> str:
    name = text or default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"unknown device {name!r}; use cpu or cuda")
    if dev.type not in ("cpu", "cuda"):
        raise CLIError(f"bench runs on cpu or cuda, got {name!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"device {name!r} asked for, but torch.cuda.is_available() is False here")
    return str(dev)


def run(args: argparse.Namespace) -> int:
    from .. import _bench

    device = _device(args.device)
    available: List[str] = _bench.available_variants(device)
    if args.list:
        print("\n".join(available))
        return 0
    if args.png:
        require(["matplotlib"], "plot", "robustloss-fast bench --png")
    variants = None
    if args.variants:
        variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        everything = _bench.available_variants(device, include_reference=True)
        allowed = available + [v for v in everything if v not in available]
        bad = [v for v in variants if v not in allowed]
        if bad or not variants:
            raise CLIError(
                f"unknown or unavailable variant(s) {', '.join(map(repr, bad)) or '(none given)'} on {device}; "
                f"choose from: {', '.join(allowed)}"
            )
    if args.shapes:
        cases = args.shapes
    else:
        cases = _bench.default_cases(device, quick=not args.full)
    print(
        f"benchmarking {len(cases)} case(s) x {len(variants or available)} variant(s) on {device}: "
        + ", ".join(c.label for c in cases),
        flush=True,
    )
    result = _bench.run(
        cases,
        variants=variants,
        device=device,
        repeats=args.repeats,
        warmup=args.warmup,
        progress=Progress("bench"),
        measure_memory=not args.no_memory,
    )
    print(_bench.format_table(result))
    if args.json:
        _bench.write_json(result, args.json)
        print(f"wrote {args.json}")
    if args.png:
        _bench.write_png(result, args.png)
        print(f"wrote {args.png}")
    return 0

"""``robustloss-fast plot``: emphasis density functions w(p) (DM paper, Fig. 1b)."""

from __future__ import annotations

import argparse
from typing import List, Sequence

import torch

from .. import analysis
from ..schemes import Scheme
from ._common import CLIError, parse_scheme, require, scheme_arg, scheme_name

DEFAULT_SCHEMES = ("CCE", "MAE", "GCE(q=0.7)", "IMAE(T=8)", "DM(lam=0.5,beta=16)", "DM(lam=2,beta=16)")


def log_emphasis(scheme: Scheme, p: torch.Tensor) -> torch.Tensor:
    """log w(p) of ``scheme`` at probabilities ``p`` (float64), from the kernels' own row pass."""
    if scheme.two_term:
        raise CLIError(
            f"{scheme_name(scheme)} depends on the whole distribution, not on p alone: it has no emphasis w(p) to plot"
        )
    return analysis.log_emphasis(scheme, p)


def emphasis_curves(schemes: Sequence[Scheme], points: int = 1001, normalise: str = "max"):
    """(p, [w_s(p) normalised]) on an even grid of [0, 1].

    ``normalise="max"`` scales each curve to a peak of 1 (the shapes compare
    directly); ``"area"`` makes each integrate to 1 over [0, 1] (a density in
    p, as the name "emphasis density function" suggests), by the trapezoid rule.
    """
    p = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
    curves = []
    for s in schemes:
        lw = log_emphasis(s, p)
        # Shift by the largest log-weight before exp: exp(beta ...) overflows for large beta.
        w = torch.exp(lw - lw.max())
        if normalise == "area":
            w = w / torch.trapezoid(w, p)
        curves.append(w)
    return p, curves


def write_plot(schemes: Sequence[Scheme], path: str, normalise: str = "max", title: str = "") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p, curves = emphasis_curves(schemes, normalise=normalise)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for s, w in zip(schemes, curves):
        (line,) = ax.plot(p.numpy(), w.numpy(), lw=1.8, label=scheme_name(s))
        psi = s.emphasis_mode
        if psi is not None:
            lw_all = log_emphasis(s, p)
            lw_psi = log_emphasis(s, torch.tensor([psi], dtype=torch.float64))
            y = float(torch.exp(lw_psi - lw_all.max()))
            if normalise == "area":
                y /= float(torch.trapezoid(torch.exp(lw_all - lw_all.max()), p))
            ax.plot([psi], [y], "o", color=line.get_color(), ms=6)
            ax.axvline(psi, color=line.get_color(), lw=0.6, ls=":")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("p  (probability of the labelled class)")
    ax.set_ylabel("normalised emphasis w(p)" + (" (peak = 1)" if normalise == "max" else " (area = 1)"))
    ax.set_title(title or "Emphasis density functions; dots: emphasis mode psi", fontsize=10)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)


def add_parser(sub) -> None:
    ap = sub.add_parser(
        "plot",
        help="plot the emphasis density functions w(p) of schemes to a PNG",
        description=(
            "Plot how much each scheme emphasises an example as a function of p, the probability "
            "the model gives its label (DM paper, Fig. 1b). CCE emphasises hard examples (p near 0, "
            "often mislabelled), MAE only middling ones; DM moves the mode psi = lam/(lam+1). "
            "Needs matplotlib: pip install 'robustloss_fast[plot]'."
        ),
        epilog="example: robustloss-fast plot CCE MAE 'IMAE(T=8)' 'DM(lam=1,beta=16)' --out emphasis.png",
    )
    ap.add_argument(
        "schemes",
        nargs="*",
        type=scheme_arg,
        metavar="SCHEME",
        help=f"schemes as NAME or NAME(key=value,...) (default: {' '.join(DEFAULT_SCHEMES)})",
    )
    ap.add_argument("--out", "-o", default="emphasis.png", help="PNG file to write (default: %(default)s)")
    ap.add_argument(
        "--normalise",
        choices=("max", "area"),
        default="max",
        help="scale each curve to peak 1 (max) or to area 1 over [0, 1] (area); default: %(default)s",
    )
    ap.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require(["matplotlib"], "plot", "robustloss-fast plot")
    schemes: List[Scheme] = list(args.schemes) or [parse_scheme(s) for s in DEFAULT_SCHEMES]
    write_plot(schemes, args.out, normalise=args.normalise)
    width = max(len(scheme_name(s)) for s in schemes)
    print(f"{'scheme'.ljust(width)}  emphasis mode psi")
    for s in schemes:
        psi = s.emphasis_mode
        print(f"{scheme_name(s).ljust(width)}  {'no unique maximum' if psi is None else f'{psi:.3f}'}")
    print(f"wrote {args.out}")
    return 0

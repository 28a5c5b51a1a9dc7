"""``robustloss-fast demo``: robust losses against label noise, on scikit-learn's digits.

The setting of the papers (Wang et al., IMAE and DM), scaled down to a CPU
minute: a small MLP on the 8x8 handwritten digits that ship inside
scikit-learn (1797 images, 10 classes; no download), with symmetric label
noise on the training set: each training label is, independently with
probability r, moved to a class drawn uniformly from the other 9. The test
labels stay clean. Every scheme trains an identical network (same
initialisation, same batch order) through ``robust_cross_entropy``.

"Memorised" is the share of the noisy training examples whose prediction is
their (wrong) noisy label: a loss that fits the noise drives it towards 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
from typing import Callable, Dict, List, Optional, Sequence

import torch

from ..backends import available_backends
from ..functional import robust_cross_entropy
from ..schemes import Scheme
from ._common import CLIError, parse_scheme, positive_int, require, scheme_arg, scheme_name

DEFAULT_SCHEMES = ("CCE", "MAE", "GCE(q=0.7)", "IMAE(T=8)", "DM(lam=1,beta=16)")
N_TRAIN = 1200  # of 1797; the remaining 597 are the clean test set
# Tuned so that the effects of the papers show within about a minute on 2 cores (see docs).
DEFAULT_EPOCHS = 100
DEFAULT_LR = 1e-3
DEFAULT_WD = 0.0


def load_data(seed: int, noise: float):
    """Digits scaled to [0, 1], a fixed train/test split and symmetric noise on the train labels.

    Returns (x_train, noisy_train, clean_train, flipped mask, x_test, y_test).
    """
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    tr, te = perm[:N_TRAIN], perm[N_TRAIN:]
    y_tr = y[tr]
    k = int(y.max()) + 1
    flipped = torch.rand(len(y_tr), generator=g) < noise
    # A uniform *other* class: shift by 1..k-1 modulo k.
    shifted = (y_tr + torch.randint(1, k, y_tr.shape, generator=g)) % k
    noisy = torch.where(flipped, shifted, y_tr)
    return x[tr], noisy, y_tr, flipped, x[te], y[te]


def make_model(hidden: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial network for every scheme
    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(hidden, 10),
    )


@contextlib.contextmanager
def _reproducible(threads: int):
    """Fixed thread count and deterministic kernels for the block, restored afterwards."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def train(
    schemes: Sequence[Scheme],
    *,
    epochs: int,
    noise: float,
    seed: int = 0,
    hidden: int = 256,
    lr: float = DEFAULT_LR,
    weight_decay: float = DEFAULT_WD,
    batch_size: int = 64,
    backend: str = "auto",
    on_epoch: Optional[Callable[[int, Dict[str, Dict[str, float]]], None]] = None,
) -> Dict:
    """Train one network per scheme in lockstep; returns the per-epoch curves and the settings.

    Adam with a cosine learning-rate decay to 0. Adam keeps the comparison
    about where each scheme puts its emphasis, not about its gradient scale
    (derivative normalisation gives DM a batch gradient of L1 norm 1, CCE's
    shrinks as it fits). Every scheme uses its default reduction
    (loss-defined: mean; DM/IMAE: derivative-normalised mean).
    """
    x_tr, noisy, clean, flipped, x_te, y_te = load_data(seed, noise)
    names = [scheme_name(s) for s in schemes]
    models = [make_model(hidden, seed) for _ in schemes]
    opts = [torch.optim.Adam(m.parameters(), lr=lr, weight_decay=weight_decay) for m in models]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs) for o in opts]
    hist = {n: {"test_acc": [], "memorised": [], "train_loss": []} for n in names}
    n = len(noisy)
    for epoch in range(epochs):
        # One batch order per epoch, shared by all schemes.
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        row = {}
        for name, s, model, opt, sched in zip(names, schemes, models, opts, scheds):
            model.train()
            total, count = 0.0, 0
            for i in range(0, n, batch_size):
                idx = order[i : i + batch_size]
                loss = robust_cross_entropy(model(x_tr[idx]), noisy[idx], s, backend=backend)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
                count += len(idx)
            sched.step()
            model.eval()
            with torch.no_grad():
                test_acc = float((model(x_te).argmax(1) == y_te).float().mean())
                pred = model(x_tr).argmax(1)
                memorised = float((pred[flipped] == noisy[flipped]).float().mean()) if bool(flipped.any()) else 0.0
            h = hist[name]
            h["test_acc"].append(test_acc)
            h["memorised"].append(memorised)
            h["train_loss"].append(total / count)
            row[name] = {"test_acc": test_acc, "memorised": memorised}
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
    return {
        "settings": {
            "dataset": "sklearn.datasets.load_digits (8x8, 10 classes)",
            "n_train": n,
            "n_test": len(y_te),
            "noise": noise,
            "noisy_train_labels": int(flipped.sum()),
            "seed": seed,
            "epochs": epochs,
            "model": f"MLP 64-{hidden}-{hidden}-10, ReLU",
            "optimiser": f"Adam lr={lr} weight_decay={weight_decay}, cosine decay to 0, batch {batch_size}",
            "backend": backend,
        },
        "schemes": names,
        "history": hist,
    }


def summary(result: Dict) -> List[Dict]:
    """Per scheme: best test accuracy (and its epoch), final test accuracy, final memorised share."""
    rows = []
    for name in result["schemes"]:
        h = result["history"][name]
        acc = h["test_acc"]
        best = max(range(len(acc)), key=lambda i: (acc[i], -i))
        rows.append(
            {
                "scheme": name,
                "best_test_acc": acc[best],
                "best_epoch": best + 1,
                "final_test_acc": acc[-1],
                "memorised": h["memorised"][-1],
            }
        )
    return rows


def format_summary(result: Dict) -> str:
    """The summary as a markdown table."""
    head = ["scheme", "best test acc (epoch)", "final test acc", "wrong labels memorised"]
    body = [
        [
            r["scheme"],
            "%.1f%% (%d)" % (100 * r["best_test_acc"], r["best_epoch"]),
            "%.1f%%" % (100 * r["final_test_acc"]),
            "%.1f%%" % (100 * r["memorised"]),
        ]
        for r in summary(result)
    ]
    widths = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    fmt = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in body])


def write_png(result: Dict, path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax_acc, ax_mem = fig.subplots(1, 2)
    for name in result["schemes"]:
        h = result["history"][name]
        epochs = range(1, len(h["test_acc"]) + 1)
        ax_acc.plot(epochs, [100 * a for a in h["test_acc"]], lw=1.5, label=name)
        ax_mem.plot(epochs, [100 * m for m in h["memorised"]], lw=1.5, label=name)
    st = result["settings"]
    ax_acc.set_title("test accuracy (clean labels)", fontsize=10)
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("%")
    ax_acc.legend(fontsize=8)
    ax_mem.set_title("noisy training labels memorised", fontsize=10)
    ax_mem.set_xlabel("epoch")
    ax_mem.set_ylabel("%")
    ax_mem.set_ylim(0, 100)
    fig.suptitle(
        f"digits, {100 * st['noise']:.0f}% symmetric label noise, {st['model']}, seed {st['seed']}", fontsize=10
    )
    fig.savefig(path, dpi=80)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 0.9], got {text!r}")
    if not 0.0 <= value <= 0.9 or math.isnan(value):
        # Above 0.9 symmetric noise on 10 classes leaves no majority of true labels.
        raise argparse.ArgumentTypeError(f"noise must be in [0, 0.9], got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}")
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text}")
    return value


def add_parser(sub) -> None:
    ap = sub.add_parser(
        "demo",
        help="train a small MLP on noisy digit labels with CCE, MAE, GCE, IMAE and DM",
        description=(
            "Train the same small MLP on scikit-learn's bundled handwritten digits (no download) "
            "with symmetric label noise, once per loss, and compare: best and final test accuracy, "
            "and how many wrong training labels each network ends up predicting (memorised). "
            "CPU only, seeded and deterministic. Needs scikit-learn and matplotlib: "
            "pip install 'robustloss_fast[demo]'."
        ),
        epilog="example: robustloss-fast demo --noise 0.4 --png demo.png",
    )
    ap.add_argument(
        "schemes",
        nargs="*",
        type=scheme_arg,
        metavar="SCHEME",
        help=f"losses to compare, as NAME or NAME(key=value,...) (default: {' '.join(DEFAULT_SCHEMES)})",
    )
    ap.add_argument("--noise", type=_fraction, default=0.4, help="symmetric label-noise rate r (default: %(default)s)")
    ap.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS, help="epochs (default: %(default)s)")
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the split, the noise, the init and the batch order (default: 0)"
    )
    ap.add_argument("--hidden", type=positive_int, default=256, help="hidden width of the MLP (default: %(default)s)")
    ap.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="Adam learning rate (default: %(default)s)")
    ap.add_argument("--weight-decay", type=_non_negative_float, default=DEFAULT_WD, help="Adam weight decay (default: %(default)s)")
    ap.add_argument("--batch-size", type=positive_int, default=64, help="batch size (default: %(default)s)")
    ap.add_argument(
        "--backend", default="auto", choices=("auto", "cpu", "torch"), help="robust_cross_entropy backend"
    )
    ap.add_argument("--png", default="demo.png", help="PNG of the curves (default: %(default)s)")
    ap.add_argument("--no-png", action="store_true", help="skip the PNG (then matplotlib is not needed)")
    ap.add_argument("--json", metavar="PATH", help="also write the per-epoch curves and the summary as JSON")
    ap.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (default 1, so that the results do not depend on the core count)",
    )
    ap.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require(["sklearn"] + ([] if args.no_png else ["matplotlib"]), "demo", "robustloss-fast demo")
    schemes = list(args.schemes) or [parse_scheme(s) for s in DEFAULT_SCHEMES]
    names = [scheme_name(s) for s in schemes]
    if args.backend != "auto" and args.backend not in available_backends():
        raise CLIError(f"backend {args.backend!r} is not available here; available: {', '.join(available_backends())}")
    if len(set(names)) != len(names):
        raise CLIError(f"each scheme may be given once, got {' '.join(names)}")
    col = max(13, *(len(n) for n in names))
    print(
        f"digits: {N_TRAIN} training images ({100 * args.noise:.0f}% labels noisy), "
        f"{1797 - N_TRAIN} clean test images; MLP 64-{args.hidden}-{args.hidden}-10, {args.epochs} epochs, seed {args.seed}",
        flush=True,
    )
    print(("epoch | " + " | ".join(n.ljust(col) for n in names)).rstrip(), flush=True)
    print(("      | " + " | ".join("test%  memo%".ljust(col) for _ in names)).rstrip(), flush=True)

    def on_epoch(epoch: int, row: Dict[str, Dict[str, float]]) -> None:
        cells = [f"{100 * row[n]['test_acc']:5.1f}  {100 * row[n]['memorised']:5.1f}".ljust(col) for n in names]
        print((f"{epoch:5d} | " + " | ".join(cells)).rstrip(), flush=True)

    with _reproducible(args.threads):
        result = train(
            schemes,
            epochs=args.epochs,
            noise=args.noise,
            seed=args.seed,
            hidden=args.hidden,
            lr=args.lr,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            backend=args.backend,
            on_epoch=on_epoch,
        )
    result["summary"] = summary(result)
    print()
    print(format_summary(result))
    print("memorised: share of the noisy training examples predicted as their wrong (noisy) label")
    if not args.no_png:
        write_png(result, args.png)
        print(f"wrote {args.png}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
        print(f"wrote {args.json}")
    return 0

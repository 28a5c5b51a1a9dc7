"""What the subcommands share: scheme specs, optional extras, the progress bar."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import sys
import time
from typing import Dict, List, Optional, TextIO

from .. import schemes as _schemes

# The names a spec may use: every concrete scheme class, nothing else.
SCHEMES: Dict[str, type] = {
    name: getattr(_schemes, name)
    for name in _schemes.__all__
    if isinstance(getattr(_schemes, name), type)
    and issubclass(getattr(_schemes, name), _schemes.Scheme)
    and getattr(_schemes, name) is not _schemes.Scheme
}


class CLIError(Exception):
    """A user error: printed as one message, exit status 2, no traceback."""


class MissingExtra(CLIError):
    """An optional dependency is not installed."""


def require(modules: List[str], extra: str, what: str) -> None:
    """Import ``modules`` or raise MissingExtra naming the pip command that installs them."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        pip_names = {"sklearn": "scikit-learn"}
        names = ", ".join(pip_names.get(m, m) for m in missing)
        raise MissingExtra(
            f"{what} needs {names}, which is not installed. Install it with:\n"
            f"    pip install 'robustloss_fast[{extra}]'"
        )


def _number(node: ast.AST, where: str):
    # Only literal numbers (optionally signed): a spec is data, never code.
    # Integer literals stay int (TaylorCE's order must be one).
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _number(node.operand, where)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    raise CLIError(f"{where}: expected a number, got {ast.unparse(node)!r}")


def _literal(node, where: str):
    """A number, or a quoted word (APL's active='nfl', passive='mae')."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    return _number(node, where)


def parse_scheme(spec: str) -> _schemes.Scheme:
    """A scheme from text such as ``DM(lam=1,beta=16)``, ``IMAE(T=8)``, ``GCE(0.7)`` or ``CCE``.

    The text is parsed as a Python expression tree and only a scheme name
    (case-insensitive) with literal numeric (or quoted word) arguments is
    accepted; nothing is evaluated.
    """
    text = spec.strip()
    known = ", ".join(SCHEMES)
    form = f"cannot parse scheme {spec!r}: write NAME or NAME(key=value, ...), e.g. 'DM(lam=1,beta=16)'"
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError:
        raise CLIError(form)
    if isinstance(tree, ast.Name):
        func, args, keywords = tree, [], []
    elif isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name):
        func, args, keywords = tree.func, tree.args, tree.keywords
    else:
        raise CLIError(form)
    lookup = {k.lower(): v for k, v in SCHEMES.items()}
    cls = lookup.get(func.id.lower())
    if cls is None:
        raise CLIError(f"unknown scheme {func.id!r} in {spec!r}; known schemes: {known}")
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    if len(args) > len(fields):
        raise CLIError(
            f"{cls.__name__} takes at most {len(fields)} parameter(s) ({', '.join(fields) or 'none'}), got {len(args)}"
        )
    kwargs = {}
    for name, node in zip(fields, args):
        kwargs[name] = _literal(node, f"{cls.__name__} parameter {name}")
    for kw in keywords:
        if kw.arg is None or kw.arg not in fields:
            raise CLIError(
                f"{cls.__name__} has no parameter {kw.arg!r}; its parameters: {', '.join(fields) or 'none'}"
            )
        if kw.arg in kwargs:
            raise CLIError(f"{cls.__name__} parameter {kw.arg} given twice in {spec!r}")
        kwargs[kw.arg] = _literal(kw.value, f"{cls.__name__} parameter {kw.arg}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"invalid scheme {spec!r}: {exc}")


def scheme_arg(spec: str) -> _schemes.Scheme:
    """argparse ``type=``: a bad spec becomes argparse's usage error (exit status 2)."""
    try:
        return parse_scheme(spec)
    except CLIError as exc:
        raise argparse.ArgumentTypeError(str(exc))


def scheme_name(scheme: _schemes.Scheme) -> str:
    """Compact label: ``DM(lam=1, beta=16)``, ``CCE``."""
    fields = [f.name for f in dataclasses.fields(scheme) if f.init]
    if not fields:
        return type(scheme).__name__
    def fmt(v):
        return repr(v) if isinstance(v, str) else f"{v:g}"

    return f"{type(scheme).__name__}({', '.join(f'{k}={fmt(getattr(scheme, k))}' for k in fields)})"


class Progress:
    """A plain-text progress bar on stderr (no dependency).

    On a terminal it redraws one line; elsewhere (logs, CI) it prints a line
    at most every ``every_s`` seconds and at the end, so logs stay short.
    """

    def __init__(self, title: str, stream: Optional[TextIO] = None, width: int = 28, every_s: float = 5.0):
        self.title = title
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.every_s = every_s
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.last = -float("inf")

    def __call__(self, done: int, total: int, label: str = "") -> None:
        now = time.monotonic()
        finished = done >= total
        if not self.tty and not finished and now - self.last < self.every_s:
            return
        self.last = now
        frac = 0.0 if total <= 0 else min(max(done / total, 0.0), 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        elapsed = now - self.t0
        eta = f", ~{elapsed / frac - elapsed:.0f}s left" if 0 < frac < 1 else ""
        line = f"{self.title} [{bar}] {done}/{total} {elapsed:.0f}s{eta} {label}"
        if self.tty:
            # Pad so a shorter line fully overwrites the previous one.
            self.stream.write("\r" + line.ljust(getattr(self, "_prev", 0)))
            self._prev = len(line)
            if finished:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value

"""The command line (``python -m robustloss_fast``): every subcommand at a tiny size.

Most tests call ``main(argv)`` in-process (a fresh interpreter costs seconds
of torch import); one runs the real ``python -m`` entry point. PNGs are
checked by decoding them, not just by their existence.
"""

import io
import json
import math
import os
import subprocess
import sys
import zlib

import pytest
import torch

import robustloss_fast as rl
from robustloss_fast.cli import main
from robustloss_fast.cli._common import CLIError, Progress, parse_scheme

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

try:
    import matplotlib  # noqa: F401

    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False
try:
    import sklearn  # noqa: F401

    HAVE_SKLEARN = True
except ImportError:
    HAVE_SKLEARN = False

needs_mpl = pytest.mark.skipif(not HAVE_MPL, reason="matplotlib (the [plot] extra) is not installed")
needs_demo = pytest.mark.skipif(
    not (HAVE_MPL and HAVE_SKLEARN), reason="scikit-learn and matplotlib (the [demo] extra) are not installed"
)


def png_size(path):
    """(width, height) of a PNG after checking its signature and every chunk's CRC."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind!r}"
        chunks.append(kind)
        if kind == b"IHDR":
            size = (int.from_bytes(body[0:4], "big"), int.from_bytes(body[4:8], "big"))
        pos += 12 + length
    assert chunks[0] == b"IHDR" and chunks[-1] == b"IEND" and b"IDAT" in chunks
    return size


# --------------------------------------------------------------------------- entry points and help


def test_python_dash_m_help():
    out = subprocess.run(
        [sys.executable, "-m", "robustloss_fast", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert out.returncode == 0, out.stderr
    for command in ("bench", "plot", "demo"):
        assert command in out.stdout


@pytest.mark.parametrize("command", ["bench", "plot", "demo"])
def test_subcommand_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"robustloss-fast {command}" in text and "--" in text


def test_no_command_prints_overview(capsys):
    assert main([]) == 0
    assert "demo" in capsys.readouterr().out


def test_console_script_points_at_main():
    # pyproject.toml declares robustloss-fast = robustloss_fast.__main__:main.
    from robustloss_fast import __main__ as entry

    assert entry.main is main


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["frobnicate"], "invalid choice"),
        (["plot", "Foo(x=1)"], "unknown scheme 'Foo'"),
        (["plot", "DM(lam=-1)"], "lam must be >= 0"),
        (["plot", "--normalise", "sideways"], "invalid choice"),
        (["demo", "--noise", "1.5"], "noise must be in [0, 0.9]"),
        (["demo", "--epochs", "0"], "positive integer"),
        (["demo", "CCE", "CCE"], "each scheme may be given once"),
        (["bench", "--shapes", "12y4"], "bad shape '12y4'"),
        (["bench", "--shapes", "8x4:int8"], "bad dtype 'int8'"),
        (["bench", "--variants", "no-such-variant"], "unknown or unavailable variant"),
        (["bench", "--quick", "--full"], "not allowed with"),
    ],
)
def test_bad_arguments_exit_2_with_message(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert "Traceback" not in err


def test_bench_cuda_without_cuda_is_a_clear_error(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA, so --device cuda is valid")
    assert main(["bench", "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, module, extra",
    [
        (["plot", "--out", "x.png"], "matplotlib", "plot"),
        (["demo", "--epochs", "1"], "sklearn", "demo"),
        (["demo", "--epochs", "1"], "matplotlib", "demo"),
        (["bench", "--png", "x.png"], "matplotlib", "plot"),
    ],
)
def test_missing_extra_names_the_pip_command(argv, module, extra, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"pip install 'robustloss_fast[{extra}]'" in err
    assert "Traceback" not in err
    assert not (tmp_path / "x.png").exists()


# --------------------------------------------------------------------------- scheme specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("CCE", rl.CCE()),
        ("cce", rl.CCE()),
        ("DM(lam=1,beta=16)", rl.DM(lam=1.0, beta=16.0)),
        (" DM( lam = 0.5 , beta = -2e1 ) ", rl.DM(lam=0.5, beta=-20.0)),
        ("DM(2, 4)", rl.DM(lam=2.0, beta=4.0)),
        ("IMAE(T=8)", rl.IMAE(T=8.0)),
        ("GCE(q=0.7)", rl.GCE(q=0.7)),
        ("DMNormal(psi=0.3,beta=5)", rl.DMNormal(psi=0.3, beta=5.0)),
        ("DMBeta(alpha=2,eta=3)", rl.DMBeta(alpha=2.0, eta=3.0)),
        ("DMExponential(beta=+3)", rl.DMExponential(beta=3.0)),
        ("MAE()", rl.MAE()),
    ],
)
def test_parse_scheme(spec, expected):
    assert parse_scheme(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "__import__('os').system('true')",
        "DM(lam=1+1)",
        "DM(lam=x)",
        "DM(lam='1')",
        "DM(lam=True)",
        "DM(foo=1)",
        "DM(lam=1, lam=2)",
        "DM(1, lam=2)",
        "DM(1, 2, 3)",
        "DM.lam",
        "DM(lam=1)(2)",
        "Scheme",
        "KERNEL_IDS",
        "GCE(q=2)",
        "DM(**{'lam': 1})",
    ],
)
def test_parse_scheme_rejects(spec):
    with pytest.raises(CLIError):
        parse_scheme(spec)


# --------------------------------------------------------------------------- plot


def test_emphasis_curve_peaks_at_emphasis_mode():
    from robustloss_fast.cli.plot import emphasis_curves

    lam = float(torch.empty(()).uniform_(0.2, 3.0))
    beta = float(torch.empty(()).uniform_(4.0, 30.0))
    psi = float(torch.rand(()))
    schemes = [
        rl.DM(lam=lam, beta=beta),
        rl.IMAE(T=beta),
        rl.DMNormal(psi=psi, beta=beta),
        rl.GCE(q=float(torch.empty(()).uniform_(0.1, 1.0))),
        rl.CCE(),
        rl.MAE(),
        rl.MSE(),
        rl.DMBeta(alpha=1 + lam, eta=1 + float(torch.empty(()).uniform_(0.2, 3.0))),
    ]
    points = 2001
    p, curves = emphasis_curves(schemes, points=points, normalise="max")
    for s, w in zip(schemes, curves):
        assert torch.isfinite(w).all(), s
        assert float(w.max()) == pytest.approx(1.0)
        assert float(p[w.argmax()]) == pytest.approx(s.emphasis_mode, abs=1.5 / (points - 1)), s
    _, areas = emphasis_curves(schemes, points=points, normalise="area")
    for w in areas:
        assert float(torch.trapezoid(w, p)) == pytest.approx(1.0, rel=1e-9)


@needs_mpl
def test_plot_writes_png(tmp_path, capsys):
    out = tmp_path / "sub dir" / "emph.png"
    out.parent.mkdir()
    assert main(["plot", "CCE", "IMAE(T=8)", "DM(lam=2,beta=16)", "DM(beta=0)", "--out", str(out)]) == 0
    width, height = png_size(out)
    assert width > 200 and height > 150
    text = capsys.readouterr().out
    assert "0.667" in text  # DM(lam=2): psi = 2/3
    assert "no unique maximum" in text  # DM(beta=0) weighs all examples alike


@needs_mpl
def test_plot_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "--normalise", "area"]) == 0
    png_size(tmp_path / "emphasis.png")


# --------------------------------------------------------------------------- demo


@needs_demo
def test_demo_noise_protocol():
    from robustloss_fast.cli.demo import load_data

    x_tr, noisy, clean, flipped, x_te, y_te = load_data(seed=int(torch.randint(0, 1000, ())), noise=0.4)
    assert x_tr.shape == (1200, 64) and x_te.shape == (597, 64)
    assert float(x_tr.max()) <= 1.0 and float(x_tr.min()) >= 0.0
    assert torch.equal(noisy[~flipped], clean[~flipped])
    assert (noisy[flipped] != clean[flipped]).all()  # moved to *another* class
    assert ((noisy >= 0) & (noisy < 10)).all()
    # Binomial(1200, 0.4): mean 480, sd 17; 6 sd either side.
    assert 380 <= int(flipped.sum()) <= 580
    # The other class is uniform over 9: every shift 1..9 occurs.
    shifts = ((noisy[flipped] - clean[flipped]) % 10).unique()
    assert shifts.tolist() == list(range(1, 10))


@needs_demo
def test_demo_two_epochs(tmp_path, capsys):
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    argv = ["demo", "--epochs", "2", "--hidden", "32", "--lr", "0.01", "--png", str(png), "--json", str(js)]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the demo restores global torch state
    assert not torch.are_deterministic_algorithms_enabled()
    text = capsys.readouterr().out
    assert "best test acc" in text and "wrong labels memorised" in text
    png_size(png)
    result = json.loads(js.read_text())
    assert result["schemes"] == ["CCE", "MAE", "GCE(q=0.7)", "IMAE(T=8)", "DM(lam=1, beta=16)"]
    for name in result["schemes"]:
        h = result["history"][name]
        assert len(h["test_acc"]) == len(h["memorised"]) == 2
        assert all(0.0 <= a <= 1.0 for a in h["test_acc"] + h["memorised"])
        assert all(math.isfinite(v) for v in h["train_loss"])
    # Two epochs of any of these losses beat chance (10%) on the clean test set.
    assert max(r["best_test_acc"] for r in result["summary"]) > 0.3

    # Seeded and deterministic: a second run gives the same curves.
    js2 = tmp_path / "again.json"
    argv2 = ["demo", "CCE", "DM(lam=1,beta=16)", "--epochs", "2", "--hidden", "32", "--lr", "0.01", "--no-png"]
    assert main(argv2 + ["--json", str(js2)]) == 0
    again = json.loads(js2.read_text())
    for name in again["schemes"]:
        assert again["history"][name] == result["history"][name]


# --------------------------------------------------------------------------- bench


def test_progress_bar_plain_text():
    buf = io.StringIO()
    bar = Progress("bench", stream=buf, every_s=3600)
    for i in range(1, 6):
        bar(i, 5, f"case {i}")
    lines = buf.getvalue().splitlines()
    # Not a terminal: the first call and the last are printed, the rest throttled.
    assert len(lines) == 2
    assert "1/5" in lines[0] and "5/5" in lines[1] and "#" * 28 in lines[1]


def test_bench_tiny(tmp_path, capsys):
    from robustloss_fast import _bench

    variants = [v for v in _bench.available_variants("cpu") if v != "compiled DM"]  # compiling takes ~10 s a case
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    argv = ["bench", "--device", "cpu", "--shapes", "64x10:float32,16x300", "--repeats", "2", "--warmup", "1"]
    argv += ["--variants", ",".join(variants), "--json", str(js)]
    if HAVE_MPL:
        argv += ["--png", str(png)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "64x10 fp32" in captured.out and "16x300 fp32" in captured.out
    assert "bench [" in captured.err  # the progress bar
    result = json.loads(js.read_text())
    assert [c["label"] for c in result["cases"]] == ["64x10 fp32", "16x300 fp32"]
    for case in result["cases"]:
        assert set(case["results"]) == set(variants)
        assert all(r["median_s"] > 0 for r in case["results"].values())
    if HAVE_MPL:
        png_size(png)


# --------------------------------------------------------------------------- emphasis_stats


def test_emphasis_stats_matches_definition():
    n, c = 37, 6
    x, y = torch.randn(n, c) * 3, torch.randint(0, c, (n,))
    y[torch.randperm(n)[:5]] = -100
    lam = float(torch.empty(()).uniform_(0.0, 3.0))
    beta = float(torch.empty(()).uniform_(-5.0, 20.0))
    scheme = rl.DM(lam=lam, beta=beta)
    stats = rl.emphasis_stats(x, y, scheme)

    keep = y != -100
    p = torch.softmax(x.double()[keep], 1).gather(1, y[keep][:, None]).squeeze(1)
    w = torch.exp(beta * p**lam * (1 - p))
    w = w / w.sum()
    assert stats.psi == scheme.emphasis_mode
    assert float(stats.sigma) == pytest.approx(float(((w - w.mean()) ** 2).mean()), rel=1e-4, abs=1e-12)
    assert torch.allclose(stats.w[keep].double(), w, rtol=1e-4, atol=1e-9)
    assert (stats.w[~keep] == 0).all()


def test_emphasis_stats_uniform_and_empty():
    x, y = torch.randn(9, 4), torch.randint(0, 4, (9,))
    flat = rl.emphasis_stats(x, y, rl.DM(beta=0.0))
    assert flat.psi is None and float(flat.sigma) == pytest.approx(0.0, abs=1e-12)
    assert rl.emphasis_stats(x, y, rl.IMAE(T=8)).psi == 0.5
    empty = rl.emphasis_stats(x, torch.full((9,), -100), rl.DM())
    assert math.isnan(float(empty.sigma))


def test_integer_parameters_stay_integers():
    from robustloss_fast.cli._common import parse_scheme

    assert parse_scheme("TaylorCE(order=3)") == rl.TaylorCE(order=3)
    assert parse_scheme("TaylorCE(3)") == rl.TaylorCE(3)
    assert parse_scheme("DM(lam=1,beta=16)") == rl.DM(lam=1.0, beta=16.0)

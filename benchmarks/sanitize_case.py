"""The cases compute-sanitizer runs (gpu_suite.sh's sanitize stage); public API only.

    python benchmarks/sanitize_case.py parity [--device cuda] [--backends cuda,triton]
    python benchmarks/sanitize_case.py bad-target --backend cuda [--device cuda]

``parity``: forward + backward of every fused GPU backend against the
pure-PyTorch reference (``backend="torch"``) over every launch layout of the
CUDA kernels (4 to 512 threads per row: C from 3 to 20001 in each dtype),
contiguous rows, rows misaligned by one element with a row stride of C + 1,
and a misaligned base pointer; three kinds of row pass (DM with the
normalised mean; CCE with label smoothing, the two-term pass; NFL, the focal
pass) with an ignored target in every case; then the fused linear layer over
several row chunks. Exit status 1 on any mismatch. Under memcheck and
racecheck the sanitizer's own count must be 0.

``bad-target``: one out-of-range target (C + 3), then a negative one (-5),
on one backend, in a process of its own: a library may report them on the
host (IndexError) or with a device-side assertion, after which the CUDA
context is gone. Either is "reported clearly" (exit status 0, and the line
``BAD-TARGET <value> reported: <how>``); a target that goes through
unreported exits 3. The sanitizer's job there is only that no kernel reads or
writes out of bounds on the way.

Run ``parity`` with PYTORCH_NO_CUDA_MEMORY_CACHING=1 under the sanitizer:
torch's caching allocator otherwise carves tensors out of large blocks, and an
access past the end of a tensor that stays inside its block is invisible to
memcheck. Not ``bad-target``: after a device-side assertion every cudaFree
fails, and without the cache torch frees through cudaFree in a destructor,
which throws and ends the process before the report is printed.
"""

from __future__ import annotations

import argparse
import sys

import torch

import robustloss_fast as rf

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# Packs of 16 bytes per row from 1 to 10001 whatever the dtype: every layout
# (4, 32, 128 and 512 threads per row) in each of the four dtypes.
CLASSES = [3, 37, 500, 3001, 20001]
TOL = {torch.float32: (1e-4, 1e-6), torch.float64: (1e-9, 1e-12), torch.bfloat16: (3e-2, 1e-3), torch.float16: (5e-3, 1e-4)}


def _schemes():
    s = rf.schemes
    out = [("DM mean", s.DM(), dict(reduction="mean")),
           ("CCE smoothing sum", s.CCE(), dict(reduction="sum", label_smoothing=0.1))]
    if hasattr(s, "NFL"):
        out.append(("NFL none", s.NFL(gamma=0.5), dict(reduction="none")))
    return out


def _layouts(n, c, dtype, device, gen):
    """The same logits three ways: contiguous, rows misaligned with stride C + 1, misaligned base."""
    base = (3 * torch.randn(n, c + 1, generator=gen)).to(dtype).to(device)
    yield "contiguous", base[:, :c].contiguous()
    yield "strided+misaligned rows", base[:, 1:]
    flat = torch.empty(n * c + 1, dtype=dtype, device=device)
    x = flat[1:].view(n, c)
    x.copy_(base[:, :c])
    yield "misaligned base", x


def _fwd_bwd(x, y, scheme, kw, backend, upstream):
    z = _same_strides(x)
    value = rf.robust_cross_entropy(z, y, scheme, backend=backend, **kw)
    # A random upstream gradient (one per row for "none"), the same for every backend.
    (value * upstream.to(value.device).reshape(value.shape)).sum().backward()
    return value.detach(), z.grad


def _same_strides(x):
    """A leaf with x's values, strides and misalignment (clone() would make it contiguous)."""
    buf = torch.empty(x.storage_offset() + x.stride(0) * x.shape[0], dtype=x.dtype, device=x.device)
    leaf = buf.as_strided(x.shape, x.stride(), x.storage_offset())
    with torch.no_grad():
        leaf.copy_(x)
    return leaf.requires_grad_(True)


def _close(got, ref, dtype):
    rtol, atol = TOL[dtype]
    got, ref = got.double().cpu(), ref.double().cpu()
    if got.shape != ref.shape:
        return False
    if not torch.equal(torch.isnan(got), torch.isnan(ref)):
        return False
    got, ref = got[~torch.isnan(ref)], ref[~torch.isnan(ref)]
    if ref.numel() == 0:
        return True
    return bool(torch.allclose(got, ref, rtol=rtol, atol=atol * max(1.0, float(ref.abs().max()))))


def parity(device, backends, quick=False):
    gen = torch.Generator().manual_seed(0)
    bad, checked = [], 0
    # quick: float32 and bfloat16 only, still every layout (racecheck's slower run; the CPU dry run)
    for dtype in DTYPES[:2] if quick else DTYPES:
        # progress, so that a run cut short by its time limit says how far it got
        print(f"PARITY {dtype}: {checked} cases so far", flush=True)
        for c in CLASSES:
            n = 37 if c < 100 else 5  # small C: rows of several blocks and a partial one
            y = torch.randint(0, c, (n,), generator=gen).to(device)
            y[1] = -100  # ignored
            for layout, x in _layouts(n, c, dtype, device, gen):
                for sname, scheme, kw in _schemes():
                    up = torch.rand(n if kw["reduction"] == "none" else (), generator=gen) + 0.5
                    ref_v, ref_g = _fwd_bwd(x.cpu(), y.cpu(), scheme, kw, "torch", up)
                    for backend in backends:
                        v, g = _fwd_bwd(x, y, scheme, kw, backend, up)
                        checked += 1
                        if not (_close(v, ref_v, dtype) and _close(g, ref_g, dtype)):
                            bad.append(f"{backend} {dtype} C={c} {layout} {sname}")
    # The fused linear layer: several row chunks, so the per-chunk views of the row ops run too.
    print(f"PARITY linear: {checked} cases so far", flush=True)
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
        h = (torch.randn(300, 64, generator=gen) / 8).to(dtype)
        w = torch.randn(1000, 64, generator=gen).to(dtype)
        y = torch.randint(0, 1000, (300,), generator=gen)
        y[::7] = -100
        for sname, scheme, kw in _schemes()[:2]:
            kw = {k: v for k, v in kw.items() if k != "label_smoothing"}
            grads = {}
            for backend in ["torch"] + list(backends):
                dev = "cpu" if backend == "torch" else device
                # detach(): a fresh leaf per backend (h.to("cpu") is h itself, and would stay one
                # requiring grad, so the CUDA copies made from it afterwards were not leaves)
                hh, ww = h.detach().to(dev).requires_grad_(True), w.detach().to(dev).requires_grad_(True)
                v = rf.linear_robust_cross_entropy(hh, ww, y.to(dev), scheme, chunk_size=128, backend=backend, **kw)
                v.sum().backward()
                grads[backend] = (v.detach(), hh.grad, ww.grad)
            for backend in backends:
                checked += 1
                # the linear layer's products round in the input dtype: compare at that precision
                tol_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float16
                if not all(_close(a, b, tol_dtype) for a, b in zip(grads[backend], grads["torch"])):
                    bad.append(f"linear {backend} {dtype} {sname}")
    if device == "cuda":
        torch.cuda.synchronize()
    for line in bad:
        print(f"PARITY MISMATCH {line}")
    print(f"PARITY {'ok' if not bad else 'FAILED'}: {checked - len(bad)} of {checked} cases match the reference")
    return 0 if not bad else 1


def bad_target(device, backend):
    gen = torch.Generator().manual_seed(1)
    n, c = 9, 100
    outcome = 0
    for value in (c + 3, -5):
        x = (3 * torch.randn(n, c, generator=gen)).to(device).requires_grad_(True)
        y = torch.randint(0, c, (n,), generator=gen).to(device)
        y[2] = value
        try:
            loss = rf.robust_cross_entropy(x, y, rf.schemes.DM(), backend=backend)
            loss.backward()
            if device == "cuda":
                torch.cuda.synchronize()
        except IndexError as exc:
            print(f"BAD-TARGET {value} reported: IndexError: {exc}", flush=True)
            continue
        except RuntimeError as exc:
            text = str(exc)
            if "device-side assert" in text or "CUDA error" in text:
                print(f"BAD-TARGET {value} reported: device-side assertion: {text.splitlines()[0]}", flush=True)
                print("BAD-TARGET the CUDA context is gone after a device-side assertion: no further values")
                return outcome
            print(f"BAD-TARGET {value} NOT reported clearly: RuntimeError: {text.splitlines()[0]}", flush=True)
            outcome = 4
            continue
        print(f"BAD-TARGET {value} NOT reported: the loss ran ({float(loss.detach())})", flush=True)
        outcome = 3
    return outcome


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case", choices=["parity", "bad-target"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", default="cuda,triton", help="parity: the backends to check, comma-separated")
    ap.add_argument("--backend", default="cuda", help="bad-target: the backend to feed them to")
    ap.add_argument("--quick", action="store_true", help="parity: float32 and bfloat16 only (every layout still)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_case: no CUDA device", file=sys.stderr)
        return 2
    available = rf.available_backends()
    if args.case == "parity":
        backends = [b for b in args.backends.split(",") if b]
        missing = [b for b in backends if b not in available]
        if missing:
            print(f"sanitize_case: backends {missing} are not available here (available: {available})", flush=True)
            return 2
        return parity(args.device, backends, args.quick)
    if args.backend not in available:
        print(f"sanitize_case: backend {args.backend!r} is not available here (available: {available})", flush=True)
        return 2
    return bad_target(args.device, args.backend)


if __name__ == "__main__":
    sys.exit(main())

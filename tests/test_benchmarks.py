"""The GPU suite's scripts work before a GPU ever sees them.

A GPU run is one call with no second chance, so everything it runs is run
here first, on the CPU: the suite's dry run of its benchmark and summary
stages (the JSON schema and the PNG are checked), the sanitizer cases on the
CPU backend, the Triton tile sweep under the interpreter, the verdicts on
sanitizer logs written to look like the real tool's, the parallel compile loop, the float64 reference the benchmark
checks every gradient against, and sass_counts.py's reading of a cuobjdump
listing.
"""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SUITE = BENCH / "gpu_suite.sh"
sys.path.insert(0, str(BENCH))

import bench_gpu  # noqa: E402
import suite_summary  # noqa: E402


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.update(PYTHON=sys.executable, **extra)
    return env


def test_suite_script_parses_and_refuses_unknown_stages():
    assert subprocess.run(["bash", "-n", str(SUITE)]).returncode == 0
    helped = subprocess.run(["bash", str(SUITE), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--dry-run" in helped.stdout
    wrong = subprocess.run(["bash", str(SUITE), "benchmark"], capture_output=True, text=True)
    assert wrong.returncode == 2 and "unknown argument" in wrong.stderr


def _check_variants(cases, names, where):
    assert cases, f"no {where} cases"
    for case in cases:
        assert set(case["variants"]) == set(names), (where, case["label"])
        for name, rec in case["variants"].items():
            if rec["status"] == "ok":
                assert rec["median_ms"] > 0 and rec["reps"] >= 2, (where, name)
                assert len(rec["round_medians_ms"]) == 2
            else:
                assert rec["status"] in ("skipped", "error") and rec["reason"], (where, name, rec)
                # a wrong call of a peer's API would show as one of these: never acceptable
                assert rec.get("exception") not in ("TypeError", "NameError", "UnboundLocalError"), (where, name, rec)


def test_suite_dry_run_bench_and_summary(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        ["bash", str(SUITE), "--dry-run", "setup", "bench", "fastexp", "summary"],
        env=_env(OUT=str(out), PEER_SITE=str(tmp_path / "site")),
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench_gpu.json", "bench_gpu.md", "bench_gpu.png", "logs.tar.gz", "summary.md"], files
    assert (out / "bench_gpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with tarfile.open(out / "logs.tar.gz") as tar:
        logs_all = tar.getnames()
        logs = {Path(n).name for n in logs_all}
    assert {"suite.log", "bench.log", "env.txt", "stages.tsv"} <= logs

    result = json.loads((out / "bench_gpu.json").read_text())
    assert result["schema"] == bench_gpu.SCHEMA and result["complete"] is True
    m = result["machine"]
    for key in ("date", "torch", "cuda", "triton", "python", "git", "source_digest", "gpu", "driver", "peers",
                "available_backends"):
        assert key in m, key
    assert m["dry_run"] is True and m["source_digest"] == bench_gpu.source_digest()
    names = result["variants"]
    assert names["logits"][: len(bench_gpu.LOGITS_VARIANTS)] == bench_gpu.LOGITS_VARIANTS
    assert names["linear"] == bench_gpu.LINEAR_VARIANTS
    _check_variants(result["logits"]["cases"], names["logits"], "logits")
    cross = result["cross_row"]["cases"]
    assert [case["rows"] for case in cross] == bench_gpu.CROSS_ROW_ROWS_DRY
    for case in cross:
        rec = case["backends"]["cpu"]
        assert rec["status"] == "ok" and rec["eager_ms"] > 0 and "graph_ms" not in rec, rec
    _check_variants(result["linear"]["cases"], names["linear"], "linear")
    logits = {name: rec for case in result["logits"]["cases"] for name, rec in case["variants"].items()}
    # What runs on any CPU must have run, and its gradient must match the float64 reference.
    for name in ("F.cross_entropy", "eager DM", "compile DM", "compile F.cross_entropy", "ours DM auto", "ours CCE auto"):
        assert logits[name]["status"] == "ok", (name, logits[name])
    for case in result["logits"]["cases"]:
        tol = 2e-2 if case["dtype"] == "bfloat16" else 1e-5
        for name in ("F.cross_entropy", "eager DM", "ours DM auto", "ours CCE auto"):
            rec = case["variants"][name]
            assert rec["grad_finite"] and rec["grad_rel_l1"] < tol, (case["label"], name, rec["grad_rel_l1"])
        assert case["copy"]["median_ms"] > 0
    assert logits["ours DM cuda"]["status"] == "skipped"  # no CUDA build here
    for case in result["linear"]["cases"]:
        ours = ("ours DM", "ours CCE", "ours DM hybrid", "ours CCE hybrid", "ours DM lean", "ours DM split",
                "ours DM 2048-row chunks")
        for name in ("eager CE", "eager DM", "compile CE") + ours:
            assert case["variants"][name]["status"] == "ok", (case["label"], name)
        for name in ours:
            rec = case["variants"][name]
            assert rec["grad_rel_l1_hidden"] < 2e-2 and rec["grad_rel_l1_weight"] < 2e-2, rec
        assert case["floor_ms"] > 0
    # After the timing, one profiled step per PROFILED_* variant: its largest ops (kernels on a GPU).
    profiles = {(p["part"], p["variant"]): p for p in result["profiles"]}
    assert set(profiles) == {("logits", v) for v in bench_gpu.PROFILED_LOGITS} | {
        ("linear", v) for v in bench_gpu.PROFILED_LINEAR}
    # Liger runs where the peers' wheels sit in .whl/ (ignored by git), else it is skipped, saying why.
    assert profiles[("logits", "Liger CE")]["status"] in ("ok", "skipped")
    for key in [("logits", "ours DM auto"), ("logits", "compile DM"), ("linear", "ours DM"), ("linear", "compile CE")]:
        prof = profiles[key]
        assert prof["status"] == "ok" and prof["top"] and prof["launches"] >= len(prof["top"]), (key, prof)
        assert prof["total_ms"] >= sum(k["ms"] for k in prof["top"]) - 1e-9 > 0
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary and "| bench | ok |" in summary and "#### Logits" in summary
    assert "#### Cross-row step alone" in summary and "#### Kernels of one step" in summary
    # The fastexp stage: its parity verdict and its numbers beside the benchmark's own for the same case.
    assert "| fastexp | ok |" in summary and "parity of that build: `PARITY ok" in summary
    ab = summary.split("## Fast exp A/B", 1)[1]
    assert re.search(r"\| 16x1000 bfloat16 \| ours DM auto \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", ab), ab
    assert "fastexp/bench_gpu.json" in " ".join(logs_all)


def test_sanitizer_cases_run_on_the_cpu_backend():
    bad = subprocess.run([sys.executable, str(BENCH / "sanitize_case.py"), "bad-target", "--device", "cpu", "--backend", "cpu"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 0, bad.stdout + bad.stderr
    assert bad.stdout.count("reported: IndexError") == 2 and "NOT reported" not in bad.stdout


def test_triton_tiles_dry_run_swaps_every_candidate(tmp_path):
    """Under the interpreter: every candidate runs (its tile asked for), and none changes the gradient."""
    pytest.importorskip("triton", reason="the Triton backend's tile sweep needs Triton")
    done = subprocess.run([sys.executable, str(BENCH / "triton_tiles.py"), "--dry-run", "--out", str(tmp_path)],
                          env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    cases = json.loads((tmp_path / "triton_tiles.json").read_text())["cases"]
    assert [c for c in cases if "error" in c] == []
    assert {str(c["rows_tile"]) for c in cases} > {"shipped"} and {str(c["backward_tile"]) for c in cases} > {"shipped"}
    assert all(c["grad_max_abs_diff_vs_shipped"] <= 1e-6 * c["grad_max_abs"] for c in cases)
    assert (tmp_path / "triton_tiles.md").read_text().count("\n| ") == len(cases)  # a line per case below the header


def _log(tmp_path, name, text):
    (tmp_path / f"sanitizer_{name}.log").write_text(text)


def test_sanitizer_verdicts_read_both_the_tool_and_the_program(tmp_path):
    ok_mem = "PARITY ok: 540 of 540 cases match the reference\n========= ERROR SUMMARY: 0 errors\nexit status: 0\n"
    _log(tmp_path, "memcheck_parity", ok_mem)
    _log(tmp_path, "racecheck_parity",
         "PARITY ok: 1 of 1\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 2 warnings)\nexit status: 0\n")
    _log(tmp_path, "memcheck_bad_target_cuda",
         "BAD-TARGET 103 reported: IndexError: target value 103 is out of bounds for 100 classes\n"
         "BAD-TARGET -5 reported: IndexError: target value -5 is out of bounds\n"
         "========= ERROR SUMMARY: 0 errors\nexit status: 0\n")
    _log(tmp_path, "memcheck_bad_target_triton",
         "BAD-TARGET 103 reported: device-side assertion: CUDA error: device-side assert triggered\n"
         "========= ERROR SUMMARY: 1 error\nexit status: 86\n")
    rows = {r["run"]: r for r in suite_summary.sanitizer_verdicts(tmp_path)}
    assert all(r["verdict"] == "ok" for r in rows.values()), rows
    assert rows["racecheck_parity"]["race_warnings"] == 2

    bad = tmp_path / "bad"
    bad.mkdir()
    _log(bad, "memcheck_parity", ok_mem.replace("0 errors", "3 errors"))
    _log(bad, "racecheck_parity", "PARITY ok\nexit status: -11\n")  # crashed before the tool's summary
    _log(bad, "memcheck_bad_target_cuda",
         "BAD-TARGET 103 reported: IndexError: ...\n"
         "========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 1 error\nexit status: 86\n")
    _log(bad, "memcheck_bad_target_triton", "BAD-TARGET 103 NOT reported: the loss ran (2.5)\nexit status: 3\n")
    _log(bad, "memcheck_parity_timeout", "exit status: 124\n")
    rows = {r["run"]: r for r in suite_summary.sanitizer_verdicts(bad)}
    assert all(r["verdict"] == "FAILED" for r in rows.values()), rows
    assert "3 memcheck errors" in rows["memcheck_parity"]["why"]
    assert "no RACECHECK SUMMARY" in rows["racecheck_parity"]["why"]
    assert "out-of-bounds" in rows["memcheck_bad_target_cuda"]["why"]
    assert "NOT reported" in rows["memcheck_bad_target_triton"]["why"]
    assert "time limit" in rows["memcheck_parity_timeout"]["why"]


@pytest.mark.parametrize("family", ["ce", "dm"])
def test_logits_reference_is_the_exact_gradient(family):
    z = (3 * torch.randn(37, 11, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, 11, (37,))
    if family == "ce":
        F.cross_entropy(z, y).backward()
        tol = 1e-12
    else:
        bench_gpu.eager_dm(z, y).backward()
        tol = 1e-5  # eager DM's 1e-6 in 2 (1 - p) + 1e-6
    ref = bench_gpu.LogitsReference(z.detach(), y, chunk_bytes=8 * 11 * 5)  # rows in chunks of 5
    err, finite = bench_gpu._rel_l1(z.grad, ref.chunks(family))
    assert finite and err < tol, err


# A cuobjdump listing in its real layout: one function with a two-load loop nested in a
# four-load loop, each closed by a backward branch (and one forward branch that closes nothing).
_SASS = """
\t\tFunction : _Z6kernelPf
\t.headerflags\t@"EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                 /* 0x0 */
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;       /* 0x0 */
        /*0020*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;  /* 0x0 */
        /*0030*/                   MUFU.EX2 R12, R4 ;                     /* 0x0 */
        /*0040*/                   LDG.E.128 R4, desc[UR4][R2.64+0x20] ;  /* 0x0 */
        /*0050*/                   LDG.E.128 R8, desc[UR4][R2.64+0x30] ;  /* 0x0 */
        /*0060*/              @!P0 FADD R13, R12, R4 ;                    /* 0x0 */
        /*0070*/              @P1 BRA 0x40 ;                              /* 0x0 */
        /*0080*/                   BRA 0xa0 ;                             /* 0x0 */
        /*0090*/                   BRA `(.L_x_3) 0x10 ;                   /* 0x0 */
        /*00a0*/                   EXIT ;                                 /* 0x0 */
"""


def test_sass_counts_finds_the_loops_and_counts_their_opcodes():
    import sass_counts

    fns = sass_counts.functions(_SASS)
    assert list(fns) == ["_Z6kernelPf"]
    ins = fns["_Z6kernelPf"]
    assert len(ins) == 11 and ins[6] == (0x60, "@!P0 FADD R13, R12, R4")
    assert sass_counts.opcode("@!P0 FADD R13, R12, R4") == "FADD"
    # Innermost first; the forward BRA 0xa0 closes no loop.
    spans = [(lo, hi, len(body)) for lo, hi, body in sass_counts.loops(ins)]
    assert spans == [(0x40, 0x70, 4), (0x10, 0x90, 9)]
    inner = sass_counts.hot_loop(ins, 2, wide=True)
    assert inner["start"] == "0x40" and inner["instructions"] == 4 and inner["opcodes"]["LDG"] == 2
    outer = sass_counts.hot_loop(ins, 3, wide=True)  # at least 3 wide loads: only the outer loop
    assert outer["start"] == "0x10" and outer["opcodes"] == {"LDG": 4, "BRA": 3, "MUFU": 1, "FADD": 1}
    assert sass_counts.hot_loop(ins, 1, wide=False) == {}  # no narrow load anywhere

"""Verdicts and summary of a gpu_suite.sh run.

    python benchmarks/suite_summary.py sanitizers --logs LOGS        # one line per sanitizer run; exit 1 if any failed
    python benchmarks/suite_summary.py summary --logs LOGS --out OUT [--dry-run]   # writes OUT/summary.md

A sanitizer run passes only on both verdicts, the tool's and the program's
(a program that crashed can leave a clean tool summary behind):

* parity cases: the program exits 0 and prints ``PARITY ok``; memcheck's
  ``ERROR SUMMARY`` says 0 errors; racecheck's ``RACECHECK SUMMARY`` says 0
  errors (its warnings are reported, not failed on);
* bad-target cases: every bad target is ``reported`` (host IndexError or a
  device-side assertion), none ``NOT reported``, no report of an invalid or
  out-of-bounds access, and the program exits 0 -- or with the sanitizer's
  error code 86 when a device-side assertion explains it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

SANITIZER_ERROR_EXIT = 86  # gpu_suite.sh passes --error-exitcode 86
OOB = re.compile(r"Invalid __(global|shared|local)__ (read|write)|out of bounds|Misaligned", re.I)


def sanitizer_verdicts(logs):
    rows = []
    for fname in sorted(os.listdir(logs)):
        if not (fname.startswith("sanitizer_") and fname.endswith(".log")):
            continue
        name = fname[len("sanitizer_") : -len(".log")]
        tool, case = name.split("_", 1)
        with open(os.path.join(logs, fname), errors="replace") as f:
            text = f.read()
        exits = re.findall(r"^exit status: (\d+)$", text, re.M)
        code = int(exits[-1]) if exits else None
        errors = [int(x) for x in re.findall(r"ERROR SUMMARY: (\d+) errors?", text)]
        race = re.findall(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
        # the sanitizer's own lines only: the library's IndexError says "out of bounds" too
        oob = sum(1 for line in text.splitlines() if line.startswith("=========") and OOB.search(line))
        row = {"run": name, "tool": tool, "case": case, "exit": code, "errors": sum(errors) if errors else None,
               "race_errors": sum(int(r[1]) for r in race) if race else None,
               "race_warnings": sum(int(r[2]) for r in race) if race else None, "oob_reports": oob}
        why = []
        if code == 124:
            why.append("time limit")
        if case.startswith("parity"):
            if code != 0:
                why.append(f"exit {code}")
            if "PARITY ok" not in text:
                why.append("parity not confirmed" + (" (mismatches)" if "PARITY MISMATCH" in text else ""))
        else:
            reported = re.findall(r"^BAD-TARGET (-?\d+) reported: (.*)$", text, re.M)
            assertion = "device-side assertion" in text
            row["bad_targets"] = [f"{v}: {how[:160]}" for v, how in reported]
            if not reported:
                why.append("no bad target reported (crashed or hung?)")
            if re.search(r"^BAD-TARGET .* NOT reported", text, re.M):
                why.append("a bad target was NOT reported")
            if oob:
                why.append(f"{oob} out-of-bounds or invalid-access reports")
            if code not in (0, None) and not (code == SANITIZER_ERROR_EXIT and assertion):
                why.append(f"exit {code}")
        if tool == "memcheck":
            if row["errors"] is None:
                why.append("no ERROR SUMMARY line")
            elif row["errors"] and case.startswith("parity"):
                why.append(f"{row['errors']} memcheck errors")
        if tool == "racecheck":
            if row["race_errors"] is None:
                why.append("no RACECHECK SUMMARY line")
            elif row["race_errors"]:
                why.append(f"{row['race_errors']} racecheck errors")
        row["verdict"] = "ok" if not why else "FAILED"
        row["why"] = "; ".join(why)
        rows.append(row)
    return rows


def _line(row):
    parts = [f"exit {row['exit']}"]
    if row["tool"] == "memcheck":
        parts.append(f"memcheck errors {row['errors']}")
    if row["tool"] == "racecheck":
        parts.append(f"racecheck errors {row['race_errors']}, warnings {row['race_warnings']}")
    parts.append(f"out-of-bounds reports {row['oob_reports']}")
    return f"{row['run']}: {row['verdict']} ({', '.join(parts)}){' -- ' + row['why'] if row['why'] else ''}"


def junit_counts(path):
    if not os.path.exists(path):
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        return {"error": f"junit.xml unreadable: {exc}"}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                msg = (node.get("message") or "").splitlines()
                failed.append(f"{case.get('classname')}::{case.get('name')} ({kind}: {msg[0][:140] if msg else ''})")
    counts["failed_tests"] = failed
    return counts


def _read(path, default=""):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def _field(text, key):
    hit = re.search(rf"^{re.escape(key)}: (.*)$", text, re.M)
    return hit.group(1) if hit else None


def _medians(result):
    """{(case label, variant): median ms} of a bench_gpu.json's logits part."""
    cases = ((result or {}).get("logits") or {}).get("cases", [])
    return {(c["label"], name): rec["median_ms"] for c in cases for name, rec in c.get("variants", {}).items()
            if "median_ms" in rec}


def fastexp_section(logs, bench):
    """The fastexp stage against the benchmark's own numbers for the same cases (none when it did not run)."""
    d = os.path.join(logs, "fastexp")
    if not os.path.isdir(d):
        return []
    lines = ["", "## Fast exp A/B (16-bit logits: the default ex2 against RL_ACCURATE_EXP's expf)", ""]
    parity = _read(os.path.join(d, "parity.log")).strip().splitlines()
    lines.append(f"parity of that build: `{parity[-1] if parity else 'not run'}`")
    try:
        with open(os.path.join(d, "bench_gpu.json")) as f:
            accurate = _medians(json.load(f))
    except (OSError, ValueError):
        return lines + ["", "no benchmark JSON from that build (logs/fastexp/bench.log)"]
    base = _medians(bench)
    lines += ["", "| case | variant | default build ms | RL_ACCURATE_EXP ms | ratio |", "|---|---|---|---|---|"]
    for key, ms in accurate.items():
        ref = base.get(key)
        ratio = f"{ms / ref:.3f}" if ref else "-"
        lines.append(f"| {key[0]} | {key[1]} | {'-' if ref is None else f'{ref:.3f}'} | {ms:.3f} | {ratio} |")
    return lines


def summary(logs, out, dry_run):
    lines = []
    bench = None
    if os.path.exists(os.path.join(out, "bench_gpu.json")):
        try:
            with open(os.path.join(out, "bench_gpu.json")) as f:
                bench = json.load(f)
        except (OSError, ValueError):
            bench = None
    m = (bench or {}).get("machine") or {}
    gpu = (m.get("gpu") or {}).get("name")
    env = _read(os.path.join(logs, "env.txt"))
    device = re.search(r"^torch cuda: .* device: (.+)$", env, re.M)
    if gpu is None and device and device.group(1) != "None":
        gpu = device.group(1)
    title = gpu or ("dry run on " + (m.get("cpu") or "the CPU") if dry_run else "no GPU seen")
    lines.append(f"# GPU suite: {title}" + (" (DRY RUN: no GPU, numbers mean nothing)" if dry_run else ""))
    lines.append("")
    if m:
        lines.append(f"- machine: {gpu or m.get('cpu')}, driver {m.get('driver')}, torch {m.get('torch')} (CUDA {m.get('cuda')}), "
                     f"Triton {m.get('triton')}, Python {m.get('python')}, {m.get('date')}")
        git = m.get("git") or {}
        lines.append(f"- code: commit {git.get('commit')} ({git.get('commit_from')}), source digest {m.get('source_digest')}")
        lines.append(f"- peers: liger-kernel {m['peers'].get('liger_kernel')}, cut-cross-entropy {m['peers'].get('cut_cross_entropy')}")
    else:  # no benchmark JSON: what the setup stage saw
        smi = re.search(r"Driver Version: (\S+)", _read(os.path.join(logs, "nvidia-smi.txt")))
        lines.append(f"- machine: {gpu}, driver {smi.group(1) if smi else None}, torch {_field(env, 'torch')}, "
                     f"{_field(env, 'date')}")
    for key in ("nvcc", "c++", "git commit"):
        if _field(env, key):
            lines.append(f"- {key}: {_field(env, key)}")
    lines += ["", "## Stages", "", "| stage | status | seconds | note |", "|---|---|---|---|"]
    for row in _read(os.path.join(logs, "stages.tsv")).splitlines():
        cells = (row.split("\t") + ["", "", "", ""])[:4]
        lines.append("| " + " | ".join(c.replace("|", "/")[:600] for c in cells) + " |")
    lines += ["", "## Tests", ""]
    counts = junit_counts(os.path.join(out, "junit.xml"))
    if counts is None:
        lines.append("no junit.xml (the test stage did not run or was cut off)")
    elif "error" in counts:
        lines.append(counts["error"])
    else:
        lines.append(f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, "
                     f"{counts['skipped']} skipped (of {counts['tests']})")
        for name in counts["failed_tests"][:25]:
            lines.append(f"- {name}")
        if len(counts["failed_tests"]) > 25:
            lines.append(f"- ... and {len(counts['failed_tests']) - 25} more (junit.xml)")
    tail = _read(os.path.join(logs, "pytest.log")).strip().splitlines()
    if tail:
        lines.append(f"\npytest's last line: `{tail[-1]}`")
    lines += ["", "## Sanitizers", ""]
    rows = sanitizer_verdicts(logs) if os.path.isdir(logs) else []
    if not rows:
        lines.append("not run")
    if dry_run and rows:
        lines.append("dry run: no compute-sanitizer; the cases ran directly on the CPU backend")
        lines.append("")
    for row in rows:
        lines.append(f"- {_line(row)}")
        for bt in row.get("bad_targets", []):
            lines.append(f"  - bad target {bt}")
    lines += ["", "## Benchmark", ""]
    md = _read(os.path.join(out, "bench_gpu.md"))
    if md:
        lines.append(md.strip())
    elif bench is not None:
        lines.append("bench_gpu.json only (the run stopped before its tables): see the JSON")
    else:
        lines.append("not run")
    lines += fastexp_section(logs, bench)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["sanitizers", "summary"])
    ap.add_argument("--logs", required=True)
    ap.add_argument("--out")
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "sanitizers":
        rows = sanitizer_verdicts(args.logs)
        for row in rows:
            print(_line(row))
        return 0 if rows and all(r["verdict"] == "ok" for r in rows) else 1
    if not args.out:
        ap.error("summary needs --out")
    return summary(args.logs, args.out, args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

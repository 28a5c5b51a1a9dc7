"""Peak memory of one training step of a small Hugging Face causal LM, patched vs unpatched (CPU).

Not a test. A randomly initialised ``*ForCausalLM`` (built from a config, no
download) with a real-sized vocabulary runs forward + backward on
``batch x seq`` tokens with labels:

* ``unpatched``: transformers' own loss (``lm_head`` logits, ``ForCausalLMLoss``);
* ``patched``: ``patch_causal_lm(model, CCE())`` -- the fused linear + loss on
  the last hidden states, the logits never materialised;
* ``patched_dm``: the same with ``DM(lam=1, beta=8)``;
* ``patched_chunk64``: ``CCE()`` with ``chunk_size=64`` rows instead of the
  default (about 64 MiB of logits per chunk on a CPU: at a few hundred tokens
  one default chunk holds all of them);
* ``patched_budget8m``: ``CCE()`` with ``memory_budget=8 MiB``: the plan the
  layer picks under that bound (here the recompute backward, tiled over the
  vocabulary).

``plan`` records the chunking the layer chose (``linear._plan``, observed).

Each (model, method) runs in a fresh process. Two measures of the step:

* ``peak_bytes``: the peak of live CPU tensor bytes allocated during the step
  above those alive before it (torch.profiler's allocation events, the
  helper of ``robustloss_fast._bench``; allocator-independent). It includes
  the parameter gradients, which every method allocates alike.
* ``rss_peak_bytes``: the process's RSS high-water mark during a later step
  minus its RSS before it (/proc/self/status, after resetting the mark), with
  glibc's mmap threshold fixed as in ``bench_linear.py``.

One warm-up step runs first (lazy initialisation), and the step time is
reported for information only (this is not a timing benchmark).

    python benchmarks/bench_hf_memory.py [--quick] [--out benchmarks/results/hf_memory_cpu_<date>.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import subprocess
import sys
import time

# (name, model_type, config kwargs, batch, seq)
MODELS = [
    ("llama-32k", "llama", dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=4), 2, 256),
    ("qwen2-152k", "qwen2", dict(vocab_size=151936, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2), 2, 256),
]
METHODS = ["unpatched", "patched", "patched_dm", "patched_chunk64", "patched_budget8m"]
BUDGET = 8 << 20


def run_one(name: str, method: str, dtype: str) -> dict:
    import gc

    import torch
    import transformers

    import robustloss_fast as rf
    from robustloss_fast import linear
    from robustloss_fast._bench import _peak_extra_cpu, reset_rss_peak, status_kib
    from robustloss_fast.integrations.transformers import patch_causal_lm

    _, model_type, cfg, batch, seq = next(m for m in MODELS if m[0] == name)
    config = transformers.AutoConfig.for_model(model_type, max_position_embeddings=seq, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2, **cfg)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype)).train()
    if method == "patched":
        patch_causal_lm(model, rf.CCE())
    elif method == "patched_dm":
        patch_causal_lm(model, rf.DM(lam=1.0, beta=8.0))
    elif method == "patched_chunk64":
        patch_causal_lm(model, rf.CCE(), chunk_size=64)
    elif method == "patched_budget8m":
        patch_causal_lm(model, rf.CCE(), memory_budget=BUDGET)
    plans = []
    real_plan = linear._plan

    def observed_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    linear._plan = observed_plan
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, cfg["vocab_size"], (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 8] = -100  # a prompt that is not trained on

    def step(_z=None, _y=None):
        for p in model.parameters():
            p.grad = None
        return model(input_ids=ids, labels=labels).loss

    t0 = time.perf_counter()
    loss = step()
    loss.backward()
    warm_s = time.perf_counter() - t0
    value = float(loss.detach())
    del loss
    gc.collect()
    # The profiler helper takes (fn, z, y) and runs fn(z, y).backward() after z.grad = None.
    peak = _peak_extra_cpu(step, torch.zeros(()), None)
    gc.collect()
    for p in model.parameters():
        p.grad = None
    gc.collect()
    reset_ok = reset_rss_peak()
    rss0 = status_kib("VmRSS")
    t0 = time.perf_counter()
    step().backward()
    step_s = time.perf_counter() - t0
    rss_peak = (status_kib("VmHWM") - rss0) * 1024
    n_params = sum(p.numel() for p in model.parameters())
    elem = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return {
        "model": name,
        "model_type": model_type,
        "method": method,
        "dtype": dtype,
        "batch": batch,
        "seq": seq,
        "vocab": cfg["vocab_size"],
        "hidden": cfg["hidden_size"],
        "parameters": n_params,
        "param_grad_bytes": n_params * elem,
        "logits_bytes": batch * seq * cfg["vocab_size"] * elem,
        "plan": dataclasses.asdict(plans[-1]) if plans else None,
        "loss": value,
        "peak_bytes": peak,
        "rss_peak_bytes": rss_peak,
        "hwm_reset": reset_ok,
        "warmup_step_s": warm_s,
        "step_s": step_s,
        "threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the 32k-vocabulary model")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, metavar=("MODEL", "METHOD", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_one(*args.child)))
        return

    import torch

    from robustloss_fast._bench import machine_info

    import transformers

    info = machine_info("cpu")
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(4 << 20)  # see bench_linear.py: RSS then tracks live tensors
    models = MODELS[:1] if args.quick else MODELS
    results = []
    for name, *_ in models:
        for method in METHODS:
            cmd = [sys.executable, __file__, "--child", name, method, args.dtype]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"child {name} {method} failed")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(res)
            print(f"{name:11s} {args.dtype:8s} {method:15s} loss {res['loss']:.4f}  "
                  f"peak {res['peak_bytes'] / 2**20:8.1f} MiB  RSS peak {res['rss_peak_bytes'] / 2**20:8.1f} MiB  "
                  f"(logits {res['logits_bytes'] / 2**20:.0f} MiB, "
                  f"param grads {res['param_grad_bytes'] / 2**20:.0f} MiB)  step {res['step_s']:.2f} s", flush=True)
    info["transformers"] = transformers.__version__
    info["malloc_mmap_threshold"] = env["MALLOC_MMAP_THRESHOLD_"]
    info["torch_threads"] = torch.get_num_threads()
    info["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    summary = []
    for name, *_ in models:
        rows = {r["method"]: r for r in results if r["model"] == name}
        base = rows["unpatched"]
        for m in METHODS[1:]:
            summary.append({
                "model": name,
                "method": m,
                "peak_ratio": rows[m]["peak_bytes"] / base["peak_bytes"],
                "rss_peak_ratio": rows[m]["rss_peak_bytes"] / base["rss_peak_bytes"],
            })
            print(f"{name:11s} {m:15s} peak {summary[-1]['peak_ratio']:.3f}x of unpatched "
                  f"(RSS {summary[-1]['rss_peak_ratio']:.3f}x)")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    f"hf_memory_cpu_{stamp}.json")
    with open(path, "w") as f:
        json.dump({"machine": info, "results": results, "summary": summary}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()

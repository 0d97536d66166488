"""Memory and time of training with saved activations at 8 and 4 bits against float32; print JSON.

    python benchmarks/activation_memory.py [--models ...] [--batch-sizes 128 512] [--out FILE]

For each model, batch size, rule (``bp``; ``bdfa``: the hybrid, binary feedback in the fully
connected layers, bit-packed) and storage (float32, 8, 4 bits) on random 3x32x32 inputs:

* **bytes** of the tensors autograd saves for the backward pass, counted in the pack hook and in the
  fused ops (:class:`dfatorch.CompressionStats`, exact and device-independent): the quantised ones
  before and after, the max-pool indices as int64 and as stored (positions in their windows: 2
  bits for 2x2, 4 for 3x3), and the ones kept as they are (small tensors). The float32 row's bytes
  are the same tensors as autograd keeps them without hooks (``exact_bytes``; a view saved with
  another shape, such as the flattened input of the first linear layer, counts twice on both
  sides).
* **peak memory** of one training step (forward, backward, SGD step), each variant in a fresh
  subprocess: on the CPU the rise of the resident set's high-water mark over the step (Linux:
  ``VmHWM`` after the step, reset just before it, minus ``VmRSS`` before; elsewhere
  ``ru_maxrss``), with glibc told to return freed blocks of 64 KiB and more (``child_env``); on
  CUDA ``torch.cuda.max_memory_allocated`` of the step.
* **step time** against float32 for the same rule: all six variants of a model timed in one
  process, interleaved round by round, warm-up excluded; the median over rounds of the per-round
  ratio (at the first batch size only: the time is per example whatever the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from _common import command, emit, options

import dfatorch
from dfatorch.models import build_model
from dfatorch.train import environment

MODELS = ("small_cnn", "nokland_cnn", "vgg_cnn")
RULES: dict[str, dict[str, Any]] = {
    "bp": {"method": "bp"},
    "bdfa": {"method": "bdfa", "scope": "fc", "storage": "packed"},
}
BITS = (32, 8, 4)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10


def make_step(model_name: str, rule: str, bits: int, batch: int, device: torch.device):
    """A seeded model, batch and optimiser; returns ``step() -> CompressionStats | None``."""
    torch.manual_seed(0)
    model = build_model(model_name, INPUT_SHAPE, NUM_CLASSES).to(device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *INPUT_SHAPE, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    dfatorch.attach(model, example_input=x[:2], seed=0, **RULES[rule])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> dfatorch.CompressionStats | None:
        opt.zero_grad(set_to_none=True)
        stats = None
        if bits == 32:
            F.cross_entropy(model(x), y).backward()
        else:
            with dfatorch.compressed_activations(bits) as stats:
                F.cross_entropy(model(x), y).backward()
        opt.step()
        return stats

    return step


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])  # kB
    raise KeyError(key)


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, one step, in this (fresh) process: its bytes and peak memory."""
    device = torch.device(spec["device"])
    step = make_step(spec["model"], spec["rule"], spec["bits"], spec["batch"], device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    # Linux: reset the high-water mark so that it covers the step alone (building a model can
    # peak higher than its step); elsewhere ru_maxrss, the peak since the process started
    resettable = _reset_peak()
    before = _proc_status("VmRSS") if resettable else _maxrss()
    stats = step()
    after = _proc_status("VmHWM") if resettable else _maxrss()
    out: dict[str, Any] = {
        "peak_rss_mib": round(_maxrss() / 1024, 1),
        "step_rss_increase_mib": round((after - before) / 1024, 1),
        "rss_measure": "VmHWM after the step - VmRSS before" if resettable else "ru_maxrss",
    }
    if device.type == "cuda":
        torch.cuda.synchronize()
        out["cuda_step_peak_mib"] = round(
            (torch.cuda.max_memory_allocated(device) - base) / 2**20, 1
        )
    if stats is not None:
        out["stats"] = stats.to_dict()
    return out


def run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    # glibc: blocks from 64 KiB up are mapped and unmapped on free, so the resident set follows
    # the live tensors (with its default dynamic threshold freed blocks stay resident)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **MALLOC_ENV}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory(model: str, batch: int, device: str, threads: int) -> dict[str, Any]:
    rules: dict[str, Any] = {}
    for rule in RULES:
        rows: dict[str, Any] = {}
        for bits in BITS:
            spec = {"model": model, "rule": rule, "bits": bits, "batch": batch, "device": device}
            print(f"memory {spec}", file=sys.stderr, flush=True)
            rows[str(bits)] = run_child(spec, threads)
        ref = rows["8"]["stats"]
        rows["32"]["saved_bytes"] = ref["exact_bytes"]
        for bits in ("8", "4"):
            s = rows[bits].pop("stats")
            rows[bits].update(
                saved_bytes=s["saved_bytes"],
                saved_ratio=round(s["total_ratio"], 3),
                quantised_float_bytes=s["float_bytes"],
                quantised_stored_bytes=s["stored_bytes"],
                quantised_ratio=round(s["ratio"], 3),
                integer_bytes=s["integer_bytes"],
                integer_stored_bytes=s["integer_stored_bytes"],
                kept_bytes=s["kept_bytes"],
            )
        for bits in ("8", "4"):
            r = rows[bits]
            r["step_rss_increase_vs_float32"] = round(
                r["step_rss_increase_mib"] / max(rows["32"]["step_rss_increase_mib"], 1e-9), 3
            )
            r["peak_rss_vs_float32"] = round(r["peak_rss_mib"] / rows["32"]["peak_rss_mib"], 3)
            if "cuda_step_peak_mib" in r:
                r["cuda_step_peak_vs_float32"] = round(
                    r["cuda_step_peak_mib"] / rows["32"]["cuda_step_peak_mib"], 3
                )
        rules[rule] = rows
    return rules


def timing(model: str, batch: int, device: str, rounds: int, warmup: int) -> dict[str, Any]:
    dev = torch.device(device)
    steps = {(r, b): make_step(model, r, b, batch, dev) for r in RULES for b in BITS}

    def timed(step) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[tuple[str, int], list[float]] = {k: [] for k in steps}
    for _ in range(rounds):
        for key, step in steps.items():
            times[key].append(timed(step))
    out: dict[str, Any] = {}
    for rule in RULES:
        out[rule] = {}
        for bits in BITS:
            t, ref = times[(rule, bits)], times[(rule, 32)]
            out[rule][str(bits)] = {
                "ms_median": round(1e3 * statistics.median(t), 1),
                "ratio_to_float32": round(statistics.median(a / b for a, b in zip(t, ref)), 3),
            }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[128, 512])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (children too)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    report: dict[str, Any] = {
        "benchmark": "activation_memory",
        "command": command(__file__, argv),
        "config": options(args, skip=("child",)),
        "rules": RULES,
        "input_shape": list(INPUT_SHAPE),
        "child_env": MALLOC_ENV,
        "machine": environment(),
        "memory": {},
        "step_time": {},
    }
    for model in args.models:
        report["memory"][model] = {
            str(batch): memory(model, batch, args.device, args.threads)
            for batch in args.batch_sizes
        }
        if not args.no_timing:
            batch = args.batch_sizes[0]
            print(f"timing {model} batch {batch}", file=sys.stderr, flush=True)
            report["step_time"][model] = {
                "batch": batch,
                **timing(model, batch, args.device, args.rounds, args.warmup),
            }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""PyTorch SDPA on the shapes `sd2 bench flash` times (bf16, head dim 64): the baseline for
BENCHMARKS.md. Same method as sd2's bench: random inputs, warm-up, CUDA events around each
call, median of --iters. Forward = F.scaled_dot_product_attention; backward = autograd.grad of
its output (dQ, dK, dV), graph retained. FLOPs counted as sd2 counts them (causal: visible pairs
only; backward 2.5x forward). Also reports which SDPA backends are enabled."""
import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F


def shapes(batch):
    return [
        dict(name="vision", batch=batch, heads=16, seq=257, causal=False),
        dict(name="text", batch=batch, heads=12, seq=77, causal=True),
        dict(name="long", batch=4, heads=16, seq=2048, causal=False),
    ]


def fwd_flops(bh, s, d, causal):
    pairs = sum(i + 1 for i in range(s)) if causal else s * s
    return 4.0 * bh * pairs * d


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), (max(ts) - min(ts)) / statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json")
    a = ap.parse_args()
    torch.manual_seed(0)
    d = 64
    out = []
    for s in shapes(a.batch):
        shp = (s["batch"], s["heads"], s["seq"], d)
        q, k, v, do = (torch.randn(shp, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        for t in (q, k, v):
            t.requires_grad_(True)
        with torch.no_grad():
            fwd_ms, spread = timed(
                lambda: F.scaled_dot_product_attention(q, k, v, is_causal=s["causal"]),
                a.warmup, a.iters)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=s["causal"])
        bwd_ms, _ = timed(lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True),
                          a.warmup, a.iters)
        fl = fwd_flops(s["batch"] * s["heads"], s["seq"], d, s["causal"])
        out.append(dict(shape=s, fwd_ms=fwd_ms, bwd_ms=bwd_ms, fwd_tflops=fl / (fwd_ms * 1e9),
                        bwd_tflops=2.5 * fl / (bwd_ms * 1e9), fwd_spread=spread))
        print(f"sdpa {s['name']:<7} fwd {fwd_ms:8.3f} ms {fl / (fwd_ms * 1e9):7.1f} TFLOP/s   "
              f"bwd {bwd_ms:8.3f} ms {2.5 * fl / (bwd_ms * 1e9):7.1f} TFLOP/s", flush=True)
        # Written after every shape: a run cut short still leaves the shapes it finished.
        body = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                    backends=dict(flash=torch.backends.cuda.flash_sdp_enabled(),
                                  mem_efficient=torch.backends.cuda.mem_efficient_sdp_enabled(),
                                  cudnn=torch.backends.cuda.cudnn_sdp_enabled()),
                    timings=out)
        if a.json:
            with open(a.json + ".tmp", "w") as f:
                json.dump(body, f, indent=1)
            os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()

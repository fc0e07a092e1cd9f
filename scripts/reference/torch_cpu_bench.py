#!/usr/bin/env python3
"""Times the shapes of benches/cpu_ops.rs in PyTorch on the CPU (same threads, f32) and, given
the Rust results (--ours FILE ... from `cargo bench --bench cpu_ops -- --json FILE`), prints the
ratio PyTorch time / sd2 time per op (> 1 means sd2 is faster).

Runs alternate between the two sides (scripts/bench-cpu.sh); each side's time per op is the
minimum over its runs, so machine noise hits both sides alike.

    python3 scripts/reference/torch_cpu_bench.py --save target/torch_1.json
    python3 scripts/reference/torch_cpu_bench.py --ours a.json b.json --torch target/torch_*.json
"""
import argparse

from benchlib import load_runs, report, save, timeit

import torch
import torch.nn.functional as F


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", nargs="*", default=[], help="JSON files written by the Rust bench")
    ap.add_argument("--torch", nargs="*", default=[], help="earlier --save files (skips timing)")
    ap.add_argument("--save", help="write this run's PyTorch timings here")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    title = f"PyTorch {torch.__version__} CPU, {args.threads} threads, f32"
    if args.torch:
        report(title, load_runs(args.torch), args.ours, len(args.torch))
        return
    rows = time_all(args)
    if args.save:
        save(rows, args.save)
    report(title, rows, args.ours, 1)


def time_all(args):
    rows = []

    linear_shapes = [
        ("vit qkv/out 1024x1024", 514, 1024, 1024),
        ("vit fc1 4096x1024", 514, 4096, 1024),
        ("vit fc2 1024x4096", 514, 1024, 4096),
        ("text q/k/v/out 768x768", 616, 768, 768),
        ("text fc1 3072x768", 616, 3072, 768),
        ("text fc2 768x3072", 616, 768, 3072),
    ]
    with torch.no_grad():
        for name, m, n, k in linear_shapes:
            x, w = torch.randn(m, k) * 0.5, torch.randn(n, k) * 0.5
            secs = timeit(lambda: F.linear(x, w), args.reps)
            rows.append((f"matmul {name} M={m}", 2 * m * n * k / 1e9, secs))

        # PEFT's LoRA: base linear + (x·Aᵀ)·Bᵀ·s as separate products.
        m, n, k, r = 514, 1024, 1024, 8
        x, w = torch.randn(m, k), torch.randn(n, k)
        a, b = torch.randn(r, k), torch.randn(n, r)
        secs = timeit(lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * 4.0, args.reps)
        rows.append((f"lora_linear r=8 1024x1024 M={m}", 2 * (m * n * k + m * r * k + m * n * r) / 1e9, secs))

    for name, bsz, heads, seq, hd, causal in [("vit", 2, 16, 257, 64, False), ("text causal", 8, 12, 77, 64, True)]:
        q, k, v = (torch.randn(bsz, heads, seq, hd) * 0.5 for _ in range(3))
        fwd = 4 * bsz * heads * seq * seq * hd / 1e9
        with torch.no_grad():
            secs = timeit(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal), args.reps)
        rows.append((f"attention fwd {name} B={bsz} H={heads} S={seq} D={hd}", fwd, secs))
        qt, kt, vt = (t.clone().requires_grad_() for t in (q, k, v))
        dy = torch.randn(bsz, heads, seq, hd)

        def step():
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            (o * dy).sum().backward()

        secs = timeit(step, args.reps)
        rows.append((f"attention fwd+bwd {name} B={bsz} H={heads} S={seq} D={hd}", fwd * 3.5, secs))
    return rows


if __name__ == "__main__":
    main()

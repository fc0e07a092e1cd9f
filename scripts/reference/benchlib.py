"""Shared by the PyTorch baseline scripts: timing, saving runs, and the sd2/torch ratio table.
Each side's time per op is the minimum over its runs (runs alternate between the two sides),
so machine noise hits both alike."""
import json
import os
import statistics
import time


def timeit(fn, reps, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def save(rows, path):
    with open(path + ".tmp", "w") as f:
        json.dump([{"name": n, "gflop": g, "secs": s} for n, g, s in rows], f, indent=1)
    os.replace(path + ".tmp", path)


def load_runs(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    return [(r["name"], r["gflop"], min(run[i]["secs"] for run in runs)) for i, r in enumerate(runs[0])]


def report(title, rows, ours_files, torch_runs, unit="GF/s"):
    ours = {}
    for path in ours_files:
        with open(path) as f:
            for r in json.load(f):
                if r["name"] not in ours or r["secs"] < ours[r["name"]]["secs"]:
                    ours[r["name"]] = r
    print(f"{title}; best of {torch_runs} PyTorch run(s) and {len(ours_files)} sd2 run(s)")
    print(f"{'op':<58} {'torch ms':>9} {'torch ' + unit:>10} {'sd2 ms':>9} {'sd2 ' + unit:>9} {'sd2/torch':>9}")
    for name, gflop, secs in rows:
        o = ours.get(name)
        if o:
            print(f"{name:<58} {secs*1e3:>9.2f} {gflop/secs:>10.1f} {o['secs']*1e3:>9.2f} "
                  f"{o['gflop']/o['secs']:>9.1f} {secs/o['secs']:>9.2f}")
        else:
            print(f"{name:<58} {secs*1e3:>9.2f} {gflop/secs:>10.1f}")

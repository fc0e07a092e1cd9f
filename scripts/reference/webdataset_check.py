"""Reads a folder written by `sd2 pack` with Python's `webdataset` and checks it against the
folder's shards.json and, if given, the manifest it was packed from: every shard opens, each
sample has an image that decodes and a JSON whose label/source/split match the manifest line
it names, and the sample counts per shard are the index's. Exits non-zero on any mismatch.

    python webdataset_check.py PACK_DIR [MANIFEST]
"""
import json, os, sys

import webdataset as wds


def main():
    pack = sys.argv[1]
    ix = json.load(open(os.path.join(pack, "shards.json")))
    lines = None
    if len(sys.argv) > 2:
        with open(sys.argv[2]) as f:
            lines = {i + 1: json.loads(l) for i, l in enumerate(f) if l.strip()}
    total, bad = 0, 0
    for shard in ix["shards"]:
        url = os.path.join(pack, shard["file"])
        n = 0
        for s in wds.WebDataset(url, shardshuffle=False).decode("rgb"):
            img = next(s[k] for k in ("jpg", "png", "webp") if k in s)
            meta = s["json"]
            assert img.ndim == 3 and img.shape[2] == 3, (s["__key__"], img.shape)
            if ix.get("size") and not ix.get("face_crop"):
                assert min(img.shape[:2]) == ix["size"], (s["__key__"], img.shape)
            if lines is not None:
                want = lines[meta["line"]]
                for k in ("label", "source", "split"):
                    if want[k] != meta[k]:
                        print(f"{url} {s['__key__']}: {k} {meta[k]!r} != manifest {want[k]!r}")
                        bad += 1
            n += 1
        if n != shard["samples"]:
            print(f"{url}: {n} samples, the index says {shard['samples']}")
            bad += 1
        total += n
    print(f"webdataset {wds.__version__ if hasattr(wds, '__version__') else '?'}: "
          f"{total} samples in {len(ix['shards'])} shards read, {bad} mismatches")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

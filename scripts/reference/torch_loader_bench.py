"""PyTorch's DataLoader + torchvision doing what `sd2 bench loader` does: decode a manifest's
images (PIL), SD2's training augmentations with the same probabilities and ranges (flip;
rotation ±10° with p 0.5 and scale 0.8–1.2 with a random shift, as one affine; brightness and
contrast ±0.1 with p 0.5; Gaussian blur σ 0.1–2 with p 0.2; JPEG round trip at quality 40–100
with p 0.5), then CLIP preprocessing (bicubic resize of the short side, centre crop, normalize).

    python torch_loader_bench.py --manifest M --workers N [--size 224] [--batch 64]
        [--limit 2048] [--json OUT]

Prints images/s for decode + preprocess and for + augmentations; each worker process uses one
torch thread, as sd2 uses one rayon thread per core.
"""
import argparse, io, json, math, os, random, time

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
import torchvision.transforms as T
import torchvision.transforms.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class SD2Augment:
    def __call__(self, img):
        r = random.random
        if r() < 0.5:
            img = F.hflip(img)
        angle = (r() * 2 - 1) * 10.0 if r() < 0.5 else 0.0
        s = 0.8 + r() * 0.4
        ox, oy = r() * 2 - 1, r() * 2 - 1
        if angle != 0.0 or abs(s - 1) > 1e-9:
            slack = abs(s - 1) / 2
            w, h = img.size
            img = F.affine(img, angle=angle, translate=[int(ox * slack * w), int(oy * slack * h)],
                           scale=s, shear=[0.0], interpolation=T.InterpolationMode.BILINEAR)
        if r() < 0.5:
            img = F.adjust_contrast(img, 1 + (r() * 2 - 1) * 0.1)
            img = F.adjust_brightness(img, 1 + (r() * 2 - 1) * 0.1)
        if r() < 0.2:
            sigma = 0.1 + r() * 1.9
            img = F.gaussian_blur(img, 2 * math.ceil(3 * sigma) + 1, sigma)
        if r() < 0.5:
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=random.randint(40, 100))
            buf.seek(0)
            img = Image.open(buf).convert("RGB")
        return img


class Images(Dataset):
    def __init__(self, manifest, limit, size, augment):
        root = os.path.dirname(os.path.abspath(manifest))
        with open(manifest) as f:
            recs = [json.loads(l) for l in f if l.strip()][:limit]
        self.paths = [os.path.join(root, r["path"]) for r in recs]
        self.labels = [r["label"] for r in recs]
        pre = [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
               T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
        self.tf = T.Compose(([SD2Augment()] if augment else []) + pre)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = Image.open(self.paths[i]).convert("RGB")
        return self.tf(img), self.labels[i]


def one_thread(_):
    torch.set_num_threads(1)


def run(args, augment):
    ds = Images(args.manifest, args.limit, args.size, augment)
    dl = DataLoader(ds, batch_size=args.batch, num_workers=args.workers, shuffle=False,
                    worker_init_fn=one_thread, prefetch_factor=2)
    t0 = time.perf_counter()
    n = 0
    for x, _ in dl:
        n += x.shape[0]
    return n, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--limit", type=int, default=2048)
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = []
    for case, aug in [("decode + preprocess", False), ("+ train augmentations", True)]:
        n, s = run(args, aug)
        out.append({"case": case, "images": n, "seconds": s, "images_per_s": n / s})
        print(f"{case:<24} {n / s:>8.0f} images/s ({n} in {s:.2f}s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"workers": args.workers, "torch": torch.__version__,
                       "torchvision": __import__("torchvision").__version__, "timings": out}, f)


if __name__ == "__main__":
    main()

"""A short real-photo retrieval demo: ``python -m lightning_apps.demo [--backbone vgg16] [--max-side 384]``.

It stands in for the evaluation app until ``lightning_apps.eval`` lands. The photos are the real colour photos
bundled in the scikit-image and scikit-learn wheels (astronaut, cat, coffee, rocket, motorcycle, China temple,
flower); nothing is downloaded. Each photo gives one query crop and several database views (crops at other
zooms and positions, flips, colour changes); the second real camera of the Middlebury motorcycle pair is an
extra database positive of the motorcycle query. Features come from an ImageNet backbone with real weights,
images of different sizes go through in one padded batch with a mask, and every pooling layer of deepagg is
scored with revisitop's mAP (old protocol: all views of a photo are positives).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

import deepagg
from deepagg import backbones
from deepagg.metrics import compute_map

PHOTOS = {
    "skimage": [
        "data/astronaut.png",
        "data/chelsea.png",
        "data/coffee.png",
        "data/rocket.jpg",
        "data/motorcycle_left.png",
    ],
    "sklearn": ["datasets/images/china.jpg", "datasets/images/flower.jpg"],
}
PARTNER = ("skimage", "data/motorcycle_right.png", "motorcycle_left")


def _package_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"demo: the photos come from the {package} wheel; run `pip install {package}`.")
    return Path(next(iter(spec.submodule_search_locations))) / rel


def load_photo(path: Path) -> torch.Tensor:
    """Read an image file as a float RGB tensor (3, H, W) in [0, 1]."""
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def make_views(photo: torch.Tensor, n: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Random crops (20-60 % of each side), small rotations, flips and colour changes of one photo."""
    _, h, w = photo.shape
    views = []
    for _ in range(n):
        frac = 0.2 + 0.4 * float(torch.rand((), generator=gen))
        ch, cw = int(h * frac), int(w * frac)
        y0 = int(torch.randint(0, h - ch + 1, (), generator=gen))
        x0 = int(torch.randint(0, w - cw + 1, (), generator=gen))
        v = photo[:, y0 : y0 + ch, x0 : x0 + cw]
        v = TF.rotate(v, 30 * float(torch.rand((), generator=gen)) - 15, interpolation=TF.InterpolationMode.BILINEAR)
        if float(torch.rand((), generator=gen)) < 0.5:
            v = TF.horizontal_flip(v)
        v = TF.adjust_brightness(v, 0.7 + 0.6 * float(torch.rand((), generator=gen)))
        v = TF.adjust_saturation(v, 0.6 + 0.8 * float(torch.rand((), generator=gen)))
        views.append(v.clamp(0, 1))
    return views


def resize_max_side(img: torch.Tensor, max_side: int) -> torch.Tensor:
    """Resize so that the longer side is ``max_side`` (antialiased bilinear)."""
    _, h, w = img.shape
    s = max_side / max(h, w)
    return TF.resize(img, [max(1, round(h * s)), max(1, round(w * s))], antialias=True)


@torch.no_grad()
def extract(net: torch.nn.Module, images: list[torch.Tensor], stride: int, batch: int = 8) -> tuple:
    """Feature maps of variable-size images, in padded batches with a validity mask on the feature grid."""
    maps, masks = [], []
    for i in range(0, len(images), batch):
        chunk = images[i : i + batch]
        hmax = max(im.shape[1] for im in chunk)
        wmax = max(im.shape[2] for im in chunk)
        x = torch.zeros(len(chunk), 3, hmax, wmax)
        for j, im in enumerate(chunk):
            x[j, :, : im.shape[1], : im.shape[2]] = im
        f = net(backbones.imagenet_normalize(x))
        m = torch.zeros(len(chunk), f.shape[2], f.shape[3], dtype=torch.bool)
        for j, im in enumerate(chunk):
            m[j, : -(-im.shape[1] // stride), : -(-im.shape[2] // stride)] = True
        maps.append(f)
        masks.append(m)
    hh = max(f.shape[2] for f in maps)
    ww = max(f.shape[3] for f in maps)
    feats = torch.cat([torch.nn.functional.pad(f, (0, ww - f.shape[3], 0, hh - f.shape[2])) for f in maps])
    mask = torch.cat([torch.nn.functional.pad(m, (0, ww - m.shape[2], 0, hh - m.shape[1])) for m in masks])
    return feats, mask


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Run the demo and print one mAP row per pooling layer."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", choices=["mobilenet_v2", "vgg16"], default="vgg16")
    parser.add_argument("--max-side", type=int, default=384)
    parser.add_argument("--views", type=int, default=6, help="database views per photo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(args.seed)
    names, queries, database, gnd = [], [], [], []
    for package, files in PHOTOS.items():
        for rel in files:
            photo = load_photo(_package_file(package, rel))
            query, *views = make_views(photo, args.views + 1, gen)
            start = len(database)
            database += views
            ok = list(range(start, len(database)))
            if rel.endswith(PARTNER[2] + ".png"):
                database.append(load_photo(_package_file(PARTNER[0], PARTNER[1])))
                ok.append(len(database) - 1)
            names.append(Path(rel).stem)
            queries.append(query)
            gnd.append({"ok": np.array(ok), "junk": np.array([], dtype=np.int64)})

    net = getattr(backbones, args.backbone)(pretrained=True)
    stride = net.stride
    t0 = time.perf_counter()
    q_maps, q_mask = extract(net, [resize_max_side(im, args.max_side) for im in queries], stride)
    db_maps, db_mask = extract(net, [resize_max_side(im, args.max_side) for im in database], stride)
    t_extract = time.perf_counter() - t0
    print(
        f"{len(queries)} queries, {len(database)} database images, {args.backbone} at max side {args.max_side}: "
        f"features in {t_extract:.1f} s"
    )

    results = {}
    pools = {
        "MAC": deepagg.MAC(),
        "SPoC": deepagg.SPoC(),
        "GeM": deepagg.GeM(learnable=False),
        "R-MAC": deepagg.RMAC(),
        "CroW": deepagg.CroW(),
    }
    print(f"{'pooling':<8} {'mAP':>6} {'mP@1':>6} {'mP@5':>6}")
    for label, pool in pools.items():
        q = pool(q_maps, q_mask)
        db = pool(db_maps, db_mask)
        ranks = torch.argsort(q @ db.T, dim=1, descending=True, stable=True)
        m_ap, _, mpr, _ = compute_map(ranks.numpy(), gnd, kappas=(1, 5))
        results[label] = float(m_ap)
        print(f"{label:<8} {100 * m_ap:6.2f} {100 * mpr[0]:6.2f} {100 * mpr[1]:6.2f}")
    return results


if __name__ == "__main__":
    main()

"""Selective masks + T-emb / VLAD / Fisher pools against GeM, the masks' speed-up (Fig. 6), democratic weights.

``python -m benchmarks.bench_embedding`` prints, on batches of 8 post-ReLU-like maps (``relu(randn - 0.5)``:
about 69 % zeros, as VGG16 conv5) at 8 x 512 x 24 x 32 and 8 x 512 x 48 x 64 (float32, under ``no_grad``):

- per pool (:class:`~deepagg.nn.embedding.TEmbPool` with mask max/sum/none x aggregation democratic/sum,
  :class:`~deepagg.nn.embedding.VLADPool` and :class:`~deepagg.nn.embedding.FisherVectorPool` with sum; default
  512-D settings): the pool's forward against ``deepagg.GeM()``'s on the same batch. The ratio is GeM's time / the
  pool's (below 1: the pool is slower); the case also gives the pool's time per image and as a multiple of GeM's.
  Every pool is fitted once beforehand on 8 training maps of 512 x 24 x 32 with a seeded generator (not timed
  in the rows; the fit time is printed on stderr and kept as ``fit_s``). The max abs diff compares the batched
  forward with the same pool called on one image at a time, so each row is also a correctness check;
- Hoang et al.'s Fig. 6 claim, that the MAX and SUM masks make embedding + democratic aggregation faster than
  keeping every local feature: ``TEmbPool(mask="max")`` and ``(mask="sum")`` (democratic) against
  ``TEmbPool(mask=None)`` on the same batch, ratio = unmasked time / masked time. The outputs differ by design
  (different local sets), so these rows report a diff of 0 and compare nothing; the case says how many
  positions per image the mask kept;
- :func:`~deepagg.functional.democratic_weights` on 8 images at once against a Python loop calling it per image
  (N = 230, about a MAX mask's size on real VGG16 maps, and N = 768, every position of 24 x 32; D = 640, the
  T-emb dimension of the 512-D setting before truncation).

The maps are i.i.d. noise, so a channel's maximum falls anywhere: the MAX mask keeps about 375 of 768 and 470 of
3072 positions here, more than on real images, whose activations cluster.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

import deepagg
from benchmarks.common import compare
from deepagg.functional._blocking import raise_trim_threshold
from deepagg.functional.embedding import democratic_weights
from deepagg.functional.normalize import l2n
from deepagg.nn.embedding import FisherVectorPool, TEmbPool, VLADPool

OFFSET = 0.5  # relu(randn - 0.5): P(z > 0.5) = 31 %, so about 69 % of the entries are 0 (VGG16 conv5-like)


def post_relu_maps(b: int, c: int, h: int, w: int, generator: torch.Generator) -> torch.Tensor:
    """Sparse non-negative maps, about 69 % zeros."""
    return torch.relu(torch.randn(b, c, h, w, generator=generator) - OFFSET)


def pool_specs(quick: bool) -> list[tuple[str, Callable[[], torch.nn.Module]]]:
    """(name, constructor) of every pool; the default 512-D settings, or tiny ones if ``quick``."""
    temb = {"d": 8, "k": 20} if quick else {}  # k * d - 128 = 32 dimensions when quick
    vlad = {"d": 4, "k": 4} if quick else {}
    fv = {"d": 4, "k": 4} if quick else {}
    specs: list[tuple[str, Callable[[], torch.nn.Module]]] = []
    for mask in ("max", "sum", None):
        for agg in ("democratic", "sum"):
            specs.append((f"temb {mask or 'none'}, {agg}", lambda m=mask, a=agg: TEmbPool(m, aggregation=a, **temb)))
    specs.append(("vlad max, sum", lambda: VLADPool("max", aggregation="sum", **vlad)))
    specs.append(("fisher max, sum", lambda: FisherVectorPool("max", aggregation="sum", **fv)))
    return specs


def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run under ``torch.no_grad`` (inference: GeM's learnable p builds no graph)."""

    def call() -> torch.Tensor:
        with torch.no_grad():
            return fn()

    return call


def per_image_diff(pool: torch.nn.Module, x: torch.Tensor) -> float:
    """Largest difference between the batched forward and the same pool on one image at a time."""
    with torch.no_grad():
        batched = pool(x)
        loop = torch.cat([pool(x[i : i + 1]) for i in range(x.shape[0])])
    return float((batched - loop).abs().max())


def kept_per_image(pool: TEmbPool, x: torch.Tensor) -> int:
    """Median number of local features the pool's selection keeps per image."""
    with torch.no_grad():
        return int(pool.select(x).flatten(1).sum(1).median())


def fit_pools(quick: bool, c: int) -> dict[str, tuple[torch.nn.Module, float]]:
    """Every pool fitted once on the same training maps (seeded generator); its fit time in seconds."""
    g = torch.Generator().manual_seed(1)
    train = post_relu_maps(4 if quick else 8, c, 6 if quick else 24, 8 if quick else 32, g)
    fitted = {}
    for name, make in pool_specs(quick):
        start = time.perf_counter()
        pool = make().fit(train, generator=torch.Generator().manual_seed(0)).eval()
        fitted[name] = (pool, time.perf_counter() - start)
        print(f"bench_embedding: fit {name} on {tuple(train.shape)}: {fitted[name][1]:.2f} s", file=sys.stderr)
    return fitted


def pool_rows(quick: bool) -> list[dict]:
    """Each pool vs GeM on the same batch, then the masked T-emb pools vs the unmasked one (Fig. 6)."""
    c = 32 if quick else 512
    shapes = [(2, c, 6, 8), (2, c, 8, 10)] if quick else [(8, c, 24, 32), (8, c, 48, 64)]
    fitted = fit_pools(quick, c)
    gem = deepagg.GeM().eval()
    g = torch.Generator().manual_seed(2)
    rows = []
    for b, _, h, w in shapes:
        x = post_relu_maps(b, c, h, w, g)
        shape = f"{b}x{c}x{h}x{w}"
        run_gem = no_grad(lambda x=x: gem(x))
        for name, (pool, fit_s) in fitted.items():
            diff = per_image_diff(pool, x)
            row = compare(
                "embedding",
                name,
                shape,
                no_grad(lambda pool=pool, x=x: pool(x)),
                run_gem,
                diff,
                tol=1e-5,
                quick=quick,
                reference="GeM (same batch); diff: batched vs per-image forward",
                fit_s=fit_s,
            )
            row["vs_gem"] = row["ours_ms"] / row["ref_ms"]
            row["case"] += f" ({row['ours_ms'] / b:.2f} ms/image, {row['vs_gem']:.0f}x GeM's time)"
            rows.append(row)
        unmasked = fitted["temb none, democratic"][0]
        n_all = kept_per_image(unmasked, x)
        for mask in ("max", "sum"):
            masked = fitted[f"temb {mask}, democratic"][0]
            rows.append(
                compare(
                    "embedding",
                    f"temb {mask} vs none, democratic ({mask} keeps {kept_per_image(masked, x)} of {n_all})",
                    shape,
                    no_grad(lambda pool=masked, x=x: pool(x)),
                    no_grad(lambda pool=unmasked, x=x: pool(x)),
                    0.0,
                    tol=0.0,
                    quick=quick,
                    reference="TEmbPool(mask=None) forward (outputs differ by design: not compared)",
                )
            )
    return rows


def democratic_rows(quick: bool) -> list[dict]:
    """democratic_weights on a batch vs a per-image loop."""
    b, d = (2, 32) if quick else (8, 640)
    g = torch.Generator().manual_seed(3)
    rows = []
    for n in (12, 24) if quick else (230, 768):
        phi = l2n(torch.randn(b, n, d, generator=g))
        expected = torch.cat([democratic_weights(phi[i : i + 1]) for i in range(b)])
        diff = float((democratic_weights(phi) - expected).abs().max())
        rows.append(
            compare(
                "embedding",
                "democratic_weights (10 iters)",
                f"B={b} N={n} D={d}",
                lambda phi=phi: democratic_weights(phi),
                lambda phi=phi: torch.cat([democratic_weights(phi[i : i + 1]) for i in range(b)]),
                diff,
                tol=1e-5 * max(float(expected.abs().max()), 1.0),
                quick=quick,
                reference="per-image loop",
            )
        )
    return rows


def run(quick: bool = False) -> list[dict]:
    """Pools vs GeM, masked vs unmasked T-emb, democratic weights batched vs looped; one row per case."""
    raise_trim_threshold()  # the loops' best case, as in bench_pooling
    torch.manual_seed(0)
    return pool_rows(quick) + democratic_rows(quick)


if __name__ == "__main__":
    from benchmarks.run import main

    main(["--only", "bench_embedding"])

r"""Selective local features, embedded and aggregated: :class:`TEmbPool`, :class:`VLADPool`, :class:`FisherVectorPool`.

Hoang, Do, Le Tan, Cheung, "Selective deep convolutional features for image retrieval", ACM MM 2017
(``selective-masks-temb-democratic.txt``). One image's pipeline, as the authors' released MATLAB runs it
(hnanhtuan/selectiveConvFeature ``main.m``, ``embedding.m``, ``learn_rn.m``):

1. **Select** local features (rows of the map) with a mask: ``"max"`` (:func:`~deepagg.functional.max_mask`),
   ``"sum"`` (:func:`~deepagg.functional.sum_mask`), ``"sift"`` (:func:`~deepagg.functional.sift_mask`, needs
   the input images) or ``None`` (every position). Zero local features and padding never take part.
2. **Pre-process**: subtract the training mean, project on the top ``d`` principal components (learned on the
   masked training features), L2-normalise.
3. **Embed** each feature: triangulation embedding on ``k`` k-means anchors (T-emb), hard-assignment VLAD
   residuals, or Fisher-vector gradients of a diagonal GMM.
4. T-emb only: subtract the embedding mean and PCA-whiten with the 33 smallest eigenvalues clamped to the
   33rd smallest (the authors' ``eigval(end-32:end) = eigval(end-32)``), all learned on the training embeddings.
5. **Aggregate**: ``"democratic"`` (each embedded vector L2-normalised, then weighted by
   :func:`~deepagg.functional.democratic_weights`, 10 iterations, damping 0.5) or ``"sum"``.
6. L2-normalise; **rotate** by the PCA basis of the training images' aggregated vectors (first 1024 components,
   completed to an orthonormal basis, the authors' ``learn_rn``), after subtracting their mean; T-emb drops the
   first 128 dimensions.
7. Signed **power law** (``power``), then L2.

Every learned quantity (steps 2-6) comes from :meth:`fit` on training feature maps, never on test images; it
lives in ``state_dict`` (buffers whose shapes follow the fitted sizes), so a saved and reloaded pool gives the
same output. The forward pass is batched: variable-size local sets are compacted into one padded tensor with a
validity mask (one host sync per batch for its size, skipped under ``torch.compile``, where the full grid is
kept), with no per-image Python loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from deepagg._checks import ShapeError, check_feature_mask, check_floating, check_int, check_shape
from deepagg.functional.embedding import (
    democratic_weights,
    fisher_embedding,
    fit_gmm,
    kmeans,
    triangulation_embedding,
    vlad_embedding,
)
from deepagg.functional.masks import max_mask, sift_mask, sum_mask
from deepagg.functional.normalize import l2n, power_norm

__all__ = ["FisherVectorPool", "TEmbPool", "VLADPool"]

MASKS = ("max", "sum", "sift", None)
AGGREGATIONS = ("democratic", "sum")
CLAMPED_EIGENVALUES = 33  # T-emb whitening: the authors clamp the 33 smallest eigenvalues
ROTATION_COMPONENTS = 1024  # learn_rn: PCA restricted to the first 1024 components, completed by the identity
_IMAGE_CHUNK = 16  # images per padded batch while fitting


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _descending_eigh(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, signs fixed deterministically."""
    vals, vecs = torch.linalg.eigh(cov)
    vals, vecs = vals.flip(0), vecs.flip(1)
    # Each eigenvector's largest-magnitude entry is made positive, so the basis does not depend on LAPACK's signs.
    idx = vecs.abs().argmax(0)
    signs = torch.sign(vecs.gather(0, idx[None]))[0]
    signs[signs == 0] = 1
    return vals, vecs * signs


class _SelectiveEmbeddingPool(nn.Module):
    """Shared pipeline of the three pools; subclasses fit a codebook and embed (see the module docstring)."""

    truncate: int = 0
    whiten_embedding: bool = False
    _fitted_buffers: tuple[str, ...] = ("local_mean", "local_proj", "rot_mean", "rotation")

    def __init__(
        self,
        mask: str | None = "max",
        d: int = 32,
        k: int = 20,
        aggregation: str = "democratic",
        power: float = 0.5,
        *,
        iters: int = 10,
        damping: float = 0.5,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if mask == "none":  # Hydra spelling of None
            mask = None
        if mask not in MASKS:
            raise ValueError(f"{name}: mask must be one of 'max', 'sum', 'sift' or None; got {mask!r}.")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"{name}: aggregation must be 'democratic' or 'sum'; got {aggregation!r}.")
        self.d = check_int(d, name="d", fn=name, minimum=1)
        self.k = check_int(k, name="k", fn=name, minimum=2)
        if self.embed_dim(self.d, self.k) <= self.truncate:
            raise ValueError(
                f"{name}: the embedding dimension {self.embed_dim(self.d, self.k)} (d={self.d}, k={self.k}) must "
                f"exceed the {self.truncate} leading dimensions that are dropped; increase d or k."
            )
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power <= 1:
            raise ValueError(f"{name}: power must be a number in [0, 1] (0: sign, 1: none); got {power!r}.")
        self.iters = check_int(iters, name="iters", fn=name, minimum=0)
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not damping >= 0:
            raise ValueError(f"{name}: damping must be a number >= 0; got {damping!r}.")
        self.mask = mask
        self.aggregation = aggregation
        self.power = float(power)
        self.damping = float(damping)
        for buf in self._fitted_buffers:
            self.register_buffer(buf, torch.empty(0))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # Running count of the positions forward saw and kept (eager mode only): the mask's kept fraction.
        self.positions_seen = 0
        self.positions_kept = 0

    # ------------------------------------------------------------------------------------------------ sizes
    @staticmethod
    def embed_dim(d: int, k: int) -> int:
        """Dimension of one embedded local feature (and of the aggregated vector before truncation)."""
        return k * d

    def out_dim(self, in_channels: int) -> int:
        """Descriptor dimension (independent of ``in_channels``, which must be at least ``d``)."""
        return self.embed_dim(self.d, self.k) - self.truncate

    def extra_repr(self) -> str:
        return f"mask={self.mask!r}, d={self.d}, k={self.k}, aggregation={self.aggregation!r}, power={self.power}" + (
            f", iters={self.iters}, damping={self.damping}" if (self.iters, self.damping) != (10, 0.5) else ""
        )

    @property
    def kept_fraction(self) -> float:
        """Fraction of the (valid) positions the forward passes so far kept (mask and non-zero); NaN before any."""
        return self.positions_kept / self.positions_seen if self.positions_seen else float("nan")

    # ------------------------------------------------------------------------------------------------ state
    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The fitted buffers take the shapes of the stored ones (they depend on C, known only after fit).
        for buf in self._fitted_buffers:
            stored = state_dict.get(prefix + buf)
            if isinstance(stored, torch.Tensor):
                device = self._buffers["fitted"].device  # type: ignore[union-attr]
                self._buffers[buf] = torch.empty_like(stored, device=device)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_fitted(self, what: str) -> None:
        # Shape metadata only (no host sync): unfitted buffers are empty.
        if self.local_mean.numel() == 0:
            raise RuntimeError(
                f"{type(self).__name__}.{what}(): the pool is not fitted; call fit(train_feature_maps) first "
                "(on training images, never the test set) or load a fitted state_dict."
            )

    # ------------------------------------------------------------------------------------------------ selection
    def select(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The local features this pool uses: the selective mask, the validity mask and non-zero features.

        Args:
            x: Feature maps :math:`(B, C, H, W)`.
            mask: Optional :math:`(B, H, W)` validity mask (True = valid).
            images: The input images :math:`(B, 1|3, H_I, W_I)` in [0, 1]; required when ``mask="sift"``.
            selection: Optional precomputed selective mask :math:`(B, H, W)` bool (e.g. cached SIFT masks of
                :func:`deepagg.functional.sift_mask`); it replaces the pool's own mask computation.

        Returns:
            Bool :math:`(B, H, W)`.
        """
        name = type(self).__name__
        if selection is not None:
            check_shape(
                selection, "B,H,W", name="selection", fn=name, sizes={"B": x.shape[0], "H": x.shape[2], "W": x.shape[3]}
            )
            sel = selection.to(device=x.device, dtype=torch.bool)
            if mask is not None:
                sel = sel & mask
            return sel & ((x != 0) & torch.isfinite(x)).any(1)
        if self.mask == "sift" and images is None:
            raise ValueError(
                f"{name}(mask='sift'): images= (or a precomputed selection=) is required (the SIFT keypoints of "
                "the input images select the local features); got images=None."
            )
        if self.mask == "max":
            sel = max_mask(x, mask=mask)
        elif self.mask == "sum":
            sel = sum_mask(x, mask=mask)
        elif self.mask == "sift":
            assert images is not None
            sel = sift_mask(images, (x.shape[-2], x.shape[-1]), mask=mask).to(x.device)
        else:
            sel = torch.ones(x.shape[0], x.shape[2], x.shape[3], dtype=torch.bool, device=x.device)
            if mask is not None:
                sel = sel & mask
        # Zero local features take no part (design.md 3.1); padding may hold garbage, so test finite values too.
        nonzero = ((x != 0) & torch.isfinite(x)).any(1)
        return sel & nonzero

    @staticmethod
    def _compact(x: torch.Tensor, keep: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gather the kept rows of ``x`` (B, C, H, W) into ``(B, n, C)`` + valid ``(B, n)``, in row-major order."""
        b, c = x.shape[:2]
        feats = x.flatten(2).mT  # (B, HW, C)
        keep = keep.flatten(1)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n]
        valid = keep.gather(1, order)
        feats = feats.gather(1, order[..., None].expand(b, n, c))
        return torch.where(valid[..., None], feats, 0.0), valid

    # ------------------------------------------------------------------------------------------------ encoding
    def _embed(self, xe: torch.Tensor) -> torch.Tensor:  # (B, n, d) -> (B, n, D)
        raise NotImplementedError

    def _fit_codebook(self, xe: torch.Tensor, generator: torch.Generator | None) -> None:
        raise NotImplementedError

    def _project(self, feats: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Steps 2: centre, PCA to d, L2; invalid rows are zero."""
        dt = feats.dtype
        xe = l2n((feats - self.local_mean.to(dt)) @ self.local_proj.to(dt))
        return torch.where(valid[..., None], xe, 0.0)

    def _aggregate(self, xe: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """Steps 3-5 and the L2 of step 6: (B, n, d) projected features -> (B, D) unit vectors."""
        phi = self._embed(xe)
        if self.whiten_embedding:
            dt = phi.dtype
            phi = (phi - self.emb_mean.to(dt)) @ self.emb_whiten.to(dt)
        if self.aggregation == "democratic":
            phi = torch.where(valid[..., None], l2n(phi), 0.0)
            w = democratic_weights(phi, valid, iters=self.iters, damping=self.damping)
            y = (w[..., None] * phi).sum(1)
        else:
            y = torch.where(valid[..., None], phi, 0.0).sum(1)
        return l2n(y)

    def _finish(self, y: torch.Tensor) -> torch.Tensor:
        """Steps 6-7: rotate, truncate, power law, L2."""
        dt = y.dtype
        z = ((y - self.rot_mean.to(dt)) @ self.rotation.to(dt))[:, self.truncate :]
        z = torch.sign(z) if self.power == 0 else (z if self.power == 1 else power_norm(z, alpha=self.power))
        return l2n(z)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        images: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Select, embed, aggregate, rotate, power, L2 (in at least float32); output in the dtype of ``x``."""
        name = type(self).__name__
        check_shape(x, "B,C,H,W", name="x", fn=name, hint="Pass feature maps, not descriptors.")
        check_floating(x, name="x", fn=name)
        check_feature_mask(mask, x, fn=name)
        self._check_fitted("forward")
        c = self.local_mean.shape[0]
        if x.shape[1] != c:
            raise ShapeError(
                f"{name}(): x must have C = {c} channels (the pool was fitted on {c}); got {tuple(x.shape)}.",
                expected=c,
                actual=x.shape[1],
            )
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        with torch.no_grad():
            keep = self.select(xf, mask, images, selection)
        n = x.shape[2] * x.shape[3]  # under compile (or B = 0) the whole grid: no data-dependent size
        if not _is_compiling() and x.shape[0] > 0:
            # One host sync per batch (eager only): the padded local set's size and the kept-fraction counters.
            kept = keep.flatten(1).sum(1)
            seen = mask.sum() if mask is not None else torch.tensor(keep.numel(), device=keep.device)
            n, total_kept, total_seen = torch.stack([kept.max(), kept.sum(), seen]).tolist()
            self.positions_seen += total_seen
            self.positions_kept += total_kept
        feats, valid = self._compact(xf, keep, n)
        return self._finish(self._aggregate(self._project(feats, valid), valid)).to(x.dtype)

    # ------------------------------------------------------------------------------------------------ fitting
    @staticmethod
    def _items(
        feature_maps: torch.Tensor | Iterable[Any],
        mask: torch.Tensor | None,
        images: torch.Tensor | None,
        selection: torch.Tensor | None,
    ) -> Iterator[tuple[Any, ...]]:
        if isinstance(feature_maps, torch.Tensor):
            yield feature_maps, mask, images, selection
            return
        for item in feature_maps:
            if isinstance(item, torch.Tensor):
                yield item, None, None, None
            else:  # (maps, mask), (maps, mask, images) or (maps, mask, images, selection)
                yield (*tuple(item), None, None, None)[:4]

    @torch.no_grad()
    def fit(
        self,
        feature_maps: torch.Tensor | Iterable[Any],
        *,
        mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        selection: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> _SelectiveEmbeddingPool:
        r"""Learn every parameter of the pipeline from training feature maps (never the test images).

        The masked, non-zero local features of all maps give the PCA (mean and top ``d`` components, float64
        covariance); their projections give the codebook (k-means or a diagonal GMM, seeded by ``generator``
        only, so the same generator state gives the same fit); T-emb then learns the embedding mean and
        whitening; finally each training image is encoded and the images' vectors give the rotation.

        Args:
            feature_maps: Feature maps :math:`(B, C, H, W)` (with optional ``mask``/``images``), or an iterable
                of :math:`(C, H, W)` / :math:`(B, C, H, W)` tensors or of ``(maps, mask)``, ``(maps, mask,
                images)`` or ``(maps, mask, images, selection)`` tuples (e.g. streamed from a cache; one pass).
            mask: Optional :math:`(B, H, W)` validity mask, only with a single tensor.
            images: Input images, only with a single tensor; required for ``mask="sift"`` unless ``selection``.
            selection: Optional precomputed selective masks, only with a single tensor (see :meth:`select`).
            generator: The random generator of the codebook's initialisation.

        Returns:
            ``self``.

        Raises:
            ShapeError: If a map is not 3-D/4-D or channel counts differ.
            ValueError: If ``d`` exceeds the channel count, or there are fewer than ``k`` training features.
        """
        name = f"{type(self).__name__}.fit"
        sets: list[torch.Tensor] = []
        channels = None
        total = torch.zeros(0, dtype=torch.float64)
        second = torch.zeros(0, dtype=torch.float64)
        count = 0
        for x, m, im, sl in self._items(feature_maps, mask, images, selection):
            if isinstance(x, torch.Tensor) and x.ndim == 3:
                x = x[None]
                m = m[None] if m is not None and m.ndim == 2 else m
                im = im[None] if im is not None and im.ndim == 3 else im
                sl = sl[None] if sl is not None and sl.ndim == 2 else sl
            if not isinstance(x, torch.Tensor) or x.ndim != 4 or (channels is not None and x.shape[1] != channels):
                expected = "(B, C, H, W) or (C, H, W)" if channels is None else f"C = {channels} channels"
                actual = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ShapeError(f"{name}(): feature_maps must have shape {expected}; got {actual}.", expected, actual)
            check_floating(x, name="feature_maps", fn=name)
            check_feature_mask(m, x, fn=name)
            if channels is None:
                channels = x.shape[1]
                if self.d > channels:
                    raise ValueError(
                        f"{name}(): d={self.d} must be at most the channel count C={channels} of feature_maps."
                    )
                total = torch.zeros(channels, dtype=torch.float64)
                second = torch.zeros(channels, channels, dtype=torch.float64)
            xf = x.float()
            keep = self.select(xf, m, im, sl).cpu()
            xf = xf.cpu()
            for i in range(x.shape[0]):
                f = xf[i].flatten(1).mT[keep[i].flatten()]  # (n_i, C)
                sets.append(f)
                f64 = f.double()
                total += f64.sum(0)
                second += f64.T @ f64
                count += f.shape[0]
        if channels is None or count < self.k:
            raise ValueError(
                f"{name}(): feature_maps hold {count} selected local features; at least k={self.k} are needed "
                "(an empty or all-zero training set?)."
            )
        mean = total / count
        cov = second / count - torch.outer(mean, mean)
        _, vecs = _descending_eigh((cov + cov.T) / 2)
        self.local_mean = mean.float()
        self.local_proj = vecs[:, : self.d].float().contiguous()
        # Projected, L2-normalised training features (float32), per image.
        xes = [l2n((f - self.local_mean) @ self.local_proj) for f in sets]
        self._fit_codebook(torch.cat(xes), generator)
        if self.whiten_embedding:
            self._fit_whitening(torch.cat(xes))
        # Each training image's aggregated vector, through the same padded path as forward.
        ys = []
        for start in range(0, len(xes), _IMAGE_CHUNK):
            chunk = xes[start : start + _IMAGE_CHUNK]
            n = max(t.shape[0] for t in chunk)
            xe = torch.zeros(len(chunk), n, self.d)
            valid = torch.zeros(len(chunk), n, dtype=torch.bool)
            for j, t in enumerate(chunk):
                xe[j, : t.shape[0]] = t
                valid[j, : t.shape[0]] = True
            ys.append(self._aggregate(xe, valid))
        self._fit_rotation(torch.cat(ys).double())
        # The fit runs on the CPU (float64 statistics); the fitted state goes where the module lives.
        device = self._buffers["fitted"].device  # type: ignore[union-attr]
        for buf in self._fitted_buffers:
            self._buffers[buf] = self._buffers[buf].to(device)  # type: ignore[union-attr]
        self._buffers["fitted"] = torch.ones((), dtype=torch.bool, device=device)
        return self

    def _fit_whitening(self, xe: torch.Tensor) -> None:
        """T-emb: mean and PCA-whitening of the training embeddings, 33 smallest eigenvalues clamped."""
        dim = self.embed_dim(self.d, self.k)
        total = torch.zeros(dim, dtype=torch.float64)
        second = torch.zeros(dim, dim, dtype=torch.float64)
        for chunk in xe.split(8192):
            phi = self._embed(chunk[None])[0].double()
            total += phi.sum(0)
            second += phi.T @ phi
        n = xe.shape[0]
        mean = total / n
        cov = second / n - torch.outer(mean, mean)
        vals, vecs = _descending_eigh((cov + cov.T) / 2)
        vals = vals.clone()
        first = max(dim - CLAMPED_EIGENVALUES, 0)
        vals[first:] = vals[first]
        vals = vals.clamp(min=float(vals[0]) * 1e-12 if float(vals[0]) > 0 else 1e-12)
        self.emb_mean = mean.float()
        self.emb_whiten = (vecs * vals.rsqrt()).float().contiguous()  # phi_w = (phi - mean) @ emb_whiten

    def _fit_rotation(self, y: torch.Tensor) -> None:
        """learn_rn: centre the training images' vectors, PCA (<= 1024 components), complete to a basis (QR)."""
        dim = y.shape[1]
        mean = y.mean(0)
        yc = y - mean
        _, vecs = _descending_eigh(yc.T @ yc / max(y.shape[0], 1))
        keep = min(ROTATION_COMPONENTS, dim)
        if keep < dim:
            basis = torch.cat([vecs[:, :keep], torch.eye(dim, dtype=vecs.dtype)[:, : dim - keep]], dim=1)
            q, r = torch.linalg.qr(basis)
            vecs = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
        self.rot_mean = mean.float()
        self.rotation = vecs.float().contiguous()


class TEmbPool(_SelectiveEmbeddingPool):
    r"""Selective masks + triangulation embedding + democratic (or sum) aggregation, L2-normalised.

    Hoang et al., ACM MM 2017: :math:`M_* + \phi_\Delta + \psi_d` (their default framework). See the module
    docstring for the steps; :func:`deepagg.functional.triangulation_embedding` embeds,
    :func:`deepagg.functional.democratic_weights` aggregates. The output has ``k * d - 128`` dimensions (the first
    128 dimensions after the rotation are dropped): ``d=32, k=20`` gives 512-D; the paper's (d, k) for 1024,
    2048, 4096 and 8064-D are (64, 18), (64, 34), (64, 66) and (128, 64). Call :meth:`fit` on training maps
    first. Differentiable with respect to the features (the mask is a hard selection and carries no gradient).

    Args:
        mask: ``"max"``, ``"sum"``, ``"sift"`` (forward and fit then need ``images=``) or ``None``/``"none"``.
        d: PCA dimension of the local features (at most C).
        k: Number of k-means anchors, >= 2.
        aggregation: ``"democratic"`` or ``"sum"``.
        power: Signed power-law exponent of the final vector, in [0, 1] (0.5 in the paper).
        iters: Democratic iterations (10).
        damping: Democratic damping (0.5).

    Raises:
        ValueError: For an unknown ``mask`` or ``aggregation``, ``k < 2``, ``k * d <= 128``, or ``power``
            outside [0, 1].
        RuntimeError: If forward is called before :meth:`fit` (or loading a fitted ``state_dict``).

    Shape:
        - x: :math:`(B, C, H, W)` non-negative; mask (optional): :math:`(B, H, W)` bool; images (``"sift"``):
          :math:`(B, 1|3, H_I, W_I)`.
        - Output: :math:`(B, k d - 128)`, unit rows, in the dtype of ``x``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pool = TEmbPool(mask="max", d=8, k=20).fit(torch.rand(6, 16, 7, 9, generator=g), generator=g)
        >>> pool(torch.rand(2, 16, 7, 9)).shape
        torch.Size([2, 32])
    """

    truncate = 128
    whiten_embedding = True
    _fitted_buffers = (*_SelectiveEmbeddingPool._fitted_buffers, "anchors", "emb_mean", "emb_whiten")

    def _embed(self, xe: torch.Tensor) -> torch.Tensor:
        return triangulation_embedding(xe, self.anchors.to(xe.dtype))

    def _fit_codebook(self, xe: torch.Tensor, generator: torch.Generator | None) -> None:
        self.anchors = kmeans(xe, self.k, generator=generator).float().contiguous()


class VLADPool(_SelectiveEmbeddingPool):
    r"""Selective masks + per-feature VLAD residuals + sum (the original VLAD) or democratic aggregation.

    Hoang et al., ACM MM 2017, Table 3 (:math:`\phi_{VLAD} + \psi_s` and :math:`+ \psi_d`): hard assignment to
    the nearest of ``k`` k-means centroids (:func:`deepagg.functional.vlad_embedding`), no embedding whitening,
    no truncation; the output has ``k * d`` dimensions (``d=32, k=16``: 512-D; the paper's 4224-D is d=64, k=66).
    Same arguments, fitting and shapes as :class:`TEmbPool`; defaults ``d=32, k=16, aggregation="sum"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pool = VLADPool(mask="sum", d=4, k=3).fit(torch.rand(6, 16, 7, 9, generator=g), generator=g)
        >>> pool(torch.rand(2, 16, 7, 9)).shape
        torch.Size([2, 12])
    """

    _fitted_buffers = (*_SelectiveEmbeddingPool._fitted_buffers, "centroids")

    def __init__(
        self,
        mask: str | None = "max",
        d: int = 32,
        k: int = 16,
        aggregation: str = "sum",
        power: float = 0.5,
        *,
        iters: int = 10,
        damping: float = 0.5,
    ) -> None:
        super().__init__(mask, d, k, aggregation, power, iters=iters, damping=damping)

    def _embed(self, xe: torch.Tensor) -> torch.Tensor:
        return vlad_embedding(xe, self.centroids.to(xe.dtype))

    def _fit_codebook(self, xe: torch.Tensor, generator: torch.Generator | None) -> None:
        self.centroids = kmeans(xe, self.k, generator=generator).float().contiguous()


class FisherVectorPool(_SelectiveEmbeddingPool):
    r"""Selective masks + per-feature Fisher vectors of a diagonal GMM + sum (average) or democratic aggregation.

    Hoang et al., ACM MM 2017, eq. 4 and Table 3 (:math:`\phi_{FV} + \psi_a` and :math:`+ \psi_d`): the GMM
    (``k`` components, initialised by k-means, as VLFeat's ``vl_gmm``) is fitted on the projected training
    features (:func:`deepagg.functional.fit_gmm`), each feature embeds to its first- and second-order gradients
    (:func:`deepagg.functional.fisher_embedding`), no truncation; the output has ``2 k d`` dimensions
    (``d=16, k=16``: 512-D; the paper's 4224-D is d=48, k=44). Average and sum pooling agree after the L2.
    Same arguments, fitting and shapes as :class:`TEmbPool`; defaults ``d=16, k=16, aggregation="sum"``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> pool = FisherVectorPool(mask=None, d=4, k=3).fit(torch.rand(6, 16, 7, 9, generator=g), generator=g)
        >>> pool(torch.rand(2, 16, 7, 9)).shape
        torch.Size([2, 24])
    """

    _fitted_buffers = (*_SelectiveEmbeddingPool._fitted_buffers, "gmm_means", "gmm_variances", "gmm_weights")

    def __init__(
        self,
        mask: str | None = "max",
        d: int = 16,
        k: int = 16,
        aggregation: str = "sum",
        power: float = 0.5,
        *,
        iters: int = 10,
        damping: float = 0.5,
    ) -> None:
        super().__init__(mask, d, k, aggregation, power, iters=iters, damping=damping)

    @staticmethod
    def embed_dim(d: int, k: int) -> int:
        return 2 * k * d

    def _embed(self, xe: torch.Tensor) -> torch.Tensor:
        dt = xe.dtype
        return fisher_embedding(xe, self.gmm_means.to(dt), self.gmm_variances.to(dt), self.gmm_weights.to(dt))

    def _fit_codebook(self, xe: torch.Tensor, generator: torch.Generator | None) -> None:
        means, variances, weights = fit_gmm(xe, self.k, generator=generator)
        self.gmm_means = means.float().contiguous()
        self.gmm_variances = variances.float().contiguous()
        self.gmm_weights = weights.float().contiguous()

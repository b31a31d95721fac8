"""HeW aggregation (:class:`HeWPool`) and HeR re-ranking (:class:`HeR`) modules."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from deepagg._checks import ShapeError
from deepagg.functional.heat import METHODS, _check_positive, _check_variant, heat_rerank, hew
from deepagg.functional.normalize import l2n
from deepagg.nn.pooling import _Pool, _upcast
from deepagg.nn.rerank import Reranker, RerankState

__all__ = ["HeR", "HeWPool"]

#: Default ground conductance of HeW per variant: "paper" from the lam ablation on clutter (docs/hew-her.md),
#: "hewr" the authors' constZ = 0.1.
HEW_DEFAULT_LAM = {"paper": 1.0, "hewr": 0.1}
#: Default ground conductance of HeR per variant ("hewr": the authors' constZ).
HER_DEFAULT_LAM = {"paper": 1.0, "hewr": 0.1}


class HeWPool(_Pool):
    r"""HeW heat-diffusion weighted sum pooling, power ``alpha``, L2-normalised. See :func:`deepagg.functional.hew`.

    Ma et al., TMM 2018 (eq. 8). ``nn.Sequential(backbone, HeWPool())`` gives unit descriptors.
    ``variant="hewr"`` reproduces the authors' MATLAB; it centres the local features by the mean local feature
    of a training set: call :meth:`fit_center` first (the centre is a buffer, saved in the state_dict).

    Args:
        lam: Ground conductance, > 0; None: the variant's default (``HEW_DEFAULT_LAM``: "paper" chosen by the
            ablation on clutter, "hewr" the authors' 0.1).
        alpha: Power of the weighted sum, > 0 (0.5 in the paper).
        variant: ``"paper"`` or ``"hewr"``.
        affinity_threshold: ``"hewr"`` only (None: 0.1).
        eps: Clamp floor before the power, > 0.
        method: Solver path, ``"auto"``, ``"cholesky"`` or ``"woodbury"`` (``"paper"`` only).
        device: Device of the ``center`` buffer.
        dtype: Dtype of the ``center`` buffer.

    Raises:
        ValueError: If ``lam``, ``alpha`` or ``eps`` is not a finite number > 0, or ``variant``/``method`` is
            unknown, or an option does not apply to the variant.

    Shape:
        - x: :math:`(B, C, H, W)`; mask (optional): :math:`(B, H, W)` bool.
        - Output: :math:`(B, C)`, unit rows, in the dtype of ``x``.

    Example:
        >>> HeWPool()(torch.rand(2, 512, 24, 32)).shape
        torch.Size([2, 512])
    """

    center: torch.Tensor

    def __init__(
        self,
        lam: float | None = None,
        alpha: float = 0.5,
        variant: str = "paper",
        affinity_threshold: float | None = None,
        eps: float = 1e-6,
        method: str = "auto",
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cls = "HeWPool"
        self.variant = _check_variant(variant, cls)
        self.lam = HEW_DEFAULT_LAM[variant] if lam is None else _check_positive(lam, "lam", cls)
        self.alpha = _check_positive(alpha, "alpha", cls)
        self.eps = _check_positive(eps, "eps", cls)
        if method not in METHODS:
            raise ValueError(f"{cls}(): method must be one of {METHODS}; got {method!r}.")
        if variant == "paper" and affinity_threshold is not None:
            raise ValueError(f"{cls}(): affinity_threshold is an option of variant='hewr' only.")
        if variant == "hewr" and method == "woodbury":
            raise ValueError(f"{cls}(): method='woodbury' is exact only for variant='paper'.")
        self.method = method
        self.affinity_threshold = None if affinity_threshold is None else float(affinity_threshold)
        # Empty until fit_center() (or load_state_dict) gives it its (C,) value.
        self.register_buffer("center", torch.zeros(0, device=device, dtype=dtype or torch.get_default_dtype()))

    @torch.no_grad()
    def fit_center(self, maps: torch.Tensor | Iterable[torch.Tensor], mask: torch.Tensor | None = None) -> HeWPool:
        r"""Set ``center`` to the mean local feature of a training set (the authors' ``create_mean.m``).

        Args:
            maps: Feature maps :math:`(B, C, H, W)`, or an iterable of :math:`(C, H, W)` or
                :math:`(B, C, H, W)` maps (e.g. streamed from a cache), all with the same C.
            mask: Optional :math:`(B, H, W)` validity mask, only with a single tensor ``maps``.

        Returns:
            ``self``.

        Raises:
            ShapeError: If a map is not 3-D/4-D or the channel counts differ.
            ValueError: If there is no valid position at all.
        """
        items = [maps] if isinstance(maps, torch.Tensor) else maps
        total: torch.Tensor | None = None
        count = 0
        for m in items:
            if m.ndim == 3:
                m = m[None]
            if m.ndim != 4 or (total is not None and m.shape[1] != total.shape[0]):
                expected = "(B, C, H, W) or (C, H, W)" if total is None else f"C = {total.shape[0]} channels"
                raise ShapeError(
                    f"HeWPool.fit_center(): maps must have shape {expected}; got {tuple(m.shape)}.",
                    expected=expected,
                    actual=tuple(m.shape),
                )
            f = m.double().flatten(2).mT  # (B, n, C)
            if mask is not None and isinstance(maps, torch.Tensor):
                keep = mask.flatten(1)
                f = torch.where(keep[..., None], f, 0.0)
                count += int(keep.sum())
            else:
                count += f.shape[0] * f.shape[1]
            s = f.sum((0, 1))
            total = s if total is None else total + s
        if total is None or count == 0:
            raise ValueError("HeWPool.fit_center(): maps hold no valid position; got an empty training set.")
        self.center = (total / count).to(self.center.dtype).to(self.center.device)
        return self

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
        stored = state_dict.get(prefix + "center")
        if isinstance(stored, torch.Tensor) and stored.shape != self.center.shape:
            self.center = torch.empty_like(self.center).resize_(stored.shape)  # a fitted centre of any C
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weight, sum, power and L2-normalise (in at least float32); the output has the dtype of ``x``."""
        center = None
        if self.variant == "hewr":
            if self.center.numel() == 0:
                raise RuntimeError(
                    "HeWPool(variant='hewr'): call fit_center(maps) on training feature maps first (the authors "
                    "centre the local features by the mean local feature of a training set)."
                )
            center = self.center
        out = hew(
            _upcast(x),
            lam=self.lam,
            alpha=self.alpha,
            eps=self.eps,
            mask=mask,
            variant=self.variant,
            center=center,
            affinity_threshold=self.affinity_threshold,
            method=self.method,
        )
        return l2n(out).to(x.dtype)

    def extra_repr(self) -> str:
        extra = f", affinity_threshold={self.affinity_threshold}" if self.affinity_threshold is not None else ""
        fitted = f", center=({self.center.numel()},)" if self.variant == "hewr" else ""
        return f"lam={self.lam}, alpha={self.alpha}, variant={self.variant!r}{extra}{fitted}"


class HeR(Reranker):
    r"""Heat re-ranking of each query's top k (eq. 14). See :func:`deepagg.functional.heat_rerank`.

    Args:
        k: Shortlist length, an int >= 1 (800 in the paper; capped at the ranking length).
        lam: Ground conductance, > 0; None: the variant's default (``HER_DEFAULT_LAM``).
        variant: ``"paper"`` or ``"hewr"`` (the authors' ``cast_rerank.m``).

    Raises:
        ValueError: If ``k`` is not an int >= 1, ``lam`` not a finite number > 0, or ``variant`` unknown.

    Shape:
        - q: :math:`(Q, D)`, db: :math:`(N, D)` (unit rows), ranks: :math:`(Q, K)` int64.
        - Output: :math:`(Q, K)` int64 rankings.

    Example:
        >>> from deepagg.functional import l2n
        >>> q, db = l2n(torch.randn(3, 16)), l2n(torch.randn(50, 16))
        >>> HeR(k=20)(q, db, torch.argsort(q @ db.T, dim=1, descending=True)).shape
        torch.Size([3, 50])
    """

    def __init__(self, k: int = 800, lam: float | None = None, variant: str = "paper") -> None:
        super().__init__()
        cls = "HeR"
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"{cls}(): k must be an int >= 1; got {k!r}.")
        self.k = k
        self.variant = _check_variant(variant, cls)
        self.lam = HER_DEFAULT_LAM[variant] if lam is None else _check_positive(lam, "lam", cls)

    def forward(self, q: torch.Tensor, db: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
        """Re-rank the top k of ``ranks`` :math:`(Q, K)` for queries ``q`` against database ``db``."""
        return heat_rerank(q, db, ranks, k=self.k, lam=self.lam, variant=self.variant)

    def rerank(self, state: RerankState) -> RerankState:
        """The re-ranker interface: new rankings, same descriptors."""
        return state.replace(ranks=self(state.q, state.db, state.ranks))

    def extra_repr(self) -> str:
        return f"k={self.k}, lam={self.lam}, variant={self.variant!r}"

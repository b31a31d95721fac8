"""Whitening module: a fitted affine projection of descriptors followed by L2 normalisation."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deepagg.functional.normalize import l2n
from deepagg.functional.whitening import _learned_whitening64, _pca_whitening64, whiten

__all__ = ["Whiten"]


class Whiten(nn.Module):
    r"""Whitening of global descriptors: :math:`\mathrm{l2n}((x - \mu) P^\top)`, fitted by PCA or Lw.

    Fit it once with :meth:`fit_pca` (unsupervised PCA-whitening with shrinkage) or :meth:`fit_learned`
    (Radenović's supervised learned whitening Lw from matching pairs), on training descriptors disjoint from the
    test set; both return ``self``. The fit is stored in ``mean`` :math:`(in\_dim,)`, ``projection``
    :math:`(out\_dim, in\_dim)` and the buffer ``fitted`` (a bool scalar), so it is saved and restored by
    ``state_dict`` / ``load_state_dict``. With ``out_dim < in_dim`` the projection keeps the leading
    ``out_dim`` directions (dimensionality reduction).

    ``mean`` and ``projection`` are buffers by default (``learnable=False``: fitted, never trained). With
    ``learnable=True`` they are ``nn.Parameter``\ s, so the whitening can be fitted first (e.g. by
    :meth:`fit_learned`) and then fine-tuned end to end with the network (cirtorch's whitening layer); gradients
    reach the input, ``mean`` and ``projection``. The fits copy into them in place (under ``no_grad``). The
    ``state_dict`` keys are the same either way, so a learnable Whiten's state loads into a plain one and vice
    versa. A fit or a ``load_state_dict`` that changes the number of rows of ``projection`` (the rank cap below)
    replaces it by a **new** Parameter object: build the optimizer after fitting or loading.

    The ``out_dim`` given at construction is the requested dimension (kept as ``requested_out_dim``). A fit on
    rank-deficient training data (fewer than ``in_dim`` linearly independent pair differences for Lw, N - 1 <
    ``in_dim`` rows for PCA) determines only r directions: it warns (``UserWarning``) and keeps
    ``min(requested_out_dim, r)`` of them, so ``projection`` becomes :math:`(r, in\_dim)` and ``out_dim``, the
    output, :attr:`weight`, :attr:`bias`, :meth:`as_linear` and ``extra_repr`` follow (see the rank cap of
    :func:`deepagg.functional.learned_whitening`). A later fit requests ``requested_out_dim`` again.
    ``load_state_dict`` accepts a stored ``projection`` of shape :math:`(r, in\_dim)` with
    ``1 <= r <= requested_out_dim`` and resizes the buffer to it, so a capped fit loads into a fresh
    ``Whiten(in_dim, out_dim)``; any other shape is an error.

    The module behaves as an ``nn.Linear`` with
    ``weight = projection`` and ``bias = -projection @ mean`` followed by L2 normalisation (:attr:`weight`,
    :attr:`bias`, :meth:`as_linear`). Fitting is exempt from ``torch.compile``; ``forward`` compiles with
    ``fullgraph=True``.

    See :func:`deepagg.functional.whiten`, :func:`deepagg.functional.pca_whitening` and
    :func:`deepagg.functional.learned_whitening`.

    Args:
        in_dim: Input descriptor dimension D >= 1.
        out_dim: Requested output dimension d, ``1 <= d <= in_dim``; ``None`` means ``in_dim``. A rank-deficient
            fit lowers the attribute ``out_dim`` to the rank r (``requested_out_dim`` keeps d).
        learnable: ``mean`` and ``projection`` are ``nn.Parameter``\ s (trainable) when True, buffers when False.
        device: Device of the buffers.
        dtype: Floating dtype of ``mean`` and ``projection``.

    Raises:
        ValueError: If ``in_dim`` or ``out_dim`` is out of range.

    Shape:
        - Input: :math:`(B, in\_dim)`.
        - Output: :math:`(B, out\_dim)`, L2-normalised rows, in the input dtype; ``out_dim`` is
          ``min(requested_out_dim, r)`` after a fit.

    Example:
        >>> w = Whiten(16, 8).fit_pca(torch.randn(100, 16))
        >>> w(torch.randn(5, 16)).shape
        torch.Size([5, 8])
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     w = Whiten(16, 8).fit_learned(torch.randn(10, 16), torch.tensor([[0, 1], [2, 3], [4, 5]]))
        >>> w, w(torch.randn(5, 16)).shape, len(caught)
        (Whiten(in_dim=16, out_dim=3, requested_out_dim=8, fitted=True), torch.Size([5, 3]), 1)
    """

    mean: torch.Tensor
    projection: torch.Tensor
    fitted: torch.Tensor

    def __init__(
        self,
        in_dim: int,
        out_dim: int | None = None,
        *,
        learnable: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(in_dim, bool) or not isinstance(in_dim, int) or in_dim < 1:
            raise ValueError(f"Whiten(): in_dim must be an int >= 1; got {in_dim!r}.")
        if out_dim is None:
            out_dim = in_dim
        if isinstance(out_dim, bool) or not isinstance(out_dim, int) or not 1 <= out_dim <= in_dim:
            raise ValueError(
                f"Whiten(): out_dim must be an int with 1 <= out_dim <= in_dim = {in_dim}; got {out_dim!r}."
            )
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"Whiten(): dtype must be a floating dtype; got {dtype}.")
        if not isinstance(learnable, bool):
            raise TypeError(f"Whiten(): learnable must be a bool; got {type(learnable).__name__}.")
        self.in_dim = in_dim
        self.learnable = learnable
        self.requested_out_dim = out_dim
        # The current output dimension (rows of ``projection``): requested_out_dim, or the rank after a capped fit.
        self.out_dim = out_dim
        dd: dict[str, Any] = {"device": device, "dtype": dtype}
        if learnable:
            self.mean = nn.Parameter(torch.zeros(in_dim, **dd))
            self.projection = nn.Parameter(torch.eye(out_dim, in_dim, **dd))
        else:
            self.register_buffer("mean", torch.zeros(in_dim, **dd))
            self.register_buffer("projection", torch.eye(out_dim, in_dim, **dd))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=device))
        # Python mirror of the ``fitted`` buffer: forward checks it without a host sync or a graph break.
        self._fitted = False
        self.register_load_state_dict_post_hook(_sync_fitted)

    def _resolve_dim(self, dim: int | None, fn: str) -> int:
        if dim is None:
            return self.requested_out_dim
        if dim != self.requested_out_dim:
            raise ValueError(
                f"{fn}(): dim must equal out_dim = {self.requested_out_dim} (or be None); got {dim!r}. "
                f"Build Whiten({self.in_dim}, out_dim={dim!r}) for another output size."
            )
        return dim

    def _resize_projection(self, rows: int) -> None:
        """Replace ``projection`` by a zero ``(rows, in_dim)`` tensor if its rows differ.

        The new tensor has the old one's device and dtype, and its kind: a buffer stays a buffer, a Parameter
        becomes a new Parameter (with the old ``requires_grad``).
        """
        old = self.projection
        if rows != old.shape[0]:
            new = torch.zeros(rows, self.in_dim, device=old.device, dtype=old.dtype)
            if isinstance(old, nn.Parameter):
                self.projection = nn.Parameter(new, requires_grad=old.requires_grad)
            else:
                self.projection = new
        self.out_dim = rows

    @torch.no_grad()
    def _store(self, mean: torch.Tensor, projection: torch.Tensor) -> None:
        self._resize_projection(projection.shape[0])
        self.mean.copy_(mean)
        self.projection.copy_(projection)
        self.fitted.fill_(True)
        self._fitted = True

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
        # A capped fit stores fewer rows than requested_out_dim: resize ``projection`` to the stored shape first.
        stored = state_dict.get(prefix + "projection")
        if isinstance(stored, torch.Tensor):
            shape = tuple(stored.shape)
            name = f"Whiten.load_state_dict(): the saved {prefix}projection has shape {shape}"
            if len(shape) != 2 or shape[1] != self.in_dim:
                error_msgs.append(
                    f"{name}, but this Whiten has in_dim = {self.in_dim} (expected shape (r, {self.in_dim})). "
                    "Build the Whiten with the in_dim of the saved one."
                )
                return
            if not 1 <= shape[0] <= self.requested_out_dim:
                error_msgs.append(
                    f"{name}, but this Whiten was built with out_dim = {self.requested_out_dim} (expected 1 to "
                    f"{self.requested_out_dim} rows). Build Whiten({self.in_dim}, out_dim={shape[0]}) to load it."
                )
                return
            self._resize_projection(shape[0])
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def fit_pca(
        self, X: torch.Tensor, dim: int | None = None, shrinkage: float = 1.0, *, eig_floor: float = 1e-10
    ) -> Whiten:
        r"""Fit PCA-whitening with shrinkage on training descriptors (see :func:`deepagg.functional.pca_whitening`).

        Args:
            X: Training descriptors of shape :math:`(N, in\_dim)`, N >= 2.
            dim: ``None`` or the ``out_dim`` requested at construction.
            shrinkage: Eigenvalue exponent s >= 0: 1 = full whitening, 0 = PCA rotation only.
            eig_floor: Relative eigenvalue floor in (0, 1).

        Returns:
            ``self``, fitted, with ``out_dim = min(requested_out_dim, r)`` for the rank r of the covariance of ``X``
            (r <= N - 1).

        Warns:
            UserWarning: Once, if ``r < requested_out_dim``; the projection then has r rows.

        Raises:
            ShapeError: If ``X`` is not :math:`(N, in\_dim)` with N >= 2.
            DTypeError: If ``X`` is not floating point.
            ValueError: If ``dim != out_dim``, or as :func:`deepagg.functional.pca_whitening`.
        """
        dim = self._resolve_dim(dim, "Whiten.fit_pca")
        advice = f"build Whiten({self.in_dim}, out_dim={{rank}})"
        self._store(*_pca_whitening64(X, dim, shrinkage, eig_floor, "Whiten.fit_pca", self.in_dim, "X", advice))
        return self

    def fit_learned(
        self,
        X: torch.Tensor,
        pos_pairs: torch.Tensor,
        dim: int | None = None,
        *,
        eig_floor: float = 1e-10,
        center: str = "all",
        shrinkage: float = 0.0,
    ) -> Whiten:
        r"""Fit the learned whitening Lw from matching pairs (see :func:`deepagg.functional.learned_whitening`).

        Args:
            X: Training descriptors of shape :math:`(N, in\_dim)`, N >= 2.
            pos_pairs: Matching pairs, int64 row indices into ``X`` of shape :math:`(P, 2)`, queries first.
            dim: ``None`` or the ``out_dim`` requested at construction.
            eig_floor: Relative eigenvalue floor in (0, 1).
            center: ``"all"`` (the mean of all rows of ``X``) or ``"queries"`` (the mean of ``X[pos_pairs[:, 0]]``,
                repeats counted, as cirtorch's ``whitenlearn``).
            shrinkage: Shrinkage intensity a in [0, 1] of the pair covariance towards its mean eigenvalue (0: Lw as
                published; a > 0 determines every direction, so there is no rank cap).

        Returns:
            ``self``, fitted, with ``out_dim = min(requested_out_dim, r)`` for the rank r of the pair-difference
            covariance.

        Warns:
            UserWarning: Once, if ``r < requested_out_dim``; the projection then has r rows.

        Raises:
            ShapeError: If ``X`` is not :math:`(N, in\_dim)` or ``pos_pairs`` not :math:`(P, 2)`.
            DTypeError: If ``X`` is not floating point or ``pos_pairs`` not integer.
            ValueError: If ``dim != out_dim``, ``center`` is invalid, or as
                :func:`deepagg.functional.learned_whitening`.
        """
        dim = self._resolve_dim(dim, "Whiten.fit_learned")
        fit = _learned_whitening64(
            X,
            pos_pairs,
            dim,
            eig_floor,
            "Whiten.fit_learned",
            self.in_dim,
            "X",
            center=center,
            advice=f"build Whiten({self.in_dim}, out_dim={{rank}})",
            shrinkage=shrinkage,
        )
        self._store(*fit)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """The ``nn.Linear`` weight equivalent to the whitening: ``projection``, of shape ``(out_dim, in_dim)``."""
        return self.projection

    @property
    def bias(self) -> torch.Tensor:
        """The ``nn.Linear`` bias equivalent to the whitening: ``-projection @ mean``, of shape ``(out_dim,)``."""
        return -(self.projection @ self.mean)

    def as_linear(self) -> nn.Linear:
        """A new ``nn.Linear(in_dim, out_dim)`` initialised to the fitted whitening (without the L2 normalisation).

        Use it as a trainable whitening layer to fine-tune (cirtorch-style). Its parameters are copies.

        Raises:
            RuntimeError: If the module has not been fitted.
        """
        self._require_fitted()
        layer = nn.Linear(self.in_dim, self.out_dim, device=self.mean.device, dtype=self.mean.dtype)
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            layer.bias.copy_(self.bias)
        return layer

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError(
                "Whiten: the whitening is not fitted; call fit_pca(X) or fit_learned(X, pos_pairs) first "
                "(or load_state_dict from a fitted Whiten)."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r"""Whiten and L2-normalise descriptors ``x`` of shape :math:`(B, in\_dim)`."""
        self._require_fitted()
        return l2n(whiten(x, self.mean, self.projection))

    def extra_repr(self) -> str:
        capped = f", requested_out_dim={self.requested_out_dim}" if self.out_dim != self.requested_out_dim else ""
        learnable = ", learnable=True" if self.learnable else ""
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}{capped}{learnable}, fitted={self._fitted}"


def _sync_fitted(module: nn.Module, incompatible_keys: Any) -> None:
    """After ``load_state_dict``, mirror the loaded ``fitted`` buffer into the Python flag."""
    if isinstance(module, Whiten) and module.fitted.device.type != "meta":
        module._fitted = bool(module.fitted)

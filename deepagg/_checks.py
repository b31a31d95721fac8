"""Input validation shared by every op, and the error classes it raises.

Every check raises an error whose message names the function, the argument, the expected value and the
actual value on one line, e.g.::

    gem(): x must have shape (B, C, H, W); got (2, 3, 7) with 3 dims. Pass feature maps, not descriptors.

The classes subclass the built-in exceptions (``ShapeError(ValueError)``, ``DTypeError(TypeError)``,
``DeviceError(ValueError)``) so that ``except ValueError`` keeps working for users. Only metadata (ndim,
shape, dtype, device) is checked here: these checks never synchronise with a GPU.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = [
    "DTypeError",
    "DeviceError",
    "ShapeError",
    "check_dtype",
    "check_feature_mask",
    "check_floating",
    "check_positive",
    "check_same_device",
    "check_shape",
]


class ShapeError(ValueError):
    """A tensor has the wrong number of dimensions or the wrong size along one of them."""

    def __init__(self, message: str, expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class DTypeError(TypeError):
    """A tensor has a dtype the op does not accept."""

    def __init__(self, message: str, expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


class DeviceError(ValueError):
    """Tensors that must live on one device do not."""

    def __init__(self, message: str, expected: Any = None, actual: Any = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.actual = actual


def _fmt_shape(shape: Iterable[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_shape(
    x: Any,
    spec: str,
    *,
    name: str,
    fn: str,
    hint: str = "",
    sizes: dict[str, int] | None = None,
) -> dict[str, int]:
    """Check that ``x`` is a tensor of the shape described by ``spec`` and return the named sizes.

    Args:
        x: The value to check.
        spec: Comma-separated dimension names, e.g. ``"B,C,H,W"``. A name that is an integer literal must
            match exactly; a letter name binds to the actual size and must agree with ``sizes`` if given there.
        name: The argument's name, as the user passed it.
        fn: The public function's name (without parentheses).
        hint: An optional sentence appended to the message.
        sizes: Already-bound sizes that this tensor must agree with (e.g. ``{"B": 2}``).

    Returns:
        A dict from each letter name in ``spec`` to its size in ``x`` (merged with ``sizes``).

    Raises:
        TypeError: If ``x`` is not a tensor.
        ShapeError: If the rank or a bound size differs.
    """
    dims = [d.strip() for d in spec.split(",")]
    pretty = "(" + ", ".join(dims) + ")"
    tail = f" {hint}" if hint else ""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}(): {name} must be a torch.Tensor of shape {pretty}; got {type(x).__name__}.{tail}")
    if x.ndim != len(dims):
        raise ShapeError(
            f"{fn}(): {name} must have shape {pretty}; got {_fmt_shape(x.shape)} with {x.ndim} dims.{tail}",
            expected=pretty,
            actual=tuple(x.shape),
        )
    bound: dict[str, int] = dict(sizes or {})
    for dim_name, size in zip(dims, x.shape, strict=True):
        if dim_name.lstrip("-").isdigit():
            if int(dim_name) != size:
                raise ShapeError(
                    f"{fn}(): {name} must have shape {pretty}; got {_fmt_shape(x.shape)}.{tail}",
                    expected=pretty,
                    actual=tuple(x.shape),
                )
            continue
        if dim_name in bound and bound[dim_name] != size:
            raise ShapeError(
                f"{fn}(): {name} must have shape {pretty} with {dim_name}={bound[dim_name]}; "
                f"got {_fmt_shape(x.shape)}.{tail}",
                expected={dim_name: bound[dim_name]},
                actual=tuple(x.shape),
            )
        bound[dim_name] = int(size)
    return bound


def check_floating(x: torch.Tensor, *, name: str, fn: str) -> None:
    """Raise :class:`DTypeError` unless ``x`` has a floating-point dtype."""
    if not x.is_floating_point():
        raise DTypeError(
            f"{fn}(): {name} must be a floating-point tensor; got dtype {x.dtype}. Call .float() first.",
            expected="floating point",
            actual=x.dtype,
        )


def check_dtype(x: torch.Tensor, allowed: Sequence[torch.dtype], *, name: str, fn: str) -> None:
    """Raise :class:`DTypeError` unless ``x.dtype`` is one of ``allowed``."""
    if x.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise DTypeError(
            f"{fn}(): {name} must have dtype in [{names}]; got {x.dtype}.",
            expected=tuple(allowed),
            actual=x.dtype,
        )


def check_same_device(tensors: dict[str, torch.Tensor | None], *, fn: str) -> None:
    """Raise :class:`DeviceError` unless every non-None tensor in ``tensors`` is on the same device."""
    items = [(k, v) for k, v in tensors.items() if v is not None]
    if not items:
        return
    first_name, first = items[0]
    for other_name, other in items[1:]:
        if other.device != first.device:
            raise DeviceError(
                f"{fn}(): {other_name} must be on the same device as {first_name} ({first.device}); "
                f"got {other.device}.",
                expected=first.device,
                actual=other.device,
            )


def check_positive(value: float, *, name: str, fn: str, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless the Python number ``value`` is positive (or non-negative)."""
    ok = value >= 0 if allow_zero else value > 0
    if not ok or value != value:  # NaN check without importing math
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{fn}(): {name} must be {bound}; got {value}.")


def check_feature_mask(mask: torch.Tensor | None, x: torch.Tensor, *, fn: str) -> None:
    """Validate a ``(B, H, W)`` boolean validity mask against feature maps ``x`` of shape ``(B, C, H, W)``.

    Only metadata is checked (no host sync): an all-False image is documented to give a zero descriptor.
    """
    if mask is None:
        return
    check_shape(
        mask,
        "B,H,W",
        name="mask",
        fn=fn,
        sizes={"B": x.shape[0], "H": x.shape[2], "W": x.shape[3]},
        hint="The mask is on the feature grid, True = valid.",
    )
    check_dtype(mask, (torch.bool,), name="mask", fn=fn)
    check_same_device({"x": x, "mask": mask}, fn=fn)


def check_int(value: Any, *, name: str, fn: str, minimum: int) -> int:
    """``value`` as an int (``operator.index``) if it is one and >= ``minimum``; bools are refused.

    Raises:
        TypeError: If ``value`` is a bool or not an integer.
        ValueError: If ``value < minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{fn}(): {name} must be an int >= {minimum}; got {value!r}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}(): {name} must be an int >= {minimum}; got {type(value).__name__} {value!r}.") from None
    if value < minimum:
        raise ValueError(f"{fn}(): {name} must be >= {minimum}; got {value}.")
    return int(value)

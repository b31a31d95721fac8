r"""Maximally stable extremal regions (MSER) of many 8-bit maps at once, in torch (CPU or GPU).

:func:`bright_msers` finds the high-activation MSERs that :func:`deepagg.functional.mser_regions` finds with
OpenCV, for a whole batch of maps in one pass of tensor ops, so that DSM's detector runs on a GPU without
OpenCV. It reproduces OpenCV's grayscale MSER (4.x / 5.x, the linear-time algorithm of Nistér and Stewénius),
its bright pass, followed by the two filters of :func:`~deepagg.functional.mser_regions`:

1. **The component tree.** The nodes are the connected components (4-neighbours) of the upper level sets
   :math:`\{I \ge t\}` of each map's *interior*: OpenCV marks the outer row and column of pixels as a border and
   never puts them in a region (which is why it refuses maps under 3 x 3). A node's level is the smallest value
   inside, its parent the component of the next level below that contains it. The tree is built level by level
   from 255 down to 0 (256 steps whatever the number of maps): the pixels of a level join by union-find over the
   4-neighbour edges that become active at that level (hooking by index and pointer jumping, batched over all
   maps), and every component that gained a pixel gets a node whose children are the components it absorbed.
2. **Stability as OpenCV computes it.** For a node :math:`n` of level :math:`l` and size :math:`|n|`, OpenCV's
   variation is :math:`(|h_1| - |h_0|) / |n|` in float32, with :math:`h_1` the largest ancestor of level
   :math:`\ge l - \delta` (the component at level :math:`l - \delta`) and :math:`h_0` the last node of level
   :math:`\le l + \delta` on the chain of *largest* children below :math:`n` (OpenCV follows its ``child_``
   pointer, which each merge sets to the larger child). A node is a region when ``min_area <= |n| <= max_area``,
   its variation is at most ``max_variation``, not larger than any child's (children under ``min_area`` have
   none), and, when positive, smaller than its parent's.
3. **High activation only**: a region is kept when every pixel inside is higher than every 4-neighbour outside
   it. Its interior neighbours are lower by construction; its border neighbours are checked.
4. **VLFeat's diversity rule**: regions are visited from the largest; one is dropped when the smallest kept
   region containing it (its nearest kept ancestor) is less than ``1 / (1 - min_diversity)`` times larger.

**Agreement with OpenCV.** When two children of a node have the same size, OpenCV's ``child_`` is the one its
flood fill merged last, an order that depends on the path of its scan and cannot be had without running it
sequentially. Here the brighter child (higher level) wins such a tie, then the one whose first pixel comes later
in raster order. On 8-bit maps the ties are frequent between one- and two-pixel children and move a few regions:
on 96 box-filtered noise maps (``tests/test_mser.py``, measured on every run) 1672 of OpenCV's 1676 regions are
found and 17 more that OpenCV does not report; on the features of ``activation_features`` over a noisy synthetic
map, 0.2-0.8 % of OpenCV's are missed (``benchmarks/bench_spatial.py``). On maps without such ties (smooth blobs)
the regions are the same, pixel for pixel.

**Cost.** The tree costs 256 steps of a few dozen tensor ops each, plus work proportional to the pixels (about
250 bytes of memory a pixel at the peak): on 2 CPU cores it is 3-4x slower than OpenCV's C++
(``benchmarks/bench_spatial.py`` prints both); its point is a GPU, where the maps of many images go through one
call.
"""

from __future__ import annotations

import dataclasses

import torch

from deepagg._checks import check_int, check_positive

__all__ = ["BrightRegions", "bright_msers"]

_LIFT_STEPS = 9  # tree depth <= 256 levels < 2^9: binary lifting tables 2^0 .. 2^9 jumps


@dataclasses.dataclass(frozen=True)
class BrightRegions:
    """Regions of ``M`` maps of size ``(H, W)``: ``R`` regions, listed map by map, largest first.

    Attributes:
        pixels: :math:`(P,)` int64 flat pixel index ``y * W + x`` in the region's map, grouped by region.
        region: :math:`(P,)` int64 region of each pixel, non-decreasing (``pixels`` grouped by region).
        map_index: :math:`(R,)` int64 map of each region.
        size: :math:`(R,)` int64 pixels per region.
        level: :math:`(R,)` int64 smallest value inside the region (the level set's threshold).
        shape: ``(H, W)`` of the maps.
    """

    pixels: torch.Tensor
    region: torch.Tensor
    map_index: torch.Tensor
    size: torch.Tensor
    level: torch.Tensor
    shape: tuple[int, int]

    def __len__(self) -> int:
        return int(self.size.shape[0])

    def as_lists(self, num_maps: int) -> list[list[torch.Tensor]]:
        """Per map, its regions as ``(n, 2)`` int64 ``(x, y)`` pixel tensors (the form of ``mser_regions``)."""
        out: list[list[torch.Tensor]] = [[] for _ in range(num_maps)]
        w = self.shape[1]
        xy = torch.stack([self.pixels % w, self.pixels // w], 1)
        for k, part in enumerate(torch.split(xy, self.size.tolist())):
            out[int(self.map_index[k])].append(part)
        return out


def _find(parent: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Roots of ``x`` in the union-find forest ``parent``, with the path of each ``x`` compressed."""
    r = parent.index_select(0, x)
    while True:
        rr = parent.index_select(0, r)
        if torch.equal(rr, r):
            break
        r = rr
    parent.index_copy_(0, x, r)  # duplicates in x write the same root
    return r


def _union(parent: torch.Tensor, ra: torch.Tensor, rb: torch.Tensor) -> None:
    """Join the sets of roots ``ra[i]`` and ``rb[i]``: the larger root hooks onto the smallest it meets."""
    while True:
        differ = ra != rb
        if not bool(differ.any()):
            return
        ra, rb = ra[differ], rb[differ]
        parent.scatter_reduce_(0, torch.maximum(ra, rb), torch.minimum(ra, rb), "amin")
        ra, rb = _find(parent, ra), _find(parent, rb)


def _jump(table: torch.Tensor) -> torch.Tensor:
    """Pointer jumping to a fixed point: ``table`` maps a node to itself (stop), to -1 (none) or onwards."""
    for _ in range(_LIFT_STEPS):
        table = torch.where(table >= 0, table.index_select(0, table.clamp(min=0)), table)
    return table


@dataclasses.dataclass(frozen=True)
class _Tree:
    level: torch.Tensor  # (K,) node level
    size: torch.Tensor  # (K,) node size
    parent: torch.Tensor  # (K,) parent node, -1 for a map's root
    root: torch.Tensor  # (K,) the node's union-find root: its first pixel (global flat index)
    leaf: torch.Tensor  # (n,) the node each interior pixel joined at its own level (-1 elsewhere)
    pixels: torch.Tensor  # (Pi,) global flat indices of the interior pixels


def _component_tree(u8: torch.Tensor) -> _Tree:
    """The component tree of the upper level sets of every map's interior (4-neighbours), nodes by level down."""
    m, h, w = u8.shape
    dev = u8.device
    n = m * h * w
    val = u8.reshape(-1).long()
    idx = torch.arange(n, device=dev)
    col, row = idx % w, (idx // w) % h
    pix = idx[(col >= 1) & (col <= w - 2) & (row >= 1) & (row <= h - 2)]
    right = pix[col[pix] <= w - 3]
    down = pix[row[pix] <= h - 3]
    ea, eb = torch.cat([right, down]), torch.cat([right + 1, down + w])
    ew = torch.minimum(val[ea], val[eb])
    # Pixels and edges by level, highest first (uint8 keys sort fastest); the level boundaries in one host copy.
    pix = pix[torch.argsort((255 - val[pix]).to(torch.uint8), stable=True)]
    order = torch.argsort((255 - ew).to(torch.uint8), stable=True)
    ea, eb = ea[order], eb[order]
    counts = torch.stack(
        [torch.bincount(255 - val[pix], minlength=256), torch.bincount(255 - ew, minlength=256)]
    ).tolist()
    parent = idx.clone()  # union-find over global pixel indices; a pixel joins at its own level
    comp_size = torch.ones(n, dtype=torch.long, device=dev)  # valid at roots
    comp_node = torch.full((n,), -1, dtype=torch.long, device=dev)  # a root's latest node
    leaf = torch.full((n,), -1, dtype=torch.long, device=dev)
    slot = torch.empty(n, dtype=torch.long, device=dev)  # scratch: a new root's position among this level's
    cap = len(pix)  # at most one node per pixel
    level = torch.empty(cap, dtype=torch.long, device=dev)
    size = torch.empty(cap, dtype=torch.long, device=dev)
    node_parent = torch.full((cap,), -1, dtype=torch.long, device=dev)
    node_root = torch.empty(cap, dtype=torch.long, device=dev)
    k = p0 = e0 = 0
    for step in range(256):
        t = 255 - step
        np_, ne = counts[0][step], counts[1][step]
        new = pix[p0 : p0 + np_]
        a, b = ea[e0 : e0 + ne], eb[e0 : e0 + ne]
        p0, e0 = p0 + np_, e0 + ne
        if not np_:
            continue
        ra, rb = _find(parent, a), _find(parent, b)
        # Components that existed before this level and touch it: they become children of the new nodes.
        old = torch.unique(torch.cat([ra[val[a] > t], rb[val[b] > t]]))
        _union(parent, ra, rb)
        roots = _find(parent, new)
        new_roots, inverse = torch.unique(roots, return_inverse=True)
        kk = len(new_roots)
        ids = torch.arange(k, k + kk, device=dev)
        slot[new_roots] = torch.arange(kk, device=dev)
        grown = torch.bincount(inverse, minlength=kk)
        if len(old):
            into = slot[_find(parent, old)]
            grown.index_add_(0, into, comp_size[old])
            node_parent[comp_node[old]] = ids[into]
        comp_size[new_roots] = grown
        comp_node[new_roots] = ids
        leaf[new] = ids[inverse]
        level[k : k + kk] = t
        size[k : k + kk] = grown
        node_root[k : k + kk] = new_roots
        k += kk
    return _Tree(level[:k], size[:k], node_parent[:k], node_root[:k], leaf, pix)


def _stable_nodes(
    tree: _Tree, *, delta: int, min_area: int, max_area: int, max_variation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """OpenCV's stability rule on the tree: ``(captured (K,) bool, variation (K,) float32)``."""
    level, size, parent = tree.level, tree.size, tree.parent
    k = len(level)
    dev = level.device
    nid = torch.arange(k, device=dev)
    has_parent = parent >= 0
    child, of = nid[has_parent], parent[has_parent]
    # OpenCV's child_: the largest child; ties to the brighter one, then to the later first pixel (see the module).
    n = int(tree.leaf.shape[0]) + 1
    key = (size[child] * 256 + level[child]) * n + tree.root[child]
    best = torch.full((k,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, of, key, "amax")
    first_child = nid.clone()
    wins = key == best[of]
    first_child[of[wins]] = child[wins]
    up = torch.where(has_parent, parent, nid)
    # Every step along either chain changes the level, so h0 and h1 lie at most delta steps away: tables of 2^0 ..
    # 2^(s-1) jumps reach 2^s - 1 >= delta steps.
    down_tables, up_tables = [first_child], [up]
    for _ in range(min(int(delta).bit_length(), _LIFT_STEPS) - 1):
        down_tables.append(down_tables[-1][down_tables[-1]])
        up_tables.append(up_tables[-1][up_tables[-1]])
    # h0: the deepest node of level <= l + delta down the first-child chain (levels rise going down);
    # h1: the highest ancestor of level >= l - delta (levels fall going up). Binary lifting, largest jump first.
    h0, h1 = nid, nid
    for d_tab, u_tab in zip(reversed(down_tables), reversed(up_tables), strict=True):
        y = d_tab[h0]
        h0 = torch.where(level[y] <= level + delta, y, h0)
        y = u_tab[h1]
        h1 = torch.where(level[y] >= level - delta, y, h1)
    var = (size[h1] - size[h0]).float() / size.float()  # float32, as OpenCV's
    measured = size >= min_area  # OpenCV gives smaller nodes no variation (FLT_MAX: never captured, never compared)
    captured = measured & (size <= max_area) & (var.double() <= max_variation)
    child_min = torch.full((k,), float("inf"), device=dev)
    counted = measured[child]
    child_min.scatter_reduce_(0, of[counted], var[child[counted]], "amin")
    captured &= var <= child_min
    parent_var = torch.where(has_parent, var[up], float("inf"))
    captured &= ~((var > 0) & (var >= parent_var))
    return captured, var


def _pixel_pairs(tree: _Tree, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (interior pixel, chosen node containing it) as ``(global pixel index, node)``, in no particular order."""
    k = len(chosen)
    nid = torch.arange(k, device=chosen.device)
    nearest = _jump(torch.where(chosen, nid, tree.parent))  # nearest chosen ancestor-or-self, -1 for none
    above = torch.where(tree.parent >= 0, nearest[tree.parent.clamp(min=0)], -1)  # nearest chosen strict ancestor
    pix = tree.pixels
    node = nearest[tree.leaf[pix]]
    pixels, nodes = [], []
    while len(pix):
        inside = node >= 0
        pix, node = pix[inside], node[inside]
        pixels.append(pix)
        nodes.append(node)
        node = above[node]
    return torch.cat(pixels), torch.cat(nodes)


def check_mser_settings(
    fn: str, delta: int, min_area: int, max_area: float, max_variation: float, min_diversity: float
) -> tuple[int, int]:
    """Check the MSER settings shared by the detectors (errors name ``fn``, the argument and the value)."""
    delta = check_int(delta, name="delta", fn=fn, minimum=1)
    min_area = check_int(min_area, name="min_area", fn=fn, minimum=1)
    if not 0 < max_area <= 1:
        raise ValueError(f"{fn}(): max_area must be a fraction of the map area in (0, 1]; got {max_area}.")
    check_positive(max_variation, name="max_variation", fn=fn)
    if not 0 <= min_diversity < 1:
        raise ValueError(f"{fn}(): min_diversity must be in [0, 1); got {min_diversity}.")
    return delta, min_area


def bright_msers(
    maps: torch.Tensor,
    *,
    delta: int = 12,
    min_area: int = 2,
    max_area: float = 0.5,
    max_variation: float = 0.5,
    min_diversity: float = 0.7,
) -> BrightRegions:
    """High-activation MSERs of a batch of 8-bit maps: OpenCV's bright regions and VLFeat's diversity, in torch.

    The regions that :func:`deepagg.functional.mser_regions` finds with OpenCV, for all maps at once and on the
    maps' device (see the module's docstring for the algorithm and where the two can differ: ties between
    children of equal size).

    Args:
        maps: :math:`(M, H, W)` uint8 maps (``M`` may be 0). Maps under 3 x 3 have no region (OpenCV refuses them).
        delta: MSER step in levels (12).
        min_area: Smallest region, pixels (2).
        max_area: Largest region, a fraction of the map's area (0.5; at least ``min_area + 1`` pixels).
        max_variation: Largest area variation (0.5).
        min_diversity: VLFeat-style diversity (0.7; 0 keeps every nested region).

    Returns:
        :class:`BrightRegions`, map by map, each map's regions largest first.

    Raises:
        TypeError: If ``maps`` is not a uint8 tensor.
        ValueError: If ``maps`` is not 3-d, or on a bad setting (names the argument and the value).
    """
    fn = "bright_msers"
    if not isinstance(maps, torch.Tensor) or maps.dtype != torch.uint8:
        got = maps.dtype if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise TypeError(f"{fn}(): maps must be a uint8 tensor (8-bit levels); got {got}.")
    if maps.ndim != 3:
        raise ValueError(f"{fn}(): maps must have shape (M, H, W); got {tuple(maps.shape)}.")
    delta, min_area = check_mser_settings(fn, delta, min_area, max_area, max_variation, min_diversity)
    m, h, w = maps.shape
    dev = maps.device
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if m == 0 or h < 3 or w < 3:
        return BrightRegions(empty, empty, empty, empty, empty, (h, w))
    tree = _component_tree(maps.contiguous())
    max_px = max(int(min_area) + 1, int(max_area * h * w))  # as the OpenCV path's MSER_create
    captured, _ = _stable_nodes(tree, delta=delta, min_area=min_area, max_area=max_px, max_variation=max_variation)
    pix, node = _pixel_pairs(tree, captured)
    # High activation: no border pixel next to the region as high as its level (interior neighbours are lower).
    val = maps.reshape(-1).long()
    idx = torch.arange(m * h * w, device=dev)
    col, row = idx % w, (idx // w) % h
    border_max = torch.full((m * h * w,), -1, dtype=torch.long, device=dev)
    for shift, edge in ((1, col == w - 2), (-1, col == 1), (w, row == h - 2), (-w, row == 1)):
        at = idx[edge & (col >= 1) & (col <= w - 2) & (row >= 1) & (row <= h - 2)]
        border_max[at] = torch.maximum(border_max[at], val[at + shift])
    k = len(captured)
    ring = torch.full((k,), -1, dtype=torch.long, device=dev).scatter_reduce_(0, node, border_max[pix], "amax")
    bright = captured & (ring < tree.level)
    # VLFeat's diversity, one nesting depth at a time (regions are nodes: containing = ancestor).
    nid = torch.arange(k, device=dev)
    nearest = _jump(torch.where(bright, nid, tree.parent))
    outer = torch.where((tree.parent >= 0) & bright, nearest[tree.parent.clamp(min=0)], -1)  # enclosing bright one
    regions = nid[bright]
    depth = torch.zeros(len(regions), dtype=torch.long, device=dev)  # bright regions enclosing each bright region
    walk = outer[regions]
    while bool((walk >= 0).any()):
        depth += walk >= 0
        walk = torch.where(walk >= 0, outer[walk.clamp(min=0)], -1)
    keep = torch.zeros(k, dtype=torch.bool, device=dev)
    kept_size = torch.zeros(k, dtype=torch.float64, device=dev)  # size of the smallest kept region containing it
    sz = tree.size.double()
    for d in range(int(depth.max()) + 1 if len(depth) else 0):
        at = regions[depth == d]
        enc = outer[at]
        kk = torch.where(enc >= 0, kept_size[enc.clamp(min=0)], 0.0)
        ok = (kk == 0) | ((kk - sz[at]) / torch.where(kk > 0, kk, 1.0) >= min_diversity)
        keep[at] = ok
        kept_size[at] = torch.where(ok, sz[at], kk)
    # Output: regions map by map, largest first, then brighter, then by node; their pixels grouped the same way.
    map_of = tree.root // (h * w)
    regions = nid[keep]  # by node; then stable sorts by the more significant keys
    for key in (tree.level.neg(), tree.size.neg(), map_of):
        regions = regions[torch.argsort(key[regions], stable=True)]
    rank = torch.full((k,), -1, dtype=torch.long, device=dev)
    rank[regions] = torch.arange(len(regions), device=dev)
    sel = rank[node] >= 0
    pix, reg = pix[sel], rank[node[sel]]
    order = torch.argsort(reg, stable=True)
    pix, reg = pix[order], reg[order]
    return BrightRegions(pix % (h * w), reg, map_of[regions], tree.size[regions], tree.level[regions], (h, w))

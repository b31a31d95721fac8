r"""The mutual k-NN graph of diffusion built by several processes, each searching a block of rows (issue 10).

:func:`sharded_knn_lists` splits the :math:`N \times N` similarity search of
:func:`deepagg.functional.diffusion.knn_lists` over the processes of a ``torch.distributed`` process group: rank
``r`` of ``W`` computes the lists of one contiguous block of rows (:func:`shard_rows`), and ``all_gather`` hands
every block to every rank, which concatenates them in row order. Every rank returns the same ``(sims, idx)``, bit
for bit, as ``knn_lists(x, k, **search)`` in one process, and :func:`sharded_mutual_knn_affinity` turns them into
the same sparse graph as :func:`deepagg.functional.diffusion.mutual_knn_affinity`. Without an initialised
process group both simply run in the calling process.

**Assumption: every rank holds the whole** ``x`` (the same :math:`N \times D` descriptors, in the same order). The
descriptors fit in memory; what is split is the :math:`O(N^2 D)` search, whose work per rank is
:math:`O(N^2 D / W)`. The gathered lists cost :math:`O(Nk)` per rank. Ranks that hold different ``x`` (for
example each rank's own share of a sharded extraction) are detected from a cheap fingerprint (shape, ``k`` and two
float64 sums) and every rank raises ``ValueError``; gather the descriptors first (``all_gather``, then put them in
dataset order).

**Launching.** With ``torchrun``, which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``::

    # graph.py -- run as: torchrun --nproc-per-node=4 graph.py
    import torch
    import torch.distributed as dist
    from deepagg.distributed import sharded_mutual_knn_affinity

    dist.init_process_group("gloo")  # "nccl" on GPUs, after torch.cuda.set_device(local_rank)
    x = torch.load("descriptors.pt")  # the whole (N, D), on every rank
    a = sharded_mutual_knn_affinity(x, k=50)
    if dist.get_rank() == 0:
        torch.save(a, "graph.pt")
    dist.destroy_process_group()

Under Lightning's DDP strategy (``Trainer(strategy="ddp", devices=W)``) the process group is already up inside the
``LightningModule`` hooks (``on_predict_epoch_end``, ``on_validation_epoch_end``, ...): gather the descriptors
with ``self.all_gather`` (and drop the ``DistributedSampler`` padding), then call
``sharded_mutual_knn_affinity(x, k=k)`` on every rank. Collectives run on the device the backend needs: CPU for
gloo, the current CUDA device (``torch.cuda.current_device()``, which Lightning sets per rank) for NCCL, and
``x``'s own device otherwise; the results come back on the device of ``x``. Every rank must make the call, with
the same arguments.

**Blocks are whole chunks, for exactness.** ``knn_lists`` searches its rows in chunks (``chunk_size`` rows; by
default about 128 MB of similarities per chunk with the torch backend, so a single chunk when
:math:`N \le 5792`, and 16384 rows with faiss). The ranks split these *chunks*, as evenly as possible, so that
every matrix product (or faiss search) a rank runs is one the single process runs too, on the same rows. An even
split of the *rows* would not be exact: BLAS does not promise that a row's dot products come out bit-identical in
products of different heights (measured with MKL on a 2-core AMD CPU: float64 blocks of 150 rows differ from the
301-row product in the last bit, float32 blocks of 1 to 11 rows do; cuBLAS picks kernels by shape), and a last-bit
change can swap two neighbours that are that close or trade the k-th place. The price: with fewer chunks than
ranks some ranks have nothing to do (in particular one rank does all of a small graph, :math:`N \le 5792`, by
default); pass ``chunk_size`` to split finer (the single-process result with the same ``chunk_size`` is the one
matched). Bit-identical also needs the same BLAS threads per process as the single process had: MKL rounds the
small products (a chunk of a few rows) differently with 1 and 2 threads, and ``torchrun`` starts its processes
with ``OMP_NUM_THREADS=1``. ``backend="faiss"`` builds its index on every rank: ``index="flat"`` is exact;
``"ivf"`` trains with faiss's fixed seed; ``"hnsw"`` is built with several threads and may come out differently
on different ranks, so the gathered lists are then approximate lists of slightly different indexes.

**Descriptors that do not fit one machine** (not implemented). Each rank would hold one shard of the database, and
the search would be faiss's: every rank indexes its own shard (flat, IVF or HNSW, on CPU or GPU) and searches
the query rows of every rank against it (the query blocks passed around a ring, or one ``all_to_all``),
returning the top ``k + 1`` candidates of its shard with their global ids. The owner of a row merges the
:math:`W (k + 1)` candidates into its top k (largest similarity, then lower id; faiss's ``IndexShards`` /
``ResultHeap`` do this merge) after dropping the row itself. The mutual test needs the reverse lists: each edge
``(i, j)`` is sent to the owner of ``j`` (``all_to_all``), which keeps it when ``i`` is in ``j``'s list. The graph
then stays distributed as row blocks, and diffusion needs a distributed sparse matrix product (one exchange of
the vector entries at the block boundaries per CG iteration) instead of the single-process
:func:`deepagg.functional.diffusion.diffusion_scores`.

Not ``torch.compile``-able (collectives, sparse-graph construction); no gradients flow (as in ``knn_lists``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from deepagg._checks import check_floating, check_int, check_shape
from deepagg.functional import diffusion
from deepagg.functional.diffusion import knn_lists, mutual_knn_affinity

__all__ = ["shard_rows", "sharded_knn_lists", "sharded_mutual_knn_affinity"]

#: ``search`` keywords of ``knn_lists`` that the sharding itself chooses.
_RESERVED = ("rows", "queries")
#: Tolerance of the fingerprint comparison, relative to the sums' magnitudes (equal data gives equal bits on
#: equal hardware; different descriptors differ by about :math:`1/\sqrt{N D}`, far more).
_FINGERPRINT_RTOL = 1e-9
#: Rows per search of ``knn_lists``'s faiss backend when ``chunk_size`` is not given (``_faiss_knn``).
_FAISS_CHUNK_ROWS = 16384


def shard_rows(n: int, *, rank: int, world_size: int, chunk: int = 1) -> tuple[int, int]:
    """The contiguous rows ``(start, stop)`` that rank ``rank`` of ``world_size`` processes searches.

    The ``n`` rows are cut into chunks of ``chunk`` rows (the last one shorter) and the chunks are split as evenly
    as possible in rank order: the first ``n_chunks % world_size`` ranks get one chunk more than the others. The
    blocks cover ``range(n)`` exactly once; a rank gets an empty block when there are fewer chunks than ranks.
    ``chunk=1`` splits the rows themselves as evenly as possible.

    Args:
        n: Number of rows, ``>= 0``.
        rank: This process's rank, ``0 <= rank < world_size``.
        world_size: Number of processes, ``>= 1``.
        chunk: Rows per chunk, ``>= 1``.

    Returns:
        ``(start, stop)`` with ``0 <= start <= stop <= n``.

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If ``n < 0``, ``world_size < 1``, ``chunk < 1`` or ``rank`` is not in ``[0, world_size)``.

    Example:
        >>> [shard_rows(7, rank=r, world_size=3) for r in range(3)]
        [(0, 3), (3, 5), (5, 7)]
        >>> [shard_rows(10, rank=r, world_size=2, chunk=3) for r in range(2)]  # chunks of 3, 3, 3 and 1 rows
        [(0, 6), (6, 10)]
    """
    fn = "shard_rows"
    n = check_int(n, name="n", fn=fn, minimum=0)
    world_size = check_int(world_size, name="world_size", fn=fn, minimum=1)
    rank = check_int(rank, name="rank", fn=fn, minimum=0)
    chunk = check_int(chunk, name="chunk", fn=fn, minimum=1)
    if rank >= world_size:
        raise ValueError(f"{fn}(): rank must be < world_size = {world_size}; got rank = {rank}.")
    base, extra = divmod(-(-n // chunk), world_size)
    first = rank * base + min(rank, extra)
    last = first + base + (1 if rank < extra else 0)
    return min(first * chunk, n), min(last * chunk, n)


def _chunk_rows(n: int, search: dict[str, Any], fn: str) -> int:
    """Rows per chunk of ``knn_lists(x, k, **search)`` over all ``n`` rows in one process.

    Mirrors ``_exact_knn`` (``CHUNK_ENTRIES // n`` rows, at least 1, at most n) and ``_faiss_knn`` (16384 rows).
    """
    given = search.get("chunk_size")
    if given:
        return check_int(given, name="chunk_size", fn=fn, minimum=1)
    if search.get("backend", "torch") == "faiss":
        return _FAISS_CHUNK_ROWS
    return max(1, min(n, diffusion.CHUNK_ENTRIES // max(n, 1)))


def _group_rank_and_size(group: Any, fn: str) -> tuple[int, int] | None:
    """``(rank, world_size)`` in ``group`` when a process group is up, else None (one process does everything)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError(
            f"{fn}(): this process is not a member of group (rank {dist.get_rank()} of the default group); "
            "call it on the group's processes only."
        )
    return rank, world


def _comm_device(device: torch.device, group: Any) -> torch.device:
    """The device whose tensors the group's backend gathers: CPU for gloo, a CUDA device for NCCL."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "gloo":
        return torch.device("cpu")
    if backend == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device  # "cpu:gloo,cuda:nccl" and other backends pick by the tensor's device


def _fingerprint(x: torch.Tensor, k: int) -> torch.Tensor:
    """``(N, D, k, s1, s2, |s1|, |s2|)`` of ``x`` in float64, equal on ranks holding the same ``x``.

    ``s1`` is the sum of the entries, ``s2`` the row sums weighted by their position (so a permutation of the rows
    shows), ``|s1|`` and ``|s2|`` the same sums of absolute row sums (their scales).
    """
    n, d = x.shape
    with torch.no_grad():
        row_sums = x.sum(dim=1, dtype=torch.float64)
        weights = torch.arange(1, n + 1, dtype=torch.float64, device=x.device)
        sums = torch.stack(
            [row_sums.sum(), (row_sums * weights).sum(), row_sums.abs().sum(), (row_sums.abs() * weights).sum()]
        )
    meta = torch.tensor([n, d, k], dtype=torch.float64, device=x.device)
    return torch.cat([meta, sums])


def _check_same_input(x: torch.Tensor, k: int, group: Any, world: int, device: torch.device, fn: str) -> None:
    """Raise ``ValueError`` on every rank unless every rank passed the same ``x`` (shape and contents) and ``k``."""
    mine = _fingerprint(x, k).to(device)
    prints = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(prints, mine, group=group)
    table = torch.stack(prints).cpu()  # (W, 7), the same on every rank: every rank takes the same decision
    meta, sums, scales = table[:, :3], table[:, 3:5], table[:, 5:].abs().amax(dim=0)
    same_meta = bool((meta == meta[0]).all())
    close = (sums - sums[0]).abs() <= _FINGERPRINT_RTOL * (scales + 1.0)
    same_values = bool(close.all()) or bool(torch.isnan(sums).all())
    if not (same_meta and same_values):
        shapes = [(int(n), int(d)) for n, d in meta[:, :2].tolist()]
        ks = [int(v) for v in meta[:, 2].tolist()]
        raise ValueError(
            f"{fn}(): x and k must be the same on every rank (each rank holds all N descriptors, in the same "
            f"order); got x of shapes {shapes} and k = {ks} on ranks 0..{world - 1}"
            f"{'' if same_values else ', and the values of x differ across ranks'}. "
            "Gather the descriptors to every rank first."
        )


def _gather_blocks(t: torch.Tensor, sizes: list[int], group: Any, device: torch.device) -> torch.Tensor:
    """Concatenate every rank's block ``t`` (rank r's has ``sizes[r]`` rows) in rank order, on every rank.

    Blocks are padded to the largest size for ``all_gather`` (gloo and NCCL need equal shapes) and trimmed after.
    16-bit floats travel as float32 (exact both ways).
    """
    wire_dtype = torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype
    width = max(sizes)
    buf = torch.zeros((width, *t.shape[1:]), dtype=wire_dtype, device=device)
    buf[: t.shape[0]] = t.to(device, wire_dtype)
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)]).to(t.device, t.dtype)


def sharded_knn_lists(
    x: torch.Tensor, k: int, *, group: Any = None, **search: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The graph's k-NN lists of all rows of ``x``, each process of ``group`` searching a block of rows.

    Iscen et al., CVPR 2017, eq. 6 (see :mod:`deepagg.functional.diffusion`). With an initialised
    ``torch.distributed`` process group, rank ``r`` of ``W`` computes ``knn_lists(x, k, rows=shard_rows(N, rank=r,
    world_size=W, chunk=c), chunk_size=c, **search)``, with ``c`` the rows per chunk of the single-process search
    (``chunk_size``, or its default), and the blocks are gathered to every rank in row order: every rank returns
    ``knn_lists(x, k, **search)``, bit for bit (module notes: with fewer chunks than ranks, some ranks idle).
    Without a process group, this is ``knn_lists(x, k, **search)`` in the calling process. Every rank must call it
    with the same ``x`` (all N rows), ``k`` and ``search``; different ``x`` or ``k`` make every rank raise. The
    lists are :math:`\mathrm{NN}_k(i)` over :math:`j \ne i`, best first, ties to the lower index (torch backend).

    Args:
        x: All database rows :math:`(N, D)`, floating point (unit rows for cosine similarity), on every rank.
        k: Neighbours per row, ``1 <= k < N``.
        group: The process group (default: the default group). Ignored without an initialised process group.
        **search: Keywords of :func:`deepagg.functional.diffusion.knn_lists`: ``backend``, ``index``, ``nlist``,
            ``nprobe``, ``hnsw_m``, ``chunk_size`` (not ``rows`` or ``queries``).

    Returns:
        ``(sims, idx)``, each :math:`(N, k)` (``idx`` int64), on the device of ``x``, the same on every rank.

    Raises:
        ShapeError: If ``x`` is not 2-D.
        DTypeError: If ``x`` is not floating point.
        ValueError: If ``k`` is not in ``[1, N)``, ``search`` holds ``rows`` or ``queries`` or a negative
            ``chunk_size``, this process is not in ``group``, or ``x`` or ``k`` differ across the ranks.

    Example:
        >>> x = torch.nn.functional.normalize(torch.randn(50, 8), dim=1)
        >>> sims, idx = sharded_knn_lists(x, 5)  # no process group here: one process searches every row
        >>> ref_sims, ref_idx = knn_lists(x, 5)
        >>> idx.shape, torch.equal(idx, ref_idx), torch.equal(sims, ref_sims)
        (torch.Size([50, 5]), True, True)
    """
    fn = "sharded_knn_lists"
    check_shape(x, "N,D", name="x", fn=fn)
    check_floating(x, name="x", fn=fn)
    n = x.shape[0]
    k = check_int(k, name="k", fn=fn, minimum=1)
    if k >= n:
        raise ValueError(f"{fn}(): k must be < N = {n} (the neighbours of a row exclude itself); got k = {k}.")
    reserved = [key for key in _RESERVED if key in search]
    if reserved:
        raise ValueError(
            f"{fn}(): {', '.join(reserved)} cannot be passed: each rank searches its own block of rows of x; "
            "call knn_lists directly for a row range or for queries."
        )
    chunk = _chunk_rows(n, search, fn)
    placement = _group_rank_and_size(group, fn)
    if placement is None:
        return knn_lists(x, k, **search)
    rank, world = placement
    device = _comm_device(x.device, group)
    _check_same_input(x, k, group, world, device, fn)
    blocks = [shard_rows(n, rank=r, world_size=world, chunk=chunk) for r in range(world)]
    sims, idx = knn_lists(x, k, rows=blocks[rank], **{**search, "chunk_size": chunk})
    sizes = [stop - start for start, stop in blocks]
    return _gather_blocks(sims, sizes, group, device), _gather_blocks(idx, sizes, group, device)


def sharded_mutual_knn_affinity(
    x: torch.Tensor, *, k: int, gamma: float = 3.0, group: Any = None, **search: Any
) -> torch.Tensor:
    r"""The mutual k-NN affinity of eqs. 1, 5, 6 (sparse COO :math:`(N, N)`), its k-NN search split over ``group``.

    ``mutual_knn_affinity(x, k=k, gamma=gamma, knn=sharded_knn_lists(x, k, group=group, **search))``: every rank
    searches its block of rows (:func:`sharded_knn_lists`), then builds the whole graph from the gathered lists,
    so every rank holds the same graph. See :func:`deepagg.functional.diffusion.mutual_knn_affinity` for the
    weights (the smaller directed similarity to the power ``gamma``; symmetric, zero diagonal, positive entries
    only).

    Args:
        x: All node descriptors :math:`(N, D)`, unit rows, on every rank.
        k: Neighbours per node, ``1 <= k < N``.
        gamma: Kernel exponent > 0 (3 in the paper).
        group: The process group (default: the default group). Ignored without an initialised process group.
        **search: ``backend``, ``index``, ``nlist``, ``nprobe``, ``hnsw_m``, ``chunk_size`` for
            :func:`deepagg.functional.diffusion.knn_lists`.

    Returns:
        Coalesced sparse COO tensor :math:`(N, N)` of the dtype of ``x`` (at least float32), the same on every rank.

    Raises:
        ShapeError: If ``x`` is not 2-D.
        DTypeError: If ``x`` is not floating point.
        ValueError: If ``gamma`` is not a finite float > 0, or as :func:`sharded_knn_lists`.

    Example:
        >>> x = torch.nn.functional.normalize(torch.rand(30, 4), dim=1)
        >>> a = sharded_mutual_knn_affinity(x, k=5)  # no process group here: the same as mutual_knn_affinity
        >>> b = mutual_knn_affinity(x, k=5)
        >>> a.shape, torch.equal(a.indices(), b.indices()), torch.equal(a.values(), b.values())
        (torch.Size([30, 30]), True, True)
    """
    fn = "sharded_mutual_knn_affinity"
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0 < gamma < math.inf
    if not ok:
        raise ValueError(f"{fn}(): gamma must be a float > 0; got {gamma!r}.")
    knn = sharded_knn_lists(x, k, group=group, **search)
    return mutual_knn_affinity(x, k=k, gamma=gamma, knn=knn)

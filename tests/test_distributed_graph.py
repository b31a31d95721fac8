"""Issue 10: the diffusion graph's k-NN search sharded by rows over torch.distributed (2 CPU processes, gloo)."""

from __future__ import annotations

import datetime
import importlib.util
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from deepagg.distributed import shard_rows, sharded_knn_lists, sharded_mutual_knn_affinity
from deepagg.functional import diffusion
from deepagg.functional.diffusion import knn_lists, mutual_knn_affinity

WORLD = 2
HAS_FAISS = importlib.util.find_spec("faiss") is not None

# name -> (N, kind, k, search keywords, CHUNK_ENTRIES or None). A small CHUNK_ENTRIES makes the *default* chunks
# small (2**14 // N rows), so that the 2 ranks share real work with the default chunking: 800 rows = 40 chunks of
# 20; 601 = 23 chunks of 27 (rank 0 gets 12 chunks, 324 rows, rank 1 277: N odd, unequal blocks); 513 = 17 of 31;
# 301 = 6 of 54. "one_chunk" keeps the real default (one chunk: rank 1 has an empty block).
CASES: dict[str, tuple[int, str, int, dict[str, Any], int | None]] = {
    "even": (800, "gauss", 10, {}, 2**14),
    "odd": (601, "gauss", 10, {}, 2**14),
    "ties": (513, "signs", 10, {}, 2**14),
    "float64": (301, "gauss64", 7, {}, 2**14),
    "chunk_size": (600, "gauss", 10, {"chunk_size": 64}, None),
    "one_chunk": (800, "gauss", 10, {}, None),
}
if HAS_FAISS:
    CASES["faiss_flat"] = (601, "gauss", 10, {"backend": "faiss", "chunk_size": 100}, None)


def make_x(n: int, kind: str) -> torch.Tensor:
    """Deterministic unit rows. ``signs``: entries +-1/4 in D = 16, so every similarity is a multiple of 1/16,
    exact in float32 whatever the summation order: only 33 values, hence ties everywhere, plus duplicate rows."""
    g = torch.Generator().manual_seed(n)
    if kind == "signs":
        x = (torch.randint(0, 2, (n, 16), generator=g).float() * 2 - 1) / 4
        x[n // 2 : n // 2 + n // 8] = x[: n // 8]  # exact duplicates: similarity 1 between different rows
        return x
    dtype = torch.float64 if kind == "gauss64" else torch.float32
    return torch.nn.functional.normalize(torch.randn(n, 64, generator=g, dtype=dtype), dim=1)


def _coo(a: torch.Tensor) -> dict[str, torch.Tensor]:
    a = a.coalesce()
    return {"indices": a.indices(), "values": a.values(), "shape": torch.tensor(a.shape)}


def _run_cases(names: list[str], fn: Any) -> dict[str, Any]:
    """``fn(x, k, search) -> (sims, idx, affinity)`` on every case, with the case's CHUNK_ENTRIES."""
    results: dict[str, Any] = {}
    default_entries = diffusion.CHUNK_ENTRIES
    try:
        for name in names:
            n, kind, k, search, entries = CASES[name]
            diffusion.CHUNK_ENTRIES = entries or default_entries
            sims, idx, a = fn(make_x(n, kind), k, search)
            results[name] = {"sims": sims, "idx": idx, **_coo(a)}
    finally:
        diffusion.CHUNK_ENTRIES = default_entries
    return results


def _single(x: torch.Tensor, k: int, search: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*knn_lists(x, k, **search), mutual_knn_affinity(x, k=k, **search))


def _sharded(x: torch.Tensor, k: int, search: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*sharded_knn_lists(x, k, **search), sharded_mutual_knn_affinity(x, k=k, **search))


def _worker(rank: int, init_method: str, out_dir: str, names: list[str]) -> None:
    """One rank: the sharded lists and graph of every case, then the error paths; results to out_dir/rank{r}.pt.

    Rank 0 first computes the single-process reference, before the process group exists, with the same BLAS
    threads as the sharded run (MKL rounds small products differently with 1 and 2 threads).
    """
    torch.set_num_threads(1)  # two processes on two cores, as torchrun and Lightning's DDP on CPU run
    if HAS_FAISS:
        import faiss  # type: ignore[import-not-found]

        faiss.omp_set_num_threads(1)
    out = Path(out_dir)
    results: dict[str, Any] = {}
    if rank == 0:
        assert not dist.is_initialized()
        results["reference"] = _run_cases(names, _single)
    try:
        dist.init_process_group(
            "gloo", init_method=init_method, rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
        )
    except Exception as err:  # the environment cannot run gloo (no usable network interface, ...)
        (out / f"skip{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        return
    try:
        start = time.perf_counter()
        results["sharded"] = _run_cases(names, _sharded)
        results["seconds"] = time.perf_counter() - start
        # Ranks holding different descriptors: every rank raises (the decision is taken on gathered data).
        x = make_x(100, "gauss")
        errors: dict[str, str] = {}
        for label, mine in (("values", x + 1e-3 * rank), ("rows", x[:-1] if rank else x)):
            try:
                sharded_knn_lists(mine, 5)
            except ValueError as err:
                errors[label] = str(err)
        try:
            sharded_knn_lists(x, 5 + rank)
        except ValueError as err:
            errors["k"] = str(err)
        # A group without this process: rank 1 is refused, rank 0 alone (world size 1) does every row.
        solo = dist.new_group([0])
        try:
            results["solo"] = sharded_knn_lists(x, 5, group=solo)
        except ValueError as err:
            errors["member"] = str(err)
        results["errors"] = errors
        torch.save(results, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run every case on 2 CPU processes (gloo, file:// rendezvous); each rank's results.

    On Linux the processes are forked (they inherit the imported torch and deepagg: about 1 s instead of two fresh
    interpreters' imports); the workers run single-threaded, so no OpenMP thread pool is used after the fork.
    Elsewhere they are spawned.
    """
    return _launch(tmp_path_factory.mktemp("ddp"), list(CASES), "fork" if sys.platform.startswith("linux") else "spawn")


def _launch(tmp: Path, names: list[str], method: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start WORLD processes running ``_worker``; skip where gloo or starting processes is not possible."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    init = f"file://{tmp / 'rendezvous'}"
    try:
        torch.multiprocessing.start_processes(
            _worker, args=(init, str(tmp), names), nprocs=WORLD, join=True, start_method=method
        )
    except OSError as err:
        pytest.skip(f"cannot start processes here ({method}): {err}")
    skipped = sorted(tmp.glob("skip*.txt"))
    if skipped:
        pytest.skip(f"cannot start a gloo process group here: {skipped[0].read_text()}")
    rank0, rank1 = (torch.load(tmp / f"rank{r}.pt") for r in range(WORLD))
    return rank0, rank1


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one_process(two_ranks: tuple[dict[str, Any], ...], name: str) -> None:
    """Both ranks hold exactly the single-process lists and graph (indices and values, bit for bit)."""
    n = CASES[name][0]
    ref = two_ranks[0]["reference"][name]
    assert ref["values"].numel() > n  # a real graph, not an empty one
    assert torch.equal(ref["shape"], torch.tensor([n, n]))
    for got in two_ranks:
        res = got["sharded"][name]
        assert res["idx"].dtype == torch.int64
        assert res["sims"].dtype == ref["sims"].dtype
        for key in ("sims", "idx", "shape", "indices", "values"):
            assert torch.equal(res[key], ref[key]), key


@pytest.mark.slow
def test_spawned_processes(tmp_path: Path) -> None:
    """The same on two fresh interpreters (spawn, as torchrun starts them): each imports torch and deepagg."""
    names = ["odd", "ties", "one_chunk"]
    ranks = _launch(tmp_path, names, "spawn")
    for name in names:
        ref = ranks[0]["reference"][name]
        for got in ranks:
            for key in ("sims", "idx", "indices", "values"):
                assert torch.equal(got["sharded"][name][key], ref[key]), (name, key)


def test_reference_is_knn_lists_here(two_ranks: tuple[dict[str, Any], ...]) -> None:
    """The workers' reference is the search of this process (same neighbours; sims up to BLAS thread rounding).

    Only the cases with the real default chunking: tiny chunks on two threads are slow on a busy machine.
    """
    for name, (n, kind, k, search, entries) in CASES.items():
        if entries is not None:
            continue
        sims, idx = knn_lists(make_x(n, kind), k, **search)
        ref = two_ranks[0]["reference"][name]
        assert torch.equal(idx, ref["idx"]), name
        torch.testing.assert_close(sims, ref["sims"], rtol=0, atol=1e-6)


def test_ties_case_has_ties_across_the_k_th_place() -> None:
    """The ``ties`` data really exercise the lower-index rule: tied values straddle the k-th neighbour."""
    n, kind, k, _, _ = CASES["ties"]
    x = make_x(n, kind)
    sim = x @ x.T
    sim.fill_diagonal_(-torch.inf)
    top = sim.topk(k + 1, dim=1).values
    assert (top[:, k - 1] == top[:, k]).float().mean() > 0.9  # nearly every row has a tie at the boundary
    assert bool((sim == 1).any())  # duplicate rows


def test_ranks_with_different_inputs_all_raise(two_ranks: tuple[dict[str, Any], ...]) -> None:
    for got in two_ranks:
        errors = got["errors"]
        assert "the values of x differ across ranks" in errors["values"]
        assert "shapes [(100, 64), (99, 64)]" in errors["rows"]
        assert "k = [5, 6]" in errors["k"]
        assert errors["values"].startswith("sharded_knn_lists(): x and k must be the same on every rank")


def test_group_without_this_process(two_ranks: tuple[dict[str, Any], ...]) -> None:
    rank0, rank1 = two_ranks
    assert "member" not in rank0["errors"]
    ref = knn_lists(make_x(100, "gauss"), 5)
    assert torch.equal(rank0["solo"][0], ref[0])
    assert torch.equal(rank0["solo"][1], ref[1])
    assert "this process is not a member of group" in rank1["errors"]["member"]
    assert "solo" not in rank1


# ------------------------------------------------------------------------------------------------ one process


@pytest.mark.parametrize(("n", "kind", "k", "search"), [(60, "gauss", 5, {}), (41, "signs", 7, {"chunk_size": 9})])
def test_without_process_group_is_knn_lists(n: int, kind: str, k: int, search: dict[str, Any]) -> None:
    assert not dist.is_initialized()
    x = make_x(n, kind)
    sims, idx = sharded_knn_lists(x, k, **search)
    ref_sims, ref_idx = knn_lists(x, k, **search)
    assert torch.equal(sims, ref_sims)
    assert torch.equal(idx, ref_idx)
    a = sharded_mutual_knn_affinity(x, k=k, gamma=2.0, **search)
    b = mutual_knn_affinity(x, k=k, gamma=2.0, **search)
    assert torch.equal(a.indices(), b.indices())
    assert torch.equal(a.values(), b.values())


def test_process_group_of_one(tmp_path: Path) -> None:
    """The collective path in this process (world size 1, gloo): no spawn, so it runs wherever gloo does."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{tmp_path / 'pg'}",
            rank=0,
            world_size=1,
            timeout=datetime.timedelta(seconds=30),
        )
    except Exception as err:  # pragma: no cover - depends on the environment
        pytest.skip(f"cannot start a gloo process group here: {err}")
    try:
        x = make_x(301, "gauss")
        sims, idx = sharded_knn_lists(x, 6)
        a = sharded_mutual_knn_affinity(x, k=6)
        with pytest.raises(ValueError, match="rows cannot be passed"):
            sharded_knn_lists(x, 6, rows=(0, 10))
    finally:
        dist.destroy_process_group()
    ref_sims, ref_idx = knn_lists(x, 6)
    assert torch.equal(sims, ref_sims)
    assert torch.equal(idx, ref_idx)
    b = mutual_knn_affinity(x, k=6)
    assert torch.equal(a.indices(), b.indices())
    assert torch.equal(a.values(), b.values())


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_gather_keeps_16_bit_values(half: torch.dtype, tmp_path: Path) -> None:
    from deepagg.distributed import _gather_blocks

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    if dist.is_initialized():
        pytest.skip("a process group is already running in this process")
    t = torch.randn(5, 3).to(half)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        got = _gather_blocks(t, [5], None, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
    assert got.dtype == half
    assert torch.equal(got, t)


def test_collectives_run_where_the_backend_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepagg.distributed import _comm_device

    cuda1 = torch.device("cuda", 1)  # a device object only: no GPU is needed for this test
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert _comm_device(cuda1, None) == torch.device("cpu")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert _comm_device(cuda1, None) == cuda1
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "cpu:gloo,cuda:nccl")
    assert _comm_device(torch.device("cpu"), None) == torch.device("cpu")
    assert _comm_device(cuda1, None) == cuda1
    if torch.cuda.is_available():
        monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
        assert _comm_device(torch.device("cpu"), None) == torch.device("cuda", torch.cuda.current_device())


def test_shard_rows_partitions_rows() -> None:
    for n in (0, 1, 2, 5, 7, 600, 601):
        for world in (1, 2, 3, 8):
            for chunk in (1, 3, 64, 1000):
                blocks = [shard_rows(n, rank=r, world_size=world, chunk=chunk) for r in range(world)]
                assert blocks[0][0] == 0
                assert blocks[-1][1] == n
                assert all(blocks[r][1] == blocks[r + 1][0] for r in range(world - 1))
                assert all(start % chunk == 0 for start, stop in blocks if start < stop)  # whole chunks
                chunks = [-(-stop // chunk) - start // chunk for start, stop in blocks]
                assert max(chunks) - min(chunks) <= 1
                assert chunks == sorted(chunks, reverse=True)  # the larger blocks first
    assert shard_rows(601, rank=0, world_size=2) == (0, 301)
    assert shard_rows(601, rank=1, world_size=2) == (301, 601)
    assert shard_rows(601, rank=1, world_size=2, chunk=27) == (324, 601)
    assert shard_rows(1, rank=2, world_size=3) == (1, 1)
    assert shard_rows(800, rank=1, world_size=2, chunk=800) == (800, 800)


def test_shard_rows_exceptions() -> None:
    with pytest.raises(ValueError, match=r"shard_rows\(\): rank must be < world_size = 2; got rank = 2"):
        shard_rows(10, rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"shard_rows\(\): rank must be >= 0; got -1"):
        shard_rows(10, rank=-1, world_size=2)
    with pytest.raises(ValueError, match=r"shard_rows\(\): world_size must be >= 1; got 0"):
        shard_rows(10, rank=0, world_size=0)
    with pytest.raises(ValueError, match=r"shard_rows\(\): n must be >= 0; got -3"):
        shard_rows(-3, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"shard_rows\(\): chunk must be >= 1; got 0"):
        shard_rows(3, rank=0, world_size=1, chunk=0)
    with pytest.raises(TypeError, match=r"shard_rows\(\): rank must be an int"):
        shard_rows(10, rank=1.0, world_size=2)  # type: ignore[arg-type]


def test_exceptions() -> None:
    x = make_x(20, "gauss")
    with pytest.raises(ValueError, match=r"sharded_knn_lists\(\): rows, queries cannot be passed"):
        sharded_knn_lists(x, 3, rows=(0, 5), queries=x[:2])
    with pytest.raises(ValueError, match=r"sharded_knn_lists\(\): queries cannot be passed"):
        sharded_mutual_knn_affinity(x, k=3, queries=x[:2])
    with pytest.raises(ValueError, match=r"sharded_knn_lists\(\): k must be < N = 20"):
        sharded_knn_lists(x, 20)
    with pytest.raises(ValueError, match=r"sharded_knn_lists\(\): k must be >= 1; got 0"):
        sharded_mutual_knn_affinity(x, k=0)
    with pytest.raises(ValueError, match=r"sharded_knn_lists\(\): x must have shape \(N, D\); got \(20\) with 1"):
        sharded_knn_lists(x[:, 0], 3)
    with pytest.raises(TypeError, match=r"sharded_knn_lists\(\): x must be a floating-point tensor"):
        sharded_knn_lists(torch.ones(5, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match=r"sharded_knn_lists\(\): chunk_size must be >= 1; got -5"):
        sharded_knn_lists(x, 3, chunk_size=-5)
    for gamma in (0.0, -1.0, float("inf"), True, "3"):
        with pytest.raises(ValueError, match=r"sharded_mutual_knn_affinity\(\): gamma must be a float > 0"):
            sharded_mutual_knn_affinity(x, k=3, gamma=gamma)  # type: ignore[arg-type]

"""Exact Euclidean nearest neighbours over flattened samples, with a torch or a FAISS candidate search.

:func:`nearest_neighbours` is used by the copy statistics, the pairing metrics, the quality radii and the watch.
It runs in two stages. A fast float32 search proposes candidates (``backend="torch"``: a chunked matmul on the
queries' device; ``backend="faiss"``: an exact flat index, ``faiss.IndexFlatL2``, or its GPU twin for CUDA tensors
when faiss has GPU support). Both propose from float32 values that carry cancellation error, so both hand their
candidates, sorted by those values, with a per-query bound on the error, to one exact re-ranking
(:func:`_rerank`): the returned distances are recomputed directly as ||q - p|| and any candidate that rounding
could have misplaced is recomputed too. The result does not depend on the backend beyond the order of exact ties.

FAISS is optional (``pip install 'flowprobe[faiss]'``) and imported only when used. ``backend="auto"`` picks it
only where it was measured to be faster (:data:`FAISS_MIN_POOL`, :data:`FAISS_MAX_DIM`; benchmarks/RESULTS.md).
"""

from __future__ import annotations

from contextlib import contextmanager
import torch
from torch import Tensor

__all__ = ["nearest_neighbours", "resolve_backend", "faiss_available", "BACKENDS", "FAISS_MIN_POOL",
           "FAISS_MAX_DIM"]

BACKENDS = ("auto", "torch", "faiss")
#: ``"auto"`` uses FAISS for CPU tensors on one torch thread, pools of at least this many rows and at most
#: :data:`FAISS_MAX_DIM` dimensions: where benchmarks/nearest_faiss.py measured it faster (1000 queries, k = 2,
#: one thread: 0.25-0.4x the torch search's CPU time for D <= 64 and N >= 10^4, 0.5x at D = 128, 0.65-0.85x at
#: D = 256-512, even at 1024, 1.2-1.35x slower at 3072; on two threads it was 1.4-1.9x slower at every size;
#: benchmarks/RESULTS.md).
FAISS_MIN_POOL = 10_000
FAISS_MAX_DIM = 512
#: candidates searched beyond the k asked for (then doubled for the queries whose near-ties fill them)
SLACK = 8
_U = 2.0 ** -24  # unit roundoff of float32
_LAMBDA = 8.0  # probabilistic rounding-error constant of a float32 dot product (Higham & Mary, 2019)


def faiss_available() -> bool:
    """Whether ``import faiss`` works (the optional ``faiss`` extra)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, pool_size: int, dim: int, device: torch.device | str = "cpu",
                    threads: int | None = None) -> str:
    """The candidate search ``backend`` stands for: "torch" or "faiss". "auto" is faiss on CPU tensors with one
    thread (``threads``, default torch's) past the measured crossover (:data:`FAISS_MIN_POOL`,
    :data:`FAISS_MAX_DIM`) when faiss is installed, torch otherwise.
    An unknown name or "faiss" without faiss installed raise :class:`~flowprobe.config.ConfigError`."""
    from ..config import ConfigError

    if backend not in BACKENDS:
        raise ConfigError(f"nearest-neighbour backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "faiss" and not faiss_available():
        raise ConfigError("the faiss backend needs faiss: pip install 'flowprobe[faiss]' (or faiss-cpu / faiss-gpu)")
    if backend != "auto":
        return backend
    one_cpu = torch.device(device).type == "cpu" and (torch.get_num_threads() if threads is None else threads) == 1
    wins = pool_size >= FAISS_MIN_POOL and dim <= FAISS_MAX_DIM
    return "faiss" if one_cpu and wins and faiss_available() else "torch"


@contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _flat(x: Tensor) -> Tensor:
    x = x.reshape(x.shape[0], -1)
    return x if x.is_floating_point() else x.float()


def nearest_neighbours(queries: Tensor, pool: Tensor, k: int = 1, chunk_size: int = 4096,
                       backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Euclidean k nearest neighbours of each query row in ``pool`` (flattened samples), chunked over queries so
    memory stays at chunk_size x N. Returns (distances, indices), each (Q, k), ascending.

    Candidates (``backend``: "torch", "faiss" or "auto", see :func:`resolve_backend`) come from float32 values
    v_j = ||q - p_j||^2 + (a constant per query), all relative to c, the pool mean, which removes the offset all
    images share, the main source of cancellation:

    - torch: one matmul per chunk, [q, 1] times [-2 (p_j - c), ||p_j - c||^2 + 2 c.(p_j - c)] (for D >= 64 the last
      column is added to the product instead), i.e. v_j = ||q - p_j||^2 - ||q - c||^2, with error at most
      err = 8 sqrt(D + 1) u (2 ||q|| r + r^2 + 2 ||c|| r);
    - faiss: an exact flat index of the centred pool searched with q - c, v_j = ||q_c||^2 + ||p_j - c||^2 -
      2 q_c.(p_j - c) in float32 (clipped at 0), with error at most err = (8 sqrt(D) + 4) u (||q_c|| + r)^2: the
      three length-D sums (8 sqrt(D) u each, times ||q_c||^2, r^2 and 2 ||q_c|| r), the two additions (2 u) and
      the rounding of the centring (2 u).

    Here r = max_j ||p_j - c||, u = 2^-24 and 8 sqrt(D) u is the probabilistic bound on the float32 error of a
    length-D dot product (Higham & Mary, 2019, lambda = 8). Each search returns its k + 8 best candidates, sorted
    by v. The exact re-ranking, shared by both, recomputes the distance directly as ||q - p|| (float32, or float64
    for float64 queries: no cancellation, so an exact copy has distance 0) for the k best candidates and for every
    further candidate whose v lies within 2 err of the k-th. Any point left out has v above the last candidate's,
    and when that exceeds the k-th's by more than 2 err, such a point is farther than k candidates, so no true
    neighbour is dropped; for the queries where it does not (their near-ties fill the k + 8), the search is
    repeated with twice as many candidates until it does or the whole pool is taken.
    """
    if k < 1 or k > pool.shape[0]:
        raise ValueError(f"k must be in [1, {pool.shape[0]}] (the pool size), got {k}")
    q = _flat(queries)
    p = _flat(pool).to(q.device)
    name = resolve_backend(backend, p.shape[0], q.shape[1], q.device)
    out_dtype = q.dtype
    # direct distances in the queries' own precision for float64, float32 otherwise
    q_re, p_re = (q, p.to(q.dtype)) if q.dtype == torch.float64 else (q.float(), p.float())
    p32 = p.float()
    centre = p32.new_full((p32.shape[0],), 1.0 / p32.shape[0]) @ p32  # the mean row, as one matrix-vector product
    dists, idxs = [], []
    with _no_tf32(), (_faiss_source if name == "faiss" else _torch_source)(q.float(), p32, centre) as source:
        for s in range(0, q.shape[0], chunk_size):
            e = min(q.shape[0], s + chunk_size)
            top, err = source(s, e)
            d, i = _search_chunk(top, err, q_re[s:e], p_re, k)
            dists.append(d.to(out_dtype))
            idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def _search_chunk(top, err: Tensor, q_rows: Tensor, p_re: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The exact k nearest of one chunk of queries from a candidate source (``top(n, rows)``: the n best values and
    pool indices of the chunk's rows ``rows``, None for all, ascending; ``err``: the bound on each row's value
    error); widens the candidates of the rows whose near-ties fill them (see :func:`nearest_neighbours`)."""
    n_pool = p_re.shape[0]
    n = min(n_pool, k + SLACK)
    d_out = torch.empty(q_rows.shape[0], k, dtype=q_rows.dtype, device=q_rows.device)
    i_out = torch.empty(q_rows.shape[0], k, dtype=torch.long, device=q_rows.device)
    rows = None  # all rows on the first pass
    while True:
        vals, cand = top(n, rows)
        e = err if rows is None else err[rows]
        full = (vals[:, -1] <= vals[:, k - 1] + 2 * e) if n < n_pool else torch.zeros_like(e, dtype=torch.bool)
        if rows is None and not bool(full.any()):
            return _rerank(q_rows, p_re, vals, cand, e, k)
        here = torch.arange(q_rows.shape[0], device=q_rows.device) if rows is None else rows
        done = here[~full]
        d_out[done], i_out[done] = _rerank(q_rows[done], p_re, vals[~full], cand[~full], e[~full], k)
        rows, n = here[full], min(n_pool, 2 * n)
        if rows.numel() == 0:
            return d_out, i_out


def _rerank(q_rows: Tensor, p_re: Tensor, vals: Tensor, cand: Tensor, err: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact distances of the k best candidates and of the further ones within 2 err of the k-th (``vals``
    ascending), and the k nearest among them: (distances, pool indices)."""
    dim = p_re.shape[1]
    sub = max(1, (1 << 24) // max(1, k * dim))
    exact = torch.full(cand.shape, float("inf"), dtype=q_rows.dtype, device=q_rows.device)
    for r in range(0, cand.shape[0], sub):  # the k best: direct differences (no matmul)
        best = p_re.index_select(0, cand[r:r + sub, :k].reshape(-1)).view(-1, k, dim)
        exact[r:r + sub, :k] = torch.cdist(q_rows[r:r + sub, None, :], best,
                                           compute_mode="donot_use_mm_for_euclid_dist")[:, 0]
    rows, cols = (vals[:, k:] <= vals[:, k - 1:k] + 2 * err[:, None]).nonzero(as_tuple=True)
    cols = cols + k
    for r in range(0, rows.numel(), sub * k):  # near-ties beyond the k best
        rr, cc = rows[r:r + sub * k], cols[r:r + sub * k]
        diff = q_rows.index_select(0, rr) - p_re.index_select(0, cand[rr, cc])
        exact[rr, cc] = torch.linalg.vector_norm(diff, dim=-1)
    d, order = torch.topk(exact, k, dim=1, largest=False)
    return d, torch.gather(cand, 1, order)


@contextmanager
def _torch_source(q32: Tensor, p32: Tensor, centre: Tensor):
    """Candidates from one float32 matmul per chunk of queries (the torch backend)."""
    dim = q32.shape[1]
    p_c = p32 - centre
    radius = torch.linalg.vector_norm(p_c, dim=1)
    bias = radius.pow(2) + 2 * (p_c @ centre)
    # few features: fold the bias into the matmul (a pass over the Q x N scores would cost more than the matmul)
    p_aug = torch.cat([-2 * p_c, bias[:, None]], 1) if dim < 64 else None
    r_max, c_norm = radius.max(), torch.linalg.vector_norm(centre)

    def source(start: int, stop: int):
        qc = q32[start:stop]
        score = (torch.cat([qc, qc.new_ones(qc.shape[0], 1)], 1) @ p_aug.T if p_aug is not None
                 else torch.addmm(bias, qc, p_c.T, alpha=-2))
        q_norm = torch.linalg.vector_norm(qc, dim=1)
        err = _LAMBDA * (dim + 1) ** 0.5 * _U * (2 * q_norm * r_max + r_max ** 2 + 2 * c_norm * r_max)

        def top(n: int, rows: Tensor | None):
            return torch.topk(score if rows is None else score[rows], n, dim=1, largest=False, sorted=True)
        return top, err

    yield source


@contextmanager
def _faiss_source(q32: Tensor, p32: Tensor, centre: Tensor):
    """Candidates from an exact FAISS flat index of the centred pool (the faiss backend), on the GPU for CUDA
    tensors when faiss has GPU support, else on the CPU with as many threads as torch uses and its BLAS path."""
    import faiss

    dim, cuda = q32.shape[1], q32.device.type == "cuda"
    gpu = cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if gpu:  # untested here (faiss-cpu only): faiss takes torch CUDA tensors through torch_utils; its cuBLAS
        # handles run float32 GEMMs without TF32 (StandardGpuResources: CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_...)
        import faiss.contrib.torch_utils  # noqa: F401

        config = faiss.GpuIndexFlatConfig()
        config.device = q32.device.index if q32.device.index is not None else torch.cuda.current_device()
        config.useFloat16 = False  # float32 storage and arithmetic: the error bound assumes it
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatL2(resources, dim, config)
    else:
        index = faiss.IndexFlatL2(dim)
    r_max = torch.zeros((), device=q32.device)
    step = max(1, (1 << 24) // dim)
    for s in range(0, p32.shape[0], step):  # add the centred pool in blocks: no second full copy
        block = (p32[s:s + step] - centre).contiguous()
        r_max = torch.maximum(r_max, torch.linalg.vector_norm(block, dim=1).max())
        index.add(block if gpu else block.cpu().numpy())
    threads, blas_from = faiss.omp_get_max_threads(), faiss.cvar.distance_compute_blas_threshold
    faiss.omp_set_num_threads(torch.get_num_threads())
    # faiss 1.15 computes up to 128000 queries pair by pair (one pass over the pool per query: 20x slower than its
    # BLAS path at 10^5 x 64 here, benchmarks/RESULTS.md); the error bound holds for both paths
    faiss.cvar.distance_compute_blas_threshold = min(blas_from, 20)

    def source(start: int, stop: int):
        qc = (q32[start:stop] - centre).contiguous()
        err = (_LAMBDA * dim ** 0.5 + 4) * _U * (torch.linalg.vector_norm(qc, dim=1) + r_max) ** 2

        def top(n: int, rows: Tensor | None):
            x = qc if rows is None else qc[rows]
            if gpu:
                vals, cand = index.search(x, n)
                return vals, cand
            vals, cand = index.search(x.cpu().numpy(), n)
            return torch.from_numpy(vals).to(q32.device), torch.from_numpy(cand).to(q32.device)
        return top, err

    try:
        yield source
    finally:
        faiss.omp_set_num_threads(threads)
        faiss.cvar.distance_compute_blas_threshold = blas_from
        index.reset()

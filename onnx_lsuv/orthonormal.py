"""Orthonormal pre-initialisation (Saxe et al. 2014), over the matrix views of ``layouts``.

Each matrix is distributed uniformly (Haar) over the matrices with orthonormal rows (when it
has no more rows than columns) or columns (otherwise). It is the Q factor of a Gaussian draw
with the signs of R's diagonal folded in, which is what ``torch.nn.init.orthogonal_`` draws.

How, for an m x n draw (m >= n; a wide matrix is drawn as its transpose):

- Small draws (fewer than ``SMALL`` elements): numpy's Householder QR of a Gaussian matrix, all
  groups of a layer in one batched call, then the sign fix.
- The rest: Stewart's method (1980). Householder QR of a Gaussian matrix applies reflectors
  H_1 ... H_n, the k-th built from column k below the diagonal of the matrix as the earlier
  reflectors left it; by the Gaussian's rotational invariance those columns are again
  independent Gaussian vectors. So the reflectors are built from fresh Gaussian vectors (the
  lower trapezoid of a Gaussian draw), skipping the factorisation altogether, and
  Q = H_1 ... H_n diag(sign r_kk) is accumulated from them (backwards, NB reflectors at a time
  in compact WY form, I - V T V^T), as LAPACK's orgqr does: 2 m n^2 - 2/3 n^3 flops, half of a
  QR's. The blocks' V and T are independent of each other, and are built in parallel; each
  block's update of Q runs as GEMMs over fixed chunks of Q's columns, in parallel too.

Every task does the same arithmetic whatever the number of threads that run them (the blocks,
the chunks and each block's Gaussian generator are fixed by the shape and the seed alone, and
BLAS runs one thread per task), so the bytes depend on the seed alone.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

SMALL = 1 << 16  # elements per matrix below which a layer's groups are drawn by batched QR
NB = 96  # reflectors per block (tuned on 2 cores: 64-128 within noise)
CHUNK = 384  # columns of Q per update task: fixed, never per thread count
# Draws of at least this many elements run one at a time, their blocks and chunks spread over
# the threads; smaller ones run a layer per thread.
BIG_MATRIX = 1 << 22


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """float64 weights are drawn in float64; every other float type in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _pmap(pool: ThreadPoolExecutor | None, fn: Callable, items) -> list:
    return list(pool.map(fn, items) if pool is not None else map(fn, items))


def batched_qr_q(a: np.ndarray) -> np.ndarray:
    """Sign-fixed Q factors of a stack of tall or square matrices (g, m, n), m >= n."""
    q, r = np.linalg.qr(a, mode="reduced")
    signs = np.sign(np.diagonal(r, axis1=-2, axis2=-1)).astype(q.dtype)
    signs[signs == 0] = 1
    return q * signs[:, None, :]


def _block_reflectors(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Householder reflectors of one block: ``x`` is (m - j0) x b, column i's Gaussian
    vector being x[i:, i]. Returns V (unit lower trapezoidal, Fortran order), T (upper
    triangular: H_1 ... H_b = I - V T V^T) and the signs of R's diagonal."""
    b = x.shape[1]
    dtype = x.dtype
    v = np.tril(x)
    v64 = v.astype(np.float64)
    alpha = np.diagonal(v64).copy()
    norm = np.sqrt(np.einsum("ij,ij->j", v64, v64))
    beta = -np.copysign(norm, alpha)  # H x = beta e_1, as LAPACK's larfg
    denom = alpha - beta
    denom[denom == 0] = 1.0  # an all-zero column: H = I - 2 e e^T, still orthogonal
    v /= denom.astype(dtype)
    v[np.arange(b), np.arange(b)] = 1
    signs = np.where(beta < 0, -1.0, 1.0).astype(dtype)
    # tau_i = 2 / (v_i^T v_i) from the stored (rounded) v: each H_i is orthogonal to rounding.
    # T^-1 = strictly-upper(V^T V) + diag(V^T V) / 2 (the "UT transform").
    v64 = v.astype(np.float64)
    gram = v64.T @ v64
    t_inv = np.triu(gram, 1) + np.diag(np.diagonal(gram) / 2)
    t = scipy.linalg.solve_triangular(t_inv, np.eye(b), lower=False, check_finite=False)
    return np.asfortranarray(v), t.astype(dtype), signs


def stewart_q(m: int, n: int, seeds: Sequence[int], dtype: np.dtype,
              pool: ThreadPoolExecutor | None = None, nb: int | None = None,
              chunk: int | None = None) -> tuple[list[np.ndarray], np.ndarray]:
    """An m x n (m >= n) Haar-distributed matrix with orthonormal columns, by Stewart's method.

    Args:
        m, n: The shape.
        seeds: One seed per block of ``nb`` columns (its Gaussian vectors).
        dtype: float32 or float64.
        pool: Threads for the blocks and chunks. Defaults to none (this thread).
        nb, chunk: Reflectors per block; Q's columns per update task (a multiple of ``nb``).
            Default to ``NB`` and ``CHUNK``.

    Returns:
        Q's column chunks (C order, m x chunk each) before the sign fix, and the signs.
    """
    dtype = np.dtype(dtype)
    nb, chunk = nb or NB, chunk or CHUNK
    starts = list(range(0, n, chunk))
    chunks = [np.zeros((m, min(chunk, n - c)), dtype) for c in starts]
    blocks = list(range(0, n, nb))
    factors: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    signs = np.empty(n, dtype)

    def prepare(k: int) -> None:
        j0 = blocks[k]
        j1 = min(j0 + nb, n)
        x = np.random.default_rng(int(seeds[k])).standard_normal((m - j0, j1 - j0), dtype=dtype)
        v, t, signs[j0:j1] = _block_reflectors(x)
        # Q's own columns j0..j1 (later blocks never touch them): (I - V T V^T) [I; 0]
        diag = -(v @ (t @ v[:j1 - j0].T))
        diag[np.arange(j1 - j0), np.arange(j1 - j0)] += 1
        c = j0 // chunk
        chunks[c][j0:, j0 - starts[c]:j1 - starts[c]] = diag
        factors[j0] = (v, t)

    _pmap(pool, prepare, range(len(blocks)))
    gemm = scipy.linalg.blas.dgemm if dtype == np.float64 else scipy.linalg.blas.sgemm
    for j0 in reversed(blocks):  # Q[j0:, j1:] = (I - V T V^T) Q[j0:, j1:]
        j1 = min(j0 + nb, n)
        v, t = factors.pop(j0)
        low = v[j1 - j0:]

        def update(c: int, j0=j0, j1=j1, v=v, t=t, low=low) -> None:
            ch = chunks[c]
            first = max(j1 - starts[c], 0)  # the chunk's first column right of the block
            w = t @ (low.T @ ch[j1:, first:])  # (Q's rows j0..j1 there are still zero)
            if first:
                ch[j0:, first:] -= v @ w
            else:  # in place: ch[j0:]^T -= w^T v^T (a C-order block is a Fortran one, turned)
                gemm(-1.0, w.T, v, beta=1.0, c=ch[j0:].T, trans_b=1, overwrite_c=1)

        _pmap(pool, update, [c for c in range(len(chunks)) if starts[c] + chunks[c].shape[1] > j1])
    return chunks, signs


def orthonormal_matrices(
    groups: int, rows: int, cols: int, rng: np.random.Generator, dtype: np.dtype = np.float32,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """Draw ``groups`` orthonormal (rows x cols) matrices.

    Args:
        groups: Number of independent matrices.
        rows: Output units per matrix.
        cols: Fan-in per matrix.
        rng: The random generator to draw from; the result depends only on its state.
        dtype: float32 or float64. Defaults to float32.
        pool: Threads for the blocks of large draws; the bits do not depend on it. Defaults to
            none (this thread).

    Returns:
        Array of shape (groups, rows, cols): W W^T = I if rows <= cols, else W^T W = I.
    """
    dtype = np.dtype(dtype)
    tall, short = max(rows, cols), min(rows, cols)
    wide = rows <= cols and rows != cols
    out = np.empty((groups, rows, cols), dtype=dtype)
    if tall * short < SMALL:
        q = batched_qr_q(rng.standard_normal((groups, tall, short), dtype=dtype))
        out[:] = np.swapaxes(q, 1, 2) if wide else q
        return out
    blocks = -(-short // NB)
    seeds = rng.integers(0, 2**63 - 1, size=(groups, blocks), dtype=np.int64)
    for g in range(groups):
        chunks, signs = stewart_q(tall, short, seeds[g], dtype, pool)
        starts = range(0, short, CHUNK)

        def place(c: int, g=g, chunks=chunks, signs=signs, starts=starts) -> None:
            s = starts[c]
            part = chunks[c]
            part *= signs[s:s + part.shape[1]]
            if wide:
                out[g, s:s + part.shape[1], :] = part.T
            else:
                out[g, :, s:s + part.shape[1]] = part

        _pmap(pool, place, range(len(chunks)))
        del chunks
    return out


def default_workers() -> int:
    """CPUs this process may run on (containers restrict affinity; ``os.cpu_count`` does not)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def orthonormal_each(
    shapes: Sequence[tuple[int, int, int]],
    seed: int,
    dtypes: Sequence[np.dtype],
    workers: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Orthonormal matrices for many layers, as (index, array) pairs while they are ready (the
    largest first): the caller can take each away before the next is drawn.

    Layer ``i`` draws from its own generator seeded with ``(seed, i)``, so the result does not
    depend on the number of threads or the order in which layers finish.

    Args:
        shapes: (groups, rows, cols) per layer.
        seed: Base seed.
        dtypes: Compute dtype per layer.
        workers: Thread count. Defaults to the CPUs available to this process.
    """

    def job(i: int, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
        g, r, c = shapes[i]
        return orthonormal_matrices(g, r, c, np.random.default_rng([seed, i]), dtypes[i], pool)

    order = sorted(range(len(shapes)), key=lambda i: -int(np.prod(shapes[i])))
    big = [i for i in order if int(np.prod(shapes[i][1:])) >= BIG_MATRIX]
    small = [i for i in order if i not in set(big)]
    workers = workers or default_workers()
    with threadpool_limits(limits=1, user_api="blas"), \
            ThreadPoolExecutor(max_workers=workers) as pool:
        for i in big:  # one at a time, its blocks on every thread
            yield i, job(i, pool)
        if workers <= 1 or len(small) <= 1:
            for i in small:
                yield i, job(i)
        else:  # a few layers ahead at most: memory stays bounded
            window = 2 * workers
            futures = {i: pool.submit(job, i) for i in small[:window]}
            for k, i in enumerate(small):
                res = futures.pop(i).result()
                if k + window < len(small):
                    nxt = small[k + window]
                    futures[nxt] = pool.submit(job, nxt)
                yield i, res


def orthonormal_many(
    shapes: Sequence[tuple[int, int, int]],
    seed: int,
    dtypes: Sequence[np.dtype],
    workers: int | None = None,
    on_done: Callable[[int], None] | None = None,
) -> list[np.ndarray]:
    """``orthonormal_each``'s matrices as a list in the order of ``shapes`` (``on_done`` is
    called with each index as it is ready)."""
    results: list[np.ndarray | None] = [None] * len(shapes)
    for i, res in orthonormal_each(shapes, seed, dtypes, workers):
        results[i] = res
        if on_done is not None:
            on_done(i)
    return results  # type: ignore[return-value]

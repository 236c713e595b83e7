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

import ctypes
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.linalg
from threadpoolctl import threadpool_limits

GRAM_ROWS = 4096  # rows per float64 piece of a block's Gram matrix (no big float64 copy)
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
    vector being x[i:, i] (``x`` becomes V). Returns V (unit lower trapezoidal), T (upper
    triangular: H_1 ... H_b = I - V T V^T) and the signs of R's diagonal."""
    b = x.shape[1]
    dtype = x.dtype
    v = x
    v[:b] = np.tril(v[:b])  # (the rows below the first b are all below the diagonal)
    alpha = np.diagonal(v).astype(np.float64)
    norm = np.sqrt(np.einsum("ij,ij->j", v, v, dtype=np.float64))
    beta = -np.copysign(norm, alpha)  # H x = beta e_1, as LAPACK's larfg
    denom = alpha - beta
    denom[denom == 0] = 1.0  # an all-zero column: H = I - 2 e e^T, still orthogonal
    v /= denom.astype(dtype)
    v[np.arange(b), np.arange(b)] = 1
    signs = np.where(beta < 0, -1.0, 1.0).astype(dtype)
    # tau_i = 2 / (v_i^T v_i) from the stored (rounded) v: each H_i is orthogonal to rounding.
    # T^-1 = strictly-upper(V^T V) + diag(V^T V) / 2 (the "UT transform").
    gram = np.zeros((b, b))
    for k in range(0, v.shape[0], GRAM_ROWS):  # in float64, by row blocks summed in order
        part = v[k:k + GRAM_ROWS].astype(np.float64)
        gram += part.T @ part
    t_inv = np.triu(gram, 1) + np.diag(np.diagonal(gram) / 2)
    t = scipy.linalg.solve_triangular(t_inv, np.eye(b), lower=False, check_finite=False)
    return v, t.astype(dtype), signs


def _blas_gemm(dtype: np.dtype):
    """BLAS's sgemm/dgemm itself (scipy's cython_blas, through ctypes: it releases the GIL),
    for updates in place of strided blocks, which scipy's Python wrappers would copy."""
    name = "dgemm" if dtype == np.float64 else "sgemm"
    fn = _GEMMS.get(name)
    if fn is None:
        import scipy.linalg.cython_blas as cython_blas

        capsule = cython_blas.__pyx_capi__[name]
        api = ctypes.pythonapi
        api.PyCapsule_GetName.restype = ctypes.c_char_p
        api.PyCapsule_GetName.argtypes = [ctypes.py_object]
        api.PyCapsule_GetPointer.restype = ctypes.c_void_p
        api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
        pointer = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
        num = ctypes.c_double if dtype == np.float64 else ctypes.c_float
        i, p = ctypes.POINTER(ctypes.c_int), ctypes.c_void_p
        fn = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, i, i, i,
                              ctypes.POINTER(num), p, i, p, i, ctypes.POINTER(num), p, i)(pointer)
        _GEMMS[name] = fn
    return fn, (ctypes.c_double if dtype == np.float64 else ctypes.c_float)


_GEMMS: dict = {}


def _minus_gemm(dtype, transa: bytes, transb: bytes, m: int, n: int, k: int, a: np.ndarray,
                lda: int, b: np.ndarray, ldb: int, c_address: int, ldc: int) -> None:
    """C = C - op(A) op(B), column-major (BLAS's own argument convention)."""
    fn, num = _blas_gemm(dtype)
    ref = ctypes.byref
    fn(transa, transb, ref(ctypes.c_int(m)), ref(ctypes.c_int(n)), ref(ctypes.c_int(k)),
       ref(num(-1.0)), a.ctypes.data, ref(ctypes.c_int(lda)), b.ctypes.data,
       ref(ctypes.c_int(ldb)), ref(num(1.0)), c_address, ref(ctypes.c_int(ldc)))


def stewart_fill(q: np.ndarray, wide: bool, seeds: Sequence[int],
                 pool: ThreadPoolExecutor | None = None, nb: int | None = None,
                 chunk: int | None = None) -> None:
    """Fill ``q`` (zeros, C order) with a Haar-distributed matrix by Stewart's method: Q itself
    (m x n, m >= n, orthonormal columns) or, with ``wide``, its transpose (n x m).

    Args:
        q: The output, float32 or float64, all zeros.
        wide: Whether ``q`` holds Q^T.
        seeds: One seed per block of ``nb`` columns of Q (its Gaussian vectors).
        pool: Threads for the blocks and chunks. Defaults to none (this thread).
        nb, chunk: Reflectors per block; Q's columns per update task. Default to ``NB`` and
            ``CHUNK``.
    """
    dtype = q.dtype
    nb, chunk = nb or NB, chunk or CHUNK
    n, m = q.shape if wide else q.shape[::-1]
    row_bytes, item = q.strides[0], q.itemsize
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
        if wide:
            q[j0:j1, j0:] = diag.T
        else:
            q[j0:, j0:j1] = diag
        factors[j0] = (np.asfortranarray(v) if wide else v, t)  # (the faster forms, measured)

    _pmap(pool, prepare, range(len(blocks)))
    base = q.ctypes.data
    for j0 in reversed(blocks):  # Q[j0:, j1:] = (I - V T V^T) Q[j0:, j1:]
        j1 = min(j0 + nb, n)
        v, t = factors.pop(j0)
        b = j1 - j0
        low = v[b:]
        # Fixed column chunks of Q (boundaries at multiples of ``chunk``), right of the block.
        spans = [(max(c, j1), min(c + chunk, n)) for c in range(j1 // chunk * chunk, n, chunk)]

        def update(span: tuple[int, int], j0=j0, j1=j1, v=v, t=t, low=low, b=b) -> None:
            c0, c1 = span
            sub = q[c0:c1, j1:].T if wide else q[j1:, c0:c1]  # Q[j1:, c0:c1]; its rows
            w = np.ascontiguousarray(t @ (low.T @ sub))  # j0..j1 are still zero: b x (c1-c0)
            if wide:  # Q[j0:, c0:c1] is q[c0:c1, j0:] read column-major: ld = m
                _minus_gemm(dtype, b"N", b"T", m - j0, c1 - c0, b, v, m - j0, w, c1 - c0,
                            base + c0 * row_bytes + j0 * item, m)
            else:  # Q[j0:, c0:c1]^T read column-major (ld = n) -= W^T V^T
                _minus_gemm(dtype, b"N", b"N", c1 - c0, m - j0, b, w, c1 - c0, v, b,
                            base + j0 * row_bytes + c0 * item, n)

        _pmap(pool, update, [sp for sp in spans if sp[1] > sp[0]])
    rows = [slice(k, k + BLOCK_ROWS) for k in range(0, q.shape[0], BLOCK_ROWS)]

    def sign(part: slice) -> None:
        q[part] *= signs[part, None] if wide else signs

    _pmap(pool, sign, rows)


BLOCK_ROWS = 4096  # rows of the output per sign-fixing task


def stewart_q(m: int, n: int, seeds: Sequence[int], dtype: np.dtype,
              pool: ThreadPoolExecutor | None = None, nb: int | None = None,
              chunk: int | None = None) -> np.ndarray:
    """An m x n (m >= n) Haar-distributed matrix with orthonormal columns (``stewart_fill``)."""
    q = np.zeros((m, n), dtype)
    stewart_fill(q, False, seeds, pool, nb, chunk)
    return q


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
    if tall * short < SMALL:
        q = batched_qr_q(rng.standard_normal((groups, tall, short), dtype=dtype))
        return np.ascontiguousarray(np.swapaxes(q, 1, 2) if wide else q)
    blocks = -(-short // NB)
    seeds = rng.integers(0, 2**63 - 1, size=(groups, blocks), dtype=np.int64)
    out = np.zeros((groups, rows, cols), dtype=dtype)
    for g in range(groups):
        stewart_fill(out[g], wide, seeds[g], pool)
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

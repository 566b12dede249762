"""The top-k kernels (``kernels/topk.py``: the radix selection and the one-program sort) against ``jax.lax.top_k``,
their definition.

CPU: the sort kernel and the radix selection's four kernels under Triton's interpreter in a subprocess, launched
through the jax launcher (``top_k_triton`` with ``tests/triton_shim.py``), also as the indexer's prefill selection
(``indexer_topk_blocked(..., radix=True)`` against ``indexer_topk_reference``: the same ids). GPU: the jitted launcher
at the indexer's decode shapes (262,144 entries, k = 512), against ``jax.lax.top_k`` on the same device (skipped
without a GPU or jax-triton).

Oracle and tolerance: ``jax.lax.top_k``'s ids, and its values (signed zeros included; a NaN as a NaN: the GPU's
``top_k`` returned another NaN bit pattern for one row of 10,000 entries), exactly: selection has no tolerance. The
rows are built to fail a wrong kernel: values from a small set (many ties straddle the k-th place, so the lowest-id rule
for ties matters), ``-inf`` runs (invisible entries), ``-0.0`` beside ``+0.0`` (``jax.lax.top_k`` puts ``+0.0``
first), a NaN, rows of one repeated value, ``k`` equal to the row length, rows not a multiple of the kernels' block,
several programs per row (the cross-program tie ranks).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_shim  # noqa: E402

from dsv4_jax.kernels import indexer as ix  # noqa: E402
from dsv4_jax.kernels import topk, triton_unavailable  # noqa: E402

SEED = 4242
# (rows, entries, k): several programs per row on the CPU plan (4 "SMs"), k = N, k tiny, a row of 9,000
CASES = [(3, 5000, 512), (1, 1024, 1024), (4, 2500, 7), (2, 9000, 300)]
# the one-program sort (top_k_sort_triton): rows padded to a power of two, k = N not a power of two, k tiny, the
# indexer's 4K-context row (993 of 1,024 entries visible, k = 512)
SORT_CASES = [(3, 1000, 512), (2, 300, 300), (4, 77, 5), (1, 1024, 512)]


def _rows(R: int, n: int, seed: int) -> np.ndarray:
    """bf16 rows with ties at every scale, -inf runs, signed zeros, and (row 1 of 2+) one repeated value."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((R, n)).astype(np.float32)
    x[:, ::3] = np.round(x[:, ::3] * 2) / 2  # a small set of values: ties around any k-th place
    x[0, : n // 10] = -np.inf
    x[-1, 5::4] = -0.0
    x[-1, 7::4] = 0.0
    if R > 2:
        x[2, 17] = np.nan  # the total order: above +inf
        x[2, 18] = np.inf
    if R > 1:
        x[1] = 0.75
        x[1, ::97] = -np.inf
    return np.asarray(x.astype(ml_dtypes.bfloat16))


def _check(vals, ids, x, k, what):
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    assert ids.shape == want_i.shape, f"{what}: ids shape {ids.shape}"
    bad = np.argwhere(np.asarray(ids) != np.asarray(want_i))
    assert bad.size == 0, f"{what}: {len(bad)} ids differ from jax.lax.top_k, first at {bad[0].tolist()}"
    got, want = np.asarray(vals).astype(np.float32), np.asarray(want_v).astype(np.float32)
    same = (got == want) & (np.signbit(got) == np.signbit(want)) | (np.isnan(got) & np.isnan(want))
    bad = np.argwhere(~same)
    assert bad.size == 0, f"{what}: values differ at {bad[:4].tolist()}: {got[~same][:4]} vs {want[~same][:4]}"


# ---------------------------------------------------------------------------------------------- interpreter
def _interpret_main(path: str) -> None:
    """Subprocess body: every case through the jitted jax launcher (the shim runs the kernels)."""
    triton_shim.install("cpu")
    z = dict(np.load(path))
    res = {}
    for c in range(int(z["n"])):
        x = jnp.asarray(z[f"{c}_x"].view(ml_dtypes.bfloat16))
        v, i = jax.jit(topk.top_k_triton, static_argnums=1)(x, int(z[f"{c}_k"]))
        res[f"{c}_v"], res[f"{c}_i"] = np.asarray(v).view(np.uint16), np.asarray(i)
    for c in range(int(z["ns"])):
        x = jnp.asarray(z[f"s{c}_x"].view(ml_dtypes.bfloat16))
        v, i = jax.jit(topk.top_k_sort_triton, static_argnums=1)(x, int(z[f"s{c}_k"]))
        res[f"s{c}_v"], res[f"s{c}_i"] = np.asarray(v).view(np.uint16), np.asarray(i)
    res["sort_launches"] = np.array(sum(r["kernel"] == "_sort_kernel" for r in triton_shim.LAUNCHES))
    q, hw, keys, t = _prefill_case()  # the indexer's prefill rows, radix selection after the blocks
    run = jax.jit(lambda q, hw, keys, t: ix.indexer_topk_blocked(q, hw, keys, t, PREFILL_K, block=64, rows=16,
                                                                 radix=True))
    res["prefill"] = np.asarray(run(q, hw, keys, t))
    res["launches"] = np.array(len(triton_shim.LAUNCHES))
    run = jax.jit(lambda q, hw, keys, t: ix.indexer_topk_blocked(q, hw, keys, t, PREFILL_K, rows=16, radix=True,
                                                                 kernel=True))  # totals by the prefill kernel
    res["prefill_kernel"] = np.asarray(run(q, hw, keys, t))
    res["kernel_launches"] = np.array(sum(r["kernel"] == "_prefill_score_kernel" for r in triton_shim.LAUNCHES))
    np.savez(path + ".out.npz", **res)


PREFILL_K = 32


def _prefill_case():
    """Prefill rows of a small indexer: 2 x 40 query rows over 300 FP4 entries (5 blocks of 64, the last clamped;
    3 row blocks of 16), positions so that rows see 1 to 300 entries, duplicated keys (ties)."""
    from test_kernels_indexer import _case

    t = (np.arange(40)[None, :] * 30 + np.array([[5], [9]])).astype(np.int32)  # [2, 40]
    return _case(2, 40, 8, 64, 300, t, SEED)


def test_interpreter_matches_lax_top_k(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays = {"n": len(CASES), "ns": len(SORT_CASES)}
    for c, (R, n, k) in enumerate(CASES):
        arrays.update({f"{c}_x": _rows(R, n, SEED + c).view(np.uint16), f"{c}_k": np.int32(k)})
    for c, (R, n, k) in enumerate(SORT_CASES):
        arrays.update({f"s{c}_x": _rows(R, n, SEED + 50 + c).view(np.uint16), f"s{c}_k": np.int32(k)})
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    assert int(out["launches"]) == 4 * len(CASES) + len(SORT_CASES) + 4 * 3, "expected 4 launches per radix top-k"
    assert int(out["sort_launches"]) == len(SORT_CASES), "expected one launch per sort top-k"
    for c, (R, n, k) in enumerate(SORT_CASES):
        _check(out[f"s{c}_v"].view(ml_dtypes.bfloat16), out[f"s{c}_i"], _rows(R, n, SEED + 50 + c), k, f"sort {c}")
    want = np.asarray(ix.indexer_topk_reference(*_prefill_case(), PREFILL_K))
    assert (out["prefill"] == want).all(), "indexer prefill rows with the radix selection differ from the reference"
    assert int(out["kernel_launches"]) == 3, "expected one scoring launch per row block"
    assert (out["prefill_kernel"] == want).all(), "prefill rows scored by the kernel differ from the reference"
    for c, (R, n, k) in enumerate(CASES):
        assert topk.plan(R, n, "cpu")["P"] > 1 or n <= topk.BLOCK, "a case meant to span programs does not"
        _check(out[f"{c}_v"].view(ml_dtypes.bfloat16), out[f"{c}_i"], _rows(R, n, SEED + c), k, f"case {c}")


def test_plan_covers_each_row_once():
    for rows, n in [(1, 262144), (32, 262144), (3, 5000), (64, 1000), (1, 1)]:
        p = topk.plan(rows, n, "sm90")
        assert p["CH"] % topk.BLOCK == 0 and p["P"] * p["CH"] >= n > (p["P"] - 1) * p["CH"], (rows, n, p)
        assert p["PP"] >= p["P"]


def test_bad_input_is_named():
    x = jnp.zeros((2, 100), jnp.float32)
    with pytest.raises(ValueError, match="must be bfloat16"):
        topk.top_k_triton(x, 4)
    with pytest.raises(ValueError, match=r"k=101 must be in \[1, 100\]"):
        topk.top_k_triton(x.astype(jnp.bfloat16), 101)


def test_sort_bad_input_is_named():
    x = jnp.zeros((2, topk.SORT_MAX + 1), jnp.bfloat16)
    with pytest.raises(ValueError, match=f"rows of {topk.SORT_MAX + 1} entries exceed SORT_MAX"):
        topk.top_k_sort_triton(x, 4)
    with pytest.raises(ValueError, match=r"k=0 must be in \[1, 100\]"):
        topk.top_k_sort_triton(x[:, :100], 0)


def test_sort_plan_pads_to_a_power_of_two():
    for n, np_, warps in [(1, 2, 4), (77, 128, 4), (1000, 1024, 8), (1024, 1024, 8), (8192, 8192, 16)]:
        p = topk.sort_plan(n)
        assert (p["NP"], p["num_warps"]) == (np_, warps), (n, p)


def test_auto_takes_the_kernels_for_long_rows_only(monkeypatch):
    monkeypatch.setattr(topk, "use_triton", lambda kernels: kernels != "reference")
    monkeypatch.setattr(topk, "use_opt_in_triton", lambda kernels: kernels == "triton")
    n = topk.MIN_ENTRIES
    assert [topk.use_kernel("auto", m) for m in (1024, n - 1, n, 262144)] == [False, False, True, True]
    assert topk.use_kernel("triton", 16) and not topk.use_kernel("reference", 262144)


# ---------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(triton_unavailable() is not None, reason=f"top-k kernel: {triton_unavailable()}")


@gpu
@pytest.mark.parametrize("R,n,k", [(32, 262144, 512), (1, 262144, 512), (5, 10000, 2048), (2, 8192, 8192)])
def test_gpu_matches_lax_top_k(R, n, k):
    """The indexer's decode shapes (batch 32 and 1 at a 1M-token context), a large k, k = N."""
    x = _rows(R, n, SEED + n + R)
    v, i = jax.jit(topk.top_k_triton, static_argnums=1)(jnp.asarray(x), k)
    _check(v, i, x, k, f"R={R} n={n} k={k}")


@gpu
@pytest.mark.parametrize("R,n,k", [(1, 1024, 512), (32, 1024, 512), (3, 8191, 512), (2, 4096, 4096), (5, 77, 5)])
def test_gpu_sort_matches_lax_top_k(R, n, k):
    """The one-program sort at the indexer's short caches (4K tokens at batch 1 and 32, just under 32K), k = N, a
    tiny row."""
    x = _rows(R, n, SEED + 2 * n + R)
    v, i = jax.jit(topk.top_k_sort_triton, static_argnums=1)(jnp.asarray(x), k)
    _check(v, i, x, k, f"sort R={R} n={n} k={k}")


@gpu
@pytest.mark.parametrize("radix,kernel", [(True, False), (False, False), (True, True)],
                         ids=["radix", "merged", "radix-kernel"])
def test_gpu_prefill_rows_match_reference(radix, kernel):
    """The indexer's prefill rows on the GPU at V4's indexer shape (64 heads of 128 dims, k = 512): 2 x 384 query
    rows over 16,384 FP4 entries (a 64K-token cache) with duplicated keys (ties) and rows that see from 0 to all of
    them; the radix selection (what ``"auto"`` takes for prefill rows) and the per-block merge both give
    :func:`indexer_topk_reference`'s ids, computed on the same device; so do the radix selection's totals from the
    scoring kernel (``kernel``, what ``"auto"`` takes since 2026-12-03)."""
    rng = np.random.default_rng(SEED + 7)
    t = np.sort(rng.integers(0, 4 * 16384, (2, 384)), axis=1).astype(np.int32)
    t[:, 0] = 2  # a row that sees no entry
    from test_kernels_indexer import _case

    q, hw, keys, t = _case(2, 384, 64, 128, 16384, t, SEED + 8)
    want = np.asarray(jax.jit(ix.indexer_topk_reference, static_argnums=4)(q, hw, keys, t, 512))
    got = np.asarray(jax.jit(lambda *a: ix.indexer_topk_blocked(*a, 512, radix=radix, kernel=kernel))(q, hw, keys, t))
    bad = np.argwhere(got != want)
    assert bad.size == 0, f"{len(bad)} ids differ from the reference, first at {bad[0].tolist()}"


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])

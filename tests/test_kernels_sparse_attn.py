"""The sparse-attention kernel (``dsv4_jax/kernels/sparse_attention.py``) against the XLA reference.

CPU: the ``@triton.jit`` kernel runs under Triton's interpreter in a subprocess (``TRITON_INTERPRET=1`` must be set
before ``triton.jit`` decorates) on torch CPU tensors; GPU: the jax-triton path inside ``jit`` (skipped without a
GPU or jax-triton).

Tolerance. Both sides form the same exact bf16 x bf16 products and sum them in fp32 (orders differ: ~1e-6
relative). The kernel follows the official loop (online softmax in blocks of 64, P rounded to bf16 relative to the
running maximum); the reference rounds P relative to the row's final maximum. Each P element carries one bf16
rounding (relative <= 2**-9) on either side, so the outputs differ by at most 2**-8 * sum_j (p_j / l) |v_j| per
element; the reference output is itself rounded to bf16 (half an ulp), and a 2**-12 relative slack covers the fp32
sums and exp. Splitting an index list (flash-decoding) changes only where P is rounded (each split's running
maximum instead of the whole list's: still one bf16 rounding per element, rescaled in fp32 by the merge) and the fp32
summation order, so the same bound holds.

Cases: decode rows at different positions (windows not yet full: masked slots first, a fully masked first block),
prefill chunks, compressed entries with -1 holes, K not a multiple of 64, plain and FP8-snapped caches, no
compressed source (window-only layers); the split path: several splits, a split whose whole range is masked (the
first, and one in the middle), uneven splits (the last one short), splits of prefill rows; output tiles of 64 dims
and of the whole head (a tile straddling the FP8 / RoPE boundary), of half a 256-dim head with 128 RoPE dims (two
64-dim chunks for the other half), of a quarter of a 256-dim head (three chunks, only the last may hold RoPE dims).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_shim  # noqa: E402


@pytest.fixture(autouse=True)
def _portable_kernel(monkeypatch):
    """This file tests the portable kernel: the Gluon one (``sparse_attention.WS``, which by default takes decode
    calls of 8+ rows on sm_90) is tested in ``test_kernels_sparse_attn_ws.py``."""
    import dsv4_jax.kernels.sparse_attention as sa

    monkeypatch.setattr(sa, "WS", False)


# (name, B, S, H, Dh, W, Nc, n_comp index slots, positions, fp8, plan overrides): "bps" = index blocks per split
# (else the CPU plan's choice), "BK" = entries per block (else 64), "DC" = output dims per program (else 64), "hole" =
# list slots set to -1, "dr" = RoPE dims of the FP8 layout (else 64), "S8" = scale rows padded to 8 bytes and read as
# one vector (whole-head tiles); a name with "split" must take the split path
CASES = [
    ("decode-fp8-split3", 2, 1, 4, 128, 128, 40, 24, [5, 300], True, dict(bps=1, DC=128)),
    ("decode-plain-uneven-split", 2, 1, 4, 128, 128, 40, 24, [70, 129], False, dict(bps=2)),
    ("prefill-fp8", 1, 9, 4, 128, 128, 16, 8, [20], True, dict()),
    ("window-only-split", 2, 3, 2, 128, 128, 0, 0, [0, 200], True, dict(bps=1, DC=128)),
    ("decode-masked-split", 1, 1, 4, 128, 128, 300, 200, [1000], True, dict(bps=1, hole=(192, 256))),
    ("decode-dh256-dr128-split", 1, 1, 2, 256, 64, 40, 24, [300], True, dict(bps=1, DC=128, dr=128)),
    ("prefill-dh256", 1, 2, 2, 256, 64, 40, 24, [90], True, dict()),
    ("prefill-padded-heads", 1, 9, 4, 128, 128, 16, 8, [20], True, dict(BH=16)),  # 4 heads in a 16-head block
    ("decode-bk128-split", 1, 1, 4, 128, 128, 300, 200, [1000], True, dict(bps=1, BK=128, hole=(150, 200))),
    # scale rows padded to 8 bytes, read as one vector per entry (the S8 plan; whole-head tiles)
    ("decode-s8-split", 2, 1, 4, 128, 128, 40, 24, [5, 300], True, dict(bps=1, DC=128, S8=1)),
    ("prefill-s8-dh256", 1, 2, 2, 256, 64, 40, 24, [90], True, dict(DC=256, S8=1)),
]
SEED = 4321


def _inputs(B, S, H, Dh, W, Nc, n_comp, positions, fp8, seed, hole=None, dr=64):
    """q, the three caches (stored layout, ``dr`` RoPE dims if FP8) and index lists like the model's: window lists
    from ``attention.window_indices``, then random compressed ids with -1 holes (list slots ``hole[0]:hole[1]`` all
    -1)."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
    q = f32(rng.standard_normal((B, S, H, Dh)) * 2)
    caches = [f32(rng.standard_normal((B, n, Dh)) * np.exp2(rng.integers(-2, 3, (B, n, 1)))) for n in (W, S, Nc)]
    comp = None
    if n_comp:
        comp = rng.integers(0, Nc, (B, S, n_comp)) + W + S
        comp = np.where(rng.random((B, S, n_comp)) < 0.3, -1, comp).astype(np.int32)
    sink = jnp.asarray(rng.standard_normal(H) * 2, jnp.float32)
    q, caches, idx = _device_inputs()(q, caches, np.asarray(positions, np.int32), comp, S=S, W=W,
                                      nope=Dh - dr if fp8 else None, hole=hole)
    return q, caches, idx, sink


@functools.cache
def _device_inputs():
    """The device part of :func:`_inputs` as one jitted program per case (run op by op it compiled ~100 small
    programs per case: CI time): bf16 values (FP8 cache layout with ``nope`` FP8 dims), the index lists."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.attention import window_indices
    from dsv4_jax.modeling.quant import encode_fp8_cache

    @functools.partial(jax.jit, static_argnames=("S", "W", "nope", "hole"))
    def build(q, caches, pos, comp, S, W, nope, hole):
        q = q.astype(jnp.bfloat16)
        caches = [c.astype(jnp.bfloat16) for c in caches]
        if nope is not None:
            caches = [encode_fp8_cache(c, nope) for c in caches]
        idx = window_indices(pos, S, W)  # [B,S,W]
        if comp is not None:
            idx = jnp.concatenate([idx, comp], -1)
        if hole is not None:
            idx = idx.at[..., hole[0]:hole[1]].set(-1)
        return q, caches, idx

    return build


def _reference(q, caches, idx, sink, Nc):
    import jax.numpy as jnp

    from dsv4_jax.kernels.sparse_attention import sparse_attention_reference
    from dsv4_jax.modeling.quant import cache_values

    ring, chunk, comp = caches
    Dh = q.shape[-1]
    ref = sparse_attention_reference(q, ring, chunk, comp if Nc else None, idx, sink, Dh**-0.5, jnp.bfloat16)
    # the bound's sum_j (p_j / l) |v_j| in float64, from the exact values
    kv = np.concatenate([np.asarray(cache_values(c, jnp.float32), np.float64) for c in caches[:3 if Nc else 2]], 1)
    qq = np.asarray(q, np.float64)
    ii = np.asarray(idx)
    B, S, H, _ = q.shape
    mag = np.zeros((B, S, H, Dh))
    for b in range(B):
        for s in range(S):
            sel = ii[b, s][ii[b, s] >= 0]
            v = kv[b, sel]  # [k, Dh]
            sc = qq[b, s] @ v.T * Dh**-0.5  # [H, k]
            e = np.exp(sc - sc.max(1, keepdims=True))
            den = e.sum(1) + np.exp(np.asarray(sink, np.float64) - sc.max(1))
            mag[b, s] = (e / den[:, None]) @ np.abs(v)
    return np.asarray(ref.astype(jnp.float32)), mag


def _arrays(i, q, caches, idx, sink, fp8):
    out = {f"q{i}": np.asarray(q).view(np.uint16), f"idx{i}": np.asarray(idx), f"sink{i}": np.asarray(sink)}
    for j, c in enumerate(caches):
        if fp8:
            out[f"c{i}_{j}_0"] = np.asarray(c.codes).view(np.uint8)
            out[f"c{i}_{j}_1"] = np.asarray(c.scales)
            out[f"c{i}_{j}_2"] = np.asarray(c.rope).view(np.uint16)
        else:
            out[f"c{i}_{j}_0"] = np.asarray(c).view(np.uint16)
    return out


def _plan(case, K, target="cpu", **over):
    """The case's launch plan: :func:`plan` for its rows and K, with its overrides and ``over``."""
    from dsv4_jax.kernels.sparse_attention import plan

    _, B, S, H, Dh, *_, kw = case
    p = plan(H, Dh, target, rows=B * S, K=K, bps=kw.get("bps"), tiles={k: kw[k] for k in ("BK", "S8") if k in kw})
    p.update({k: v for k, v in kw.items() if k in p}, **over)
    return p


def _interpret_main(path: str) -> None:
    """Subprocess body: the kernel under the interpreter on every case stored in ``path``."""
    import torch

    from dsv4_jax.kernels.sparse_attention_torch import run_torch

    z = dict(np.load(path))
    res = {}
    for i, case in enumerate(CASES):
        _, _, _, H, Dh, W, Nc, _, _, fp8, kw = case
        t = lambda k: torch.from_numpy(z[k].copy())  # noqa: E731
        dummy = torch.zeros(1, dtype=torch.uint8)
        srcs = []
        for j in range(3):
            if f"c{i}_{j}_0" not in z:  # no compressed source: a never-indexed one-row dummy of the ring
                srcs.append(srcs[0])
            elif fp8:
                sc = t(f"c{i}_{j}_1")
                if kw.get("S8"):  # scale rows padded to 8 bytes (with a byte no dim uses)
                    sc = torch.cat([sc, torch.full((*sc.shape[:-1], 8 - sc.shape[-1]), 127, dtype=sc.dtype)], -1)
                srcs.append((t(f"c{i}_{j}_0").view(torch.float8_e4m3fn), sc, t(f"c{i}_{j}_2").view(torch.bfloat16)))
            else:
                srcs.append((t(f"c{i}_{j}_0").view(torch.bfloat16), dummy, dummy))
        idx = t(f"idx{i}")
        p = _plan(case, idx.shape[-1])
        o = run_torch(t(f"q{i}").view(torch.bfloat16), srcs, fp8, idx, t(f"sink{i}"), W, max(Nc, 1), Dh**-0.5, p)
        res[f"o{i}"] = o.numpy()
        res[f"split{i}"] = np.int64(p["SPLIT"])
        if p["SPLIT"] > 1:  # the merge's inverse RoPE epilogue on the same workspace
            rope = (t(f"cos{i}"), t(f"sin{i}"))
            res[f"orope{i}"] = run_torch(t(f"q{i}").view(torch.bfloat16), srcs, fp8, idx, t(f"sink{i}"), W,
                                         max(Nc, 1), Dh**-0.5, p, rope=rope).numpy()
    np.savez(path + ".out.npz", **res)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays, cases = {}, []
    for i, (_, B, S, H, Dh, W, Nc, n_comp, positions, fp8, kw) in enumerate(CASES):
        q, caches, idx, sink = _inputs(B, S, H, Dh, W, Nc, n_comp, positions, fp8, SEED + i, kw.get("hole"),
                                       kw.get("dr", 64))
        arrays.update(_arrays(i, q, caches if Nc else caches[:2], idx, sink, fp8))
        arrays.update(_rope_tables(i, B * S, kw.get("dr", 64)))
        cases.append(_reference(q, caches, idx, sink, Nc))
    return cases, triton_shim.interpret(__file__, arrays, tmp_path_factory.mktemp("sparse_attn"))


def _rope_tables(i: int, R: int, rd: int) -> dict:
    """fp32 cos/sin ``[R, rd/2]`` of random angles for case ``i``'s rows (the merge's inverse RoPE)."""
    ang = np.random.default_rng(SEED + 50 + i).uniform(-np.pi, np.pi, (R, rd // 2))
    return {f"cos{i}": np.cos(ang).astype(np.float32), f"sin{i}": np.sin(ang).astype(np.float32)}


def test_interpreter_merge_applies_the_inverse_rope(interpreted):
    """On every split case the merge with ``rope`` gives, bit for bit, ``layers.apply_rope(bf16(o), cos, sin,
    inverse=True)`` of its own output without it (the model's former separate step), and changes the RoPE dims."""
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import apply_rope

    _, out = interpreted
    done = 0
    for i, case in enumerate(CASES):
        if f"orope{i}" not in out:
            continue
        _, B, S, H, Dh, *_, kw = case
        tabs = _rope_tables(i, B * S, kw.get("dr", 64))
        cos, sin = (jnp.asarray(tabs[f"{k}{i}"]).reshape(B, S, 1, -1) for k in ("cos", "sin"))
        o = jnp.asarray(out[f"o{i}"]).astype(jnp.bfloat16)
        want = np.asarray(apply_rope(o, cos, sin, inverse=True).astype(jnp.float32))
        got = out[f"orope{i}"]
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=case[0])
        assert (got != np.asarray(o.astype(jnp.float32))).any(), f"{case[0]}: the RoPE changed nothing"
        done += 1
    assert done >= 5, done


def _close(got, ref, mag, what, ulps=0.5):
    """``ulps``: bf16 ulps of the output allowed for roundings (the reference's own; a bf16 kernel output adds one
    more half)."""
    assert np.isfinite(got).all(), f"{what}: non-finite output"
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(ref), 2.0**-126))) - 7)
    bound = 2.0**-8 * mag + ulps * ulp + 2.0**-12 * mag
    err = np.abs(got - ref)
    assert (err <= bound).all(), f"{what}: error {np.max(err / bound):.3g}x the bound"
    return float(np.max(err / bound))


@pytest.mark.parametrize("i", range(len(CASES)), ids=[c[0] for c in CASES])
def test_interpreter_matches_reference(interpreted, i):
    cases, out = interpreted
    ref, mag = cases[i]
    _close(out[f"o{i}"], ref, mag, CASES[i][0])
    if "split" in CASES[i][0]:  # the cases meant for the split path took it
        assert out[f"split{i}"] > 1, f"{CASES[i][0]}: ran unsplit"


def test_reference_path_unchanged_on_cpu():
    """``sparse_attention(..., kernels="auto")`` on a CPU is the reference, bit for bit."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.sparse_attention import sparse_attention, sparse_attention_reference

    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU dispatch")
    _, B, S, H, Dh, W, Nc, n_comp, positions, fp8, _ = CASES[0]
    q, (ring, chunk, comp), idx, sink = _inputs(B, S, H, Dh, W, Nc, n_comp, positions, fp8, 1)
    a = sparse_attention(q, ring, chunk, comp, idx, sink, Dh**-0.5, jnp.bfloat16, kernels="auto")
    b = sparse_attention_reference(q, ring, chunk, comp, idx, sink, Dh**-0.5, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize("route,K,rows,want", [("jax-triton", 8320, 32, True), ("jax-triton", 4096, 1, True),
                                               ("jax-triton", 640, 32, True), ("jax-triton", 1152, 8192, True),
                                               ("jax-triton", 640, 65, True), ("xla", 8320, 32, False),
                                               ("xla", 640, 8192, False)],
                         ids=["hca-1m-b32", "threshold-b1", "csa", "prefill-rows", "prefill-65-rows", "xla-route",
                              "xla-route-prefill"])
def test_auto_takes_the_kernel_only_where_measured_faster(monkeypatch, route, K, rows, want):
    """``kernels="auto"`` on one GPU, through jax-triton only: the kernel for every index list at decode row counts
    (CSA's 640-entry lists too: the decode step timed faster with them, ``AUTO_MIN_LIST``) and for every prefill row
    count (more than 64 rows); ``"reference"`` never; with ``PREFILL_AUTO`` off prefill rows
    keep the reference; and on a CPU backend ``"auto"`` never (the real ``use_triton`` says no there)."""
    from dsv4_jax.kernels import sparse_attention as sa

    assert not sa.use_kernel("auto", 32, 8320) or sa.use_triton("auto"), "auto took the kernel where Triton cannot run"
    monkeypatch.setattr(sa, "use_triton", lambda kernels: True)
    monkeypatch.setattr(sa, "single_device", lambda: True)
    monkeypatch.setattr(sa, "route_for", lambda tiled: route if tiled else "xla")
    assert sa.use_kernel("auto", rows, K) is want
    assert sa.use_kernel("reference", rows, K) is False
    monkeypatch.setattr(sa, "PREFILL_AUTO", False)
    assert sa.use_kernel("auto", rows, K) is (want and rows <= sa.AUTO_MAX_ROWS)
    monkeypatch.setattr(sa, "PREFILL_AUTO", True)
    monkeypatch.setattr(sa, "XLA_ROUTE_MAX_LIST", 1024)  # short lists through XLA's route: the kernel on either route
    assert sa.use_kernel("auto", rows, K) is (want or (K <= 1024 and (rows <= sa.AUTO_MAX_ROWS or sa.PREFILL_AUTO)))
    assert sa._tiled(K) is (K > 1024)
    monkeypatch.setattr(sa, "XLA_ROUTE_MAX_LIST", 0)
    monkeypatch.setattr(sa, "single_device", lambda: False)
    assert sa.use_kernel("auto", rows, K) is False  # a multi-device mesh keeps the XLA path


def test_short_lists_launch_on_the_route_asked(monkeypatch):
    """``XLA_ROUTE_MAX_LIST``: the kernel launches over lists up to that length as an untiled kernel (XLA's route:
    inside the step's CUDA graph), longer ones as before; the default (0) changes nothing. Checked on the launcher's
    ``tiled`` argument (a stand-in ``triton_call`` records it and returns zeros of the asked shapes)."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels import sparse_attention as sa

    seen = []

    def fake_call(*args, tiled=False, out_shape=None, **kw):
        seen.append((kw["kernel"].__name__, tiled))
        outs = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
        z = [jnp.zeros(o.shape, o.dtype) for o in outs]
        return z if isinstance(out_shape, (list, tuple)) else z[0]

    monkeypatch.setattr(sa, "triton_call", fake_call)
    B, S, H, Dh, W, K = 1, 1, 16, 128, 8, 24
    q = jnp.zeros((B, S, H, Dh), jnp.bfloat16)
    ring, chunk = jnp.zeros((B, W, Dh), jnp.bfloat16), jnp.zeros((B, S, Dh), jnp.bfloat16)
    idx = jnp.zeros((B, S, K), jnp.int32)
    sink = jnp.zeros((H,), jnp.float32)
    p = sa.plan(H, Dh, target="cpu", rows=B * S, K=K)
    for limit, tiled in ((0, True), (K, False), (K - 1, True)):
        monkeypatch.setattr(sa, "XLA_ROUTE_MAX_LIST", limit)
        seen.clear()
        jax.eval_shape(lambda a: sa.sparse_attention_triton(a, ring, chunk, None, idx, sink, Dh**-0.5, p), q)
        assert seen and all(t is tiled for name, t in seen if name == "_sparse_attn_kernel"), (limit, seen)


@pytest.mark.parametrize("case", [(2, 10, 4, 128, 128, 16, 8, [20, 300], True), (1, 7, 2, 128, 128, 0, 0, [5], False)],
                         ids=["fp8-compressed", "plain-window-only"])
def test_reference_in_row_blocks_is_bit_exact(case):
    """Long chunks: the reference in blocks of query rows (a budget that forces 3-row blocks, the last one padded)
    gives the one-block result bit for bit (every row depends on its own q and index list only)."""
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.sparse_attention import rows_per_block, sparse_attention_reference

    B, S, H, Dh, W, Nc, n_comp, positions, fp8 = case
    q, (ring, chunk, comp), idx, sink = _inputs(B, S, H, Dh, W, Nc, n_comp, positions, fp8, 5)
    comp = comp if Nc else None
    K = idx.shape[-1]
    budget = 3 * B * K * (6 * Dh + 8 * H)
    assert rows_per_block(B, S, H, Dh, K, budget) == 3 and S % 3, "the case must give several, uneven blocks"
    f = jax.jit(sparse_attention_reference, static_argnums=(6, 7, 8))
    a = f(q, ring, chunk, comp, idx, sink, Dh**-0.5, jnp.bfloat16, budget)
    b = f(q, ring, chunk, comp, idx, sink, Dh**-0.5, jnp.bfloat16, 1 << 40)
    np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


# ------------------------------------------------------------------------------------------------ GPU
_POS32 = [3 + 97 * k for k in range(32)]  # 32 decode rows, windows full or not
GPU_CASES = [  # V4-Flash: 64 heads, head_dim 512, window 128; CSA: top-512 compressed (K 640), HCA at 1M: 8192 (K 8320)
    ("flash-decode", 4, 1, 64, 512, 128, 1024, 512, [3, 130, 4000, 4095], True, {}),
    ("flash-prefill", 1, 256, 64, 512, 128, 64, 512, [1000], True, {}),
    ("csa-decode-b1", 1, 1, 64, 512, 128, 2048, 512, [8000], True, {}),
    ("csa-decode-b32", 32, 1, 64, 512, 128, 2048, 512, _POS32, True, {}),
    ("hca-1m-decode-b1", 1, 1, 64, 512, 128, 8192, 8192, [1 << 20], True, {}),
    ("hca-1m-decode-b32", 32, 1, 64, 512, 128, 8192, 8192, _POS32, True, {}),
    # a long list (> LONG_LIST: 128-entry blocks on the jax-triton route) that is not a multiple of the block
    ("long-list-ragged", 2, 1, 64, 512, 128, 2048, 1200, [5000, 8000], True, {}),
    ("flash-decode-unsplit", 4, 1, 64, 512, 128, 1024, 512, [3, 130, 4000, 4095], True, dict(bps=1 << 10)),
    # the tiny golden model's prefill (4 heads of 128 dims, window 16, top-4 compressed): its all-position golden
    # test failed on an H200 with the 4-head plan; 4 heads in a padded 16-head block (the plan now), and BH = 4
    ("tiny-prefill-padded", 1, 37, 4, 128, 16, 9, 4, [0], True, {}),
    ("tiny-prefill-bh4", 1, 37, 4, 128, 16, 9, 4, [0], True, dict(BH=4)),
    # one device's heads on a mesh (modeling.attention's per-device layer): V4-Flash on 2 and 8 GPUs, V4-Pro on 8
    ("flash-2gpu-decode-b1", 1, 1, 32, 512, 128, 2048, 512, [8000], True, {}),
    ("flash-2gpu-decode-b32", 32, 1, 32, 512, 128, 2048, 512, _POS32, True, {}),
    ("flash-8gpu-decode-b32", 32, 1, 8, 512, 128, 2048, 512, _POS32, True, {}),
    ("pro-8gpu-decode-b32", 32, 1, 16, 512, 128, 2048, 512, _POS32, True, {}),
    ("flash-2gpu-prefill", 1, 256, 32, 512, 128, 64, 512, [1000], True, {}),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c[0])
def test_gpu_matches_reference(case):
    """V4-Flash shapes inside jit, with the GPU's own plan (split index lists at decode) unless the case overrides
    it."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"sparse attention GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.kernels.sparse_attention import sparse_attention_triton

    _, B, S, H, Dh, W, Nc, n_comp, positions, fp8, kw = case
    q, caches, idx, sink = _inputs(B, S, H, Dh, W, Nc, n_comp, positions, fp8, SEED, kw.get("hole"))
    p = _plan(case, idx.shape[-1], target=None) if kw else None
    got = jax.jit(lambda *a: sparse_attention_triton(*a, Dh**-0.5, p))(q, *caches, idx, sink)
    ref, mag = _reference(q, caches, idx, sink, Nc)
    _close(np.asarray(got.astype(jnp.float32)), ref, mag, case[0], ulps=1.0)  # the kernel rounds to bf16 too


@pytest.mark.parametrize("case", [c for c in GPU_CASES if c[0] in ("flash-decode", "csa-decode-b32", "flash-prefill")],
                         ids=lambda c: c[0])
def test_gpu_merge_rope_matches_xla_rope(monkeypatch, case):
    """The merge's inverse RoPE (``out_rope``, ``MERGE_ROPE`` patched on) against the same kernel's output rotated
    by XLA (``layers.apply_rope(..., inverse=True)``): within one bf16 ulp (either side may contract the products into
    FMAs), >= 97 % bit for bit; the prefill case runs unsplit, where XLA rotates on both sides."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"sparse attention GPU test: {why}")
    import jax
    import jax.numpy as jnp
    from test_kernels_fp8 import _bf16_ulp

    import dsv4_jax.kernels.sparse_attention as sa
    from dsv4_jax.kernels.sparse_attention import sparse_attention_triton
    from dsv4_jax.modeling.layers import apply_rope

    monkeypatch.setattr(sa, "MERGE_ROPE", True)
    _, B, S, H, Dh, W, Nc, n_comp, positions, fp8, kw = case
    q, caches, idx, sink = _inputs(B, S, H, Dh, W, Nc, n_comp, positions, fp8, SEED, kw.get("hole"))
    tabs = _rope_tables(0, B * S, 64)
    cos, sin = (jnp.asarray(tabs[f"{k}0"]).reshape(B, S, -1) for k in ("cos", "sin"))
    f = jax.jit(lambda *a: sparse_attention_triton(*a, Dh**-0.5, out_rope=(cos, sin)))
    got = np.asarray(f(q, *caches, idx, sink).astype(jnp.float32))
    plain = jax.jit(lambda *a: sparse_attention_triton(*a, Dh**-0.5))(q, *caches, idx, sink)
    want = np.asarray(apply_rope(plain, cos[:, :, None], sin[:, :, None], inverse=True).astype(jnp.float32))
    assert (np.abs(got - want) <= _bf16_ulp(want) + 2.0**-133).all(), f"{case[0]}: beyond one bf16 ulp"
    assert np.mean(got.view(np.uint32) == want.view(np.uint32)) >= 0.97, f"{case[0]}: too few equal bits"


if __name__ == "__main__":  # the interpreter subprocess of `interpreted`
    _interpret_main(sys.argv[1])

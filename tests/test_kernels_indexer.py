"""The indexer's scoring kernels against the reference arithmetic (``indexer._totals`` over the decoded FP4 cache,
masked) and the reference top-k: the decode rows' kernel (``kernels/indexer.py``: ``_indexer_score_kernel``) and the
prefill rows' kernel (``kernels/indexer_prefill.py``: ``_prefill_score_kernel``, over the keys decoded to bf16).

CPU: the kernels under Triton's interpreter in a subprocess, launched directly on torch tensors (their totals) and
through the jax dispatchers ``indexer_topk(..., kernels="triton")`` and ``indexer_topk_blocked(..., radix=True,
kernel=True)`` with ``tests/triton_shim.py`` (their ids). GPU: the jitted launchers at V4-Flash indexer shapes
(skipped without a GPU or jax-triton).

Oracles and tolerances: queries and keys are FP4-snapped as in reference numerics, so every score is an exact fp32
sum and equals the reference's bit for bit; the one reordering is the fp32 sum over heads, which can move a total by
one bf16 ulp. So: every total within one bf16 ulp of its value (2**-7 relative), at least 99 % bit for bit, the
invisible entries exactly -inf; the ids equal the reference's on every row whose totals are all bit for bit (those
rows are at least 90 % of them). Ties are built in (duplicated keys give equal totals): top-k must list them lowest id
first, as the reference.
"""

from __future__ import annotations

import functools
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
from dsv4_jax.kernels import indexer_prefill as ixp  # noqa: E402
from dsv4_jax.kernels import triton_unavailable  # noqa: E402
from dsv4_jax.modeling.quant import Fp4Tensor, cache_values, encode_fp4_cache, fp4_simulate  # noqa: E402

SEED = 777
BF16_ULP = 2.0**-7
HW_SCALE = 128**-0.5 * 64**-0.5  # the model's head-weight scale at V4's indexer (Di 128, Hi 64), applied in-kernel
# (B, S, heads, head dim, entries, positions [B, S], k): decode rows with a partly visible cache, speculative verify
# rows at 3 positions (heads padded from 20 to 32), one row seeing nothing, and k above the entry count; the last
# case as prefill rows (the prefill kernel's CPU plan puts 2 rows in a program): padded heads, two batch rows, rows
# of one program that see different counts, a program whose rows see nothing, entries past the last block's end.
CASES = [(2, 1, 4, 128, 100, [[50], [399]], 8), (1, 3, 20, 64, 70, [[198, 199, 203]], 16),
         (2, 2, 16, 128, 40, [[2, 7], [150, 160]], 64), (2, 4, 20, 64, 90, [[1, 70, 71, 300], [2, 3, 250, 359]], 8)]


def _case(B, S, Hi, Di, Nc, t, seed):
    """Snapped queries, signed head weights, an FP4 cache with duplicated entries (ties)."""
    rng = np.random.default_rng(seed)
    q = fp4_simulate(jnp.asarray(rng.standard_normal((B, S, Hi, Di)), jnp.bfloat16), 32).astype(jnp.bfloat16)
    hw = jnp.asarray(rng.standard_normal((B, S, Hi)) * 0.1, jnp.bfloat16)
    kv = rng.standard_normal((B, Nc, Di)).astype(np.float32) * np.exp2(rng.integers(-3, 3, (B, Nc, 1)))
    kv[:, 10::7] = kv[:, 3:4]  # entries 10, 17, 24, ... equal entry 3: equal totals
    keys = encode_fp4_cache(jnp.asarray(kv, jnp.bfloat16))
    return q, hw, keys, jnp.asarray(t, jnp.int32)


def _ref_totals(q, hw, keys, t):
    tot = np.asarray(ix._totals(q, hw, cache_values(keys, q.dtype)))  # [B,S,Nc]
    visible = np.arange(tot.shape[-1])[None, None, :] < ((np.asarray(t) + 1) // 4)[..., None]
    return np.where(visible, tot, -np.inf)


def _check(got, ref, ids, ids_ref, what):
    fin = np.isfinite(ref)
    assert (np.isneginf(got) == ~fin).all(), f"{what}: invisible entries not -inf (or visible ones -inf)"
    err = np.abs(got[fin] - ref[fin])
    assert (err <= BF16_ULP * np.abs(ref[fin]) + 1e-30).all(), f"{what}: a total beyond one bf16 ulp"
    assert (err == 0).mean() >= 0.99, f"{what}: {(err == 0).mean():.3f} of totals bit for bit"
    exact = np.all((got == ref) | ~fin, axis=-1)  # [B,S] rows whose totals are all the reference's
    assert exact.mean() >= 0.9, f"{what}: {exact.mean():.2f} of rows bit for bit"
    assert (ids[exact] == ids_ref[exact]).all(), f"{what}: ids differ on rows with the reference's totals"


# ---------------------------------------------------------------------------------------------- interpreter
def _interpret_main(path: str) -> None:
    """Subprocess body: each case's totals by a direct launch and ids through the jax dispatcher (shim)."""
    triton_shim.install("cpu")  # fixes the interpreter's bf16 dot and routes the jax launches through it
    import torch

    z = dict(np.load(path))
    res = {}
    for c in range(int(z["n"])):
        g = lambda n, c=c: z[f"{c}_{n}"]  # noqa: E731
        B, S, Hi, Di = g("q").shape[:4]
        q16 = torch.from_numpy(g("q").view(np.uint16).reshape(B * S, Hi, Di).copy()).view(torch.bfloat16)
        hw16 = torch.from_numpy(g("hw").view(np.uint16).reshape(B * S, Hi).copy()).view(torch.bfloat16)
        lim = torch.from_numpy(((g("t") + 1) // 4).reshape(-1).astype(np.int32))
        tot = ix.totals_torch(q16, hw16, torch.from_numpy(g("packed")), torch.from_numpy(g("scale")), lim, S)
        res[f"{c}_tot"] = tot.numpy().reshape(B, S, -1)
        tot = ix.totals_torch(q16, hw16, torch.from_numpy(g("packed")), torch.from_numpy(g("scale")), lim, S, {"BF": 1})
        res[f"{c}_tot_bf"] = tot.numpy().reshape(B, S, -1)  # the keys through bf16 bit patterns: the same totals
        hws = np.asarray(ix.scale_head_weights(jnp.asarray(g("hw").view(ml_dtypes.bfloat16)), HW_SCALE))
        hws16 = torch.from_numpy(hws.view(np.uint16).reshape(B * S, Hi).copy()).view(torch.bfloat16)
        packed, scale = torch.from_numpy(g("packed")), torch.from_numpy(g("scale"))
        res[f"{c}_tot_s"] = ix.totals_torch(q16, hw16, packed, scale, lim, S, hw_scale=HW_SCALE).numpy()
        res[f"{c}_tot_s_ref"] = ix.totals_torch(q16, hws16, packed, scale, lim, S).numpy()  # scaled by XLA first
        q = jnp.asarray(g("q").view(ml_dtypes.bfloat16))
        hw = jnp.asarray(g("hw").view(ml_dtypes.bfloat16))
        keys = Fp4Tensor(packed=jnp.asarray(g("packed")), scale=jnp.asarray(g("scale")))
        kv = np.asarray(cache_values(keys, jnp.bfloat16)).view(np.uint16)
        tot = ixp.prefill_totals_torch(q16, hw16, torch.from_numpy(kv.copy()).view(torch.bfloat16), lim, S)
        res[f"{c}_ptot"] = tot.numpy().reshape(B, S, -1)
        run = jax.jit(functools.partial(ix.indexer_topk, k=int(g("k")), kernels="triton"))
        res[f"{c}_ids"] = np.asarray(run(q, hw, keys, jnp.asarray(g("t"))))
        run = jax.jit(functools.partial(ix.indexer_topk, k=int(g("k")), kernels="triton", hw_scale=HW_SCALE))
        res[f"{c}_ids_s"] = np.asarray(run(q, hw, keys, jnp.asarray(g("t"))))
        run = jax.jit(functools.partial(ix.indexer_topk_blocked, k=int(g("k")), radix=True, kernel=True))
        res[f"{c}_pids"] = np.asarray(run(q, hw, keys, jnp.asarray(g("t"))))
    for name in ("_indexer_score_kernel", "_prefill_score_kernel", "_sort_kernel"):
        res[name] = np.array(sum(r["kernel"] == name for r in triton_shim.LAUNCHES))
    np.savez(path + ".out.npz", **res)


def test_interpreter_matches_reference(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    arrays, cases = {"n": len(CASES)}, []
    for c, (B, S, Hi, Di, Nc, t, k) in enumerate(CASES):
        q, hw, keys, tt = _case(B, S, Hi, Di, Nc, t, SEED + c)
        arrays.update({f"{c}_q": np.asarray(q).view(np.uint16), f"{c}_hw": np.asarray(hw).view(np.uint16),
                       f"{c}_packed": np.asarray(keys.packed), f"{c}_scale": np.asarray(keys.scale),
                       f"{c}_t": np.asarray(tt), f"{c}_k": np.int32(k)})
        cases.append((q, hw, keys, tt, k))
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    # per case: the decode dispatcher twice (with and without hw_scale; short caches: the sort top-k), the prefill once
    for name, n in (("_indexer_score_kernel", 2), ("_prefill_score_kernel", 1), ("_sort_kernel", 2)):
        assert int(out[name]) == n * len(CASES), f"the dispatchers did not launch {name} {n}x per case"
    for c, (q, hw, keys, tt, k) in enumerate(cases):
        ids_ref = np.asarray(ix.indexer_topk_reference(q, hw, keys, tt, k))
        assert out[f"{c}_ids"].shape == ids_ref.shape == out[f"{c}_pids"].shape
        ref = _ref_totals(q, hw, keys, tt)
        _check(out[f"{c}_tot"], ref, out[f"{c}_ids"], ids_ref, f"case {c}")
        same = (out[f"{c}_tot_bf"] == out[f"{c}_tot"]) | (np.isnan(out[f"{c}_tot"]) & np.isnan(out[f"{c}_tot_bf"]))
        assert same.all(), f"case {c}: the BF key decode changed {int((~same).sum())} totals"
        _check(out[f"{c}_ptot"], ref, out[f"{c}_pids"], ids_ref, f"case {c}, prefill kernel")
        same = (out[f"{c}_tot_s"] == out[f"{c}_tot_s_ref"]) | np.isnan(out[f"{c}_tot_s_ref"])
        assert same.all(), f"case {c}: the in-kernel head-weight scale changed {int((~same).sum())} totals"
        hws = ix.scale_head_weights(hw, HW_SCALE)
        ref_s = _ref_totals(q, hws, keys, tt)
        _check(out[f"{c}_tot_s"].reshape(ref_s.shape), ref_s, out[f"{c}_ids_s"],
               np.asarray(ix.indexer_topk_reference(q, hws, keys, tt, k)), f"case {c}, hw_scale")
    # the ties were exercised: some row's reference list holds entry 3 and a duplicate, 3 first
    lists = [np.asarray(ix.indexer_topk_reference(*cs)).reshape(-1, min(cs[4], cs[2].packed.shape[1]))
             for cs in cases]
    assert any(3 in r.tolist() and 10 in r.tolist() for L in lists for r in L)


def test_bad_shapes_are_named():
    q, hw, keys, t = _case(1, 1, 4, 128, 16, [[40]], SEED)
    with pytest.raises(ValueError, match=r"keys\.scale has shape"):
        ix._check_score(q, hw, Fp4Tensor(packed=keys.packed, scale=keys.scale[..., :2]))
    with pytest.raises(ValueError, match=r"hw has shape"):
        ix._check_score(q, hw[..., :3], keys)
    kv = cache_values(keys, jnp.bfloat16)
    with pytest.raises(ValueError, match=r"prefill kernel: kv is float32\[1, 16, 128\], expected bf16\[1, 16, 128\]"):
        ixp.prefill_totals_triton(q, hw, keys, t, kv.astype(jnp.float32))


def test_cpu_and_auto_keep_the_blocked_reference(monkeypatch):
    """Without ``kernels="triton"`` (and on a CPU backend) the dispatcher is the blocked XLA path, bit for bit."""
    q, hw, keys, t = _case(2, 1, 4, 128, 100, [[50], [399]], SEED)
    want = np.asarray(ix.indexer_topk_blocked(q, hw, keys, t, 8))
    for mode in ("reference", "auto"):
        assert (np.asarray(ix.indexer_topk(q, hw, keys, t, 8, kernels=mode)) == want).all()


def test_auto_takes_the_kernel_over_long_caches_only(monkeypatch):
    """Where Triton runs on one device, ``"auto"`` scores with the kernel from :data:`AUTO_MIN_ENTRIES` compressed
    entries on (measured faster there on an H200; a tie at 1,024 with the radix top-k) and below that only with
    :data:`SHORT_AUTO` (the one-program sort; on: faster on an H100), ``"triton"`` always, ``"reference"`` never."""
    monkeypatch.setattr(ix, "use_triton", lambda kernels: kernels != "reference")
    monkeypatch.setattr(ix, "use_opt_in_triton", lambda kernels: kernels == "triton")
    monkeypatch.setattr(ix, "single_device", lambda: True)
    monkeypatch.setattr(ix, "SHORT_AUTO", False)
    n = ix.AUTO_MIN_ENTRIES
    assert [ix.score_kernel_on("auto", m) for m in (1024, n - 1, n, 262144)] == [False, False, True, True]
    assert ix.score_kernel_on("triton", 16) and not ix.score_kernel_on("reference", 262144)
    monkeypatch.setattr(ix, "SHORT_AUTO", True)  # short caches too: the kernel and the one-program sort
    assert [ix.score_kernel_on("auto", m) for m in (1024, n - 1, n)] == [True] * 3
    monkeypatch.setattr(ix, "single_device", lambda: False)  # a mesh: the XLA path, which GSPMD partitions
    assert not ix.score_kernel_on("auto", 262144) and not ix.score_kernel_on("auto", 1024)


def test_decode_rows_never_take_the_prefill_kernel(monkeypatch):
    """Rows up to ``MAX_KERNEL_ROWS`` (decode, speculative verify) below the decode kernel's cache size keep XLA's
    single block: the prefill kernel's 2-row x 2,048-entry programs would be a handful (one at batch 1 over a 4K
    cache: 39 us per call on an H200); more rows take it."""
    seen = []
    monkeypatch.setattr(ix, "prefill_radix_on", lambda kernels: True)
    monkeypatch.setattr(ix, "prefill_score_on", lambda kernels: True)
    monkeypatch.setattr(ix, "score_kernel_on", lambda kernels, n: False)
    monkeypatch.setattr(ix, "indexer_topk_blocked", lambda *a, radix, kernel: seen.append((radix, kernel)))
    for B, S in [(1, 1), (32, 1), (32, 2), (2, ix.MAX_KERNEL_ROWS // 2), (1, ix.MAX_KERNEL_ROWS + 1), (2, 200)]:
        q, hw, keys, t = _case(B, S, 4, 64, 40, np.full((B, S), 200, np.int32), SEED)
        ix.indexer_topk(q, hw, keys, t, 8, kernels="auto")
    assert seen == [(True, False)] * 4 + [(True, True)] * 2


def test_prefill_radix_rule(monkeypatch):
    """The prefill rows' radix selection: ``"triton"`` takes it; ``"auto"`` where Triton runs on one device while
    ``PREFILL_RADIX_AUTO`` is on (measured faster on an H200); ``"reference"`` never."""
    monkeypatch.setattr(ix, "use_triton", lambda kernels: kernels != "reference")
    monkeypatch.setattr(ix, "use_opt_in_triton", lambda kernels: kernels == "triton")
    monkeypatch.setattr(ix, "single_device", lambda: True)
    assert ix.prefill_radix_on("triton") and ix.prefill_radix_on("auto") and not ix.prefill_radix_on("reference")
    monkeypatch.setattr(ix, "single_device", lambda: False)
    assert not ix.prefill_radix_on("auto")
    monkeypatch.setattr(ix, "single_device", lambda: True)
    monkeypatch.setattr(ix, "PREFILL_RADIX_AUTO", False)
    assert not ix.prefill_radix_on("auto")


def test_prefill_plan_rows_divide_the_sequence(monkeypatch):
    """The prefill kernel's rows per program share one batch row: a power of two dividing the rows per batch row,
    also when the environment asks for more; an unknown key is refused, naming it."""
    monkeypatch.delenv("DSV4_INDEX_PREFILL_TILE", raising=False)
    assert [ixp.plan(64, s, "sm90")["RB"] for s in (8192, 1000, 999)] == [2, 2, 1]
    assert ixp.plan(20, 4, "cpu")["HP"] == 32
    monkeypatch.setenv("DSV4_INDEX_PREFILL_TILE", "RB=8,BLK=64")
    assert [(ixp.plan(64, s, "sm90")["RB"], ixp.plan(64, s, "sm90")["BLK"]) for s in (8192, 12)] == [(8, 64), (4, 64)]
    monkeypatch.setenv("DSV4_INDEX_PREFILL_TILE", "TR=1")
    with pytest.raises(ValueError, match="DSV4_INDEX_PREFILL_TILE='TR=1'"):
        ixp.plan(64, 8192, "sm90")


def test_bf16_key_decode_only_where_measured():
    """The decode scoring kernel's bf16 key decode (``BF``) is sm90's plan (timed and GPU-checked there); other
    targets and the interpreter keep the fp32 decode (the interpreter runs ``BF`` only where a test asks)."""
    assert ix.score_plan(64, 32, 262144, "sm90")["BF"] == 1
    for target in ("sm80", "gfx950", "gfx9", "cpu"):
        assert ix.score_plan(64, 32, 262144, target)["BF"] == 0, target


def test_tile_override_is_checked(monkeypatch):
    monkeypatch.setenv("DSV4_INDEX_TILE", "BLK=128,num_warps=8")
    p = ix.score_plan(64, 32, 262144, "sm90")
    assert (p["BLK"], p["num_warps"]) == (128, 8)
    monkeypatch.setenv("DSV4_INDEX_TILE", "TR=1")
    with pytest.raises(ValueError, match="DSV4_INDEX_TILE='TR=1'"):
        ix.score_plan(64, 32, 262144, "sm90")


def test_prefetch_only_on_nvidia(monkeypatch):
    """The scoring kernel's ``PF`` (L2 prefetches, PTX inline assembly) is refused by name off NVIDIA GPUs (the
    interpreter, AMD), taken on sm90; off by default."""
    assert ix.score_plan(64, 32, 262144, "sm90")["PF"] == 0
    monkeypatch.setenv("DSV4_INDEX_TILE", "PF=2")
    assert ix.score_plan(64, 32, 262144, "sm90")["PF"] == 2
    for target in ("cpu", "gfx950"):
        with pytest.raises(ValueError, match=f"PF=2 .*not {target}"):
            ix.score_plan(64, 32, 262144, target)


# ---------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(triton_unavailable() is not None, reason=f"indexer kernel: {triton_unavailable()}")


@gpu
@pytest.mark.parametrize("B,Nc", [(1, 2048), (32, 1024), (4, 16384)])
def test_gpu_matches_reference(B, Nc):
    """V4-Flash indexer (64 heads of 128, top-512) at decode: rows at different positions, one seeing a few entries."""
    t = np.linspace(20, 4 * Nc + 3, B).astype(np.int32)[:, None]  # [B, 1]
    q, hw, keys, tt = _case(B, 1, 64, 128, Nc, t, SEED + Nc)
    hw = (hw * 20).astype(jnp.bfloat16)  # about the raw weights_proj outputs' size; the kernel scales them (HW_SCALE)
    got = np.asarray(jax.jit(ix.indexer_totals_triton, static_argnums=4)(q, hw, keys, tt, HW_SCALE))
    run = jax.jit(functools.partial(ix.indexer_topk, k=512, kernels="triton", hw_scale=HW_SCALE))
    ids = np.asarray(run(q, hw, keys, tt))
    hws = ix.scale_head_weights(hw, HW_SCALE)  # the model's XLA form
    ids_ref = np.asarray(jax.jit(functools.partial(ix.indexer_topk_reference, k=512))(q, hws, keys, tt))
    _check(got, _ref_totals(q, hws, keys, tt), ids, ids_ref, f"B={B} Nc={Nc}")


@gpu
@pytest.mark.parametrize("pf", [1, 3])
def test_gpu_prefetch_changes_no_bit(monkeypatch, pf):
    """``PF`` asks L2 for lines and changes nothing else: the decode totals at 32 rows over 16K entries (rows at
    different positions, a few seeing almost nothing) equal the plan's without it, bit for bit."""
    from dsv4_jax.kernels import arch

    if not arch().startswith("sm"):
        pytest.skip("PF is PTX: NVIDIA GPUs only")
    B, Nc = 32, 16384
    t = np.linspace(20, 4 * Nc + 3, B).astype(np.int32)[:, None]
    q, hw, keys, tt = _case(B, 1, 64, 128, Nc, t, SEED + 17)
    run = lambda: np.asarray(jax.jit(ix.indexer_totals_triton)(q, hw, keys, tt))  # noqa: E731
    monkeypatch.delenv("DSV4_INDEX_TILE", raising=False)
    base = run()
    monkeypatch.setenv("DSV4_INDEX_TILE", f"PF={pf}")
    jax.clear_caches()  # the plan is read when the launch is traced
    got = run()
    assert np.array_equal(got, base), f"PF={pf}: totals differ"


@gpu
def test_gpu_prefill_kernel_matches_reference():
    """The prefill rows' kernel at V4-Flash's indexer: 512 consecutive positions of a 32K-token prompt over its 8,192
    entries (so the rows of a program see different counts), and 2 rows that see nothing; totals and the radix ids."""
    S, Nc = 512, 8192
    t = (4 * Nc - S + np.arange(S, dtype=np.int32))[None, :]  # [1, S]
    t[0, :2] = 2
    q, hw, keys, tt = _case(1, S, 64, 128, Nc, t, SEED + 5)
    got = np.asarray(jax.jit(ixp.prefill_totals_triton)(q, hw, keys, tt))
    ids = np.asarray(jax.jit(functools.partial(ix.indexer_topk_blocked, k=512, radix=True, kernel=True))(
        q, hw, keys, tt))
    ids_ref = np.asarray(jax.jit(functools.partial(ix.indexer_topk_reference, k=512))(q, hw, keys, tt))
    _check(got, _ref_totals(q, hw, keys, tt), ids, ids_ref, f"prefill S={S} Nc={Nc}")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_main(sys.argv[1])

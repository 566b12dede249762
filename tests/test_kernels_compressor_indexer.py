"""The compressor's decode-step kernel, indexer variant (``dsv4_jax/kernels/compressor_step.py``:
``_compress_step_indexer_kernel``: after RoPE the Hadamard butterflies, the bf16 rounding and the FP4 snap into the
``Fp4Tensor`` cache) against the XLA reference (``compress_projected(..., indexer=True)``).

CPU: the kernel under Triton's interpreter in a subprocess, directly and through ``compress`` with the jax launcher
(``tests/triton_shim.py``); GPU: the jitted launcher at V4-Flash's indexer shapes (skipped without a GPU). The states
and rows are those of ``test_kernels_compressor.py`` (its docstring); the tolerance is ``_check_fp4``'s
(``tests/compressor_cases.py``): bit for bit on the CPU, and the check fails on a swapped nibble order. The sm_90
compile check of this variant is in ``test_kernels_compressor.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402
from compressor_cases import (  # noqa: E402
    GPU_ENTRIES,
    IDX_ROWS,
    MIN_EXACT,
    N_ENTRIES,
    SEED,
    _cfg,
    _check_fp4,
    _cos_sin,
    _fp4_cache,
    _gpu_rows,
    _idx_numpy,
    _idx_reference,
    _idx_state,
    _idx_x_reference,
    _nibbles,
    _swap_nibbles,
    _weights,
    _written,
    _x_case,
    _x_weights,
)


def _interpret_indexer(z: dict, path: str) -> None:
    """Subprocess body of the indexer test: (1) the kernel through ``run_torch`` (``rope=None``); (2) the jax
    launcher under the shim through ``compress(..., indexer=True)`` (``kernels="triton"``) on the ``x`` case."""
    import torch

    import dsv4_jax.kernels.compressor_step as cs
    import dsv4_jax.modeling.compressor as comp

    a = {k[2:]: v for k, v in z.items() if k.startswith("0_")}
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items()}
    cfg = _cfg(a["norm"].shape[0], 64)
    cs.run_torch(cfg, t["norm"].to(torch.bfloat16), t["kv_new"], t["sc_new"], t["packed"], t["scale"], None,
                 t["kv_buf"], t["sc_buf"], t["pos"], t["n_new"], 4, t["cos"], t["sin"], t["ape"])
    out = {f"0_{k}": t[k].numpy() for k in ("packed", "scale", "kv_buf", "sc_buf")}
    triton_shim.install(target="cpu")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.modeling.layers import rope_freqs

    a = {k[2:]: v for k, v in z.items() if k.startswith("x_")}
    cfg = _cfg(a["norm"].shape[0], 64, "triton")
    w = _x_weights(a)
    step = jax.jit(lambda x, cache, kvb, scb, pos, nn: comp.compress(cfg, w, x, cache, kvb, scb, pos, nn, 4,
                                                                     rope_freqs(cfg, 4), indexer=True))
    res = step(jnp.asarray(a["x"], jnp.bfloat16), _fp4_cache(a), jnp.asarray(a["kv_buf"]), jnp.asarray(a["sc_buf"]),
               jnp.asarray(a["pos"]), jnp.asarray(a["n_new"]))
    names = [r["kernel"] for r in triton_shim.LAUNCHES]
    assert "_compress_step_indexer_kernel" in names, f"compress(indexer=True) did not launch the kernel: {names}"
    out.update({f"x_{k}": v for k, v in _idx_numpy(*res).items()})
    np.savez(path + ".out.npz", **out)


def test_interpreter_indexer_matches_reference(tmp_path):
    """The indexer variant (Hadamard, FP4 snap, ``Fp4Tensor`` cache) at d = 128 (64 RoPE dims), m = 4: the kernel
    directly and through ``compress``, bit for bit the XLA reference on the CPU (``_check_fp4``); the rows complete
    the first window (junk in the absent previous window's slots), later windows, the cache's last entry and one
    past it, others complete nothing or bring no token. And the check fails on a swapped nibble order."""
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    d = 128
    z = _idx_state(IDX_ROWS, d, N_ENTRIES, SEED + 20)
    z["cos"], z["sin"] = _cos_sin(_cfg(d, 64), 4, z["pos"])
    x = _x_case(4, IDX_ROWS, d, SEED + 30)
    x.update({k: v for k, v in _idx_state(IDX_ROWS, d, N_ENTRIES, SEED + 30).items() if k in ("packed", "scale")})
    for k in ("codes", "scales", "rope"):
        del x[k]
    arrays = {"indexer": np.ones(1), **{f"0_{k}": v for k, v in z.items()}, **{f"x_{k}": v for k, v in x.items()}}
    out = triton_shim.interpret(__file__, arrays, tmp_path)
    wr = _written(z["pos"], z["n_new"], 4, N_ENTRIES)
    assert wr[:, 0].any() and wr[:, -1].any() and np.any(z["pos"] // 4 >= N_ENTRIES), "cases missing"
    ref = _idx_reference(_cfg(d, 64), z)
    codes = _nibbles(ref["packed"][wr])
    assert all(np.any(np.isin(codes, c)) for c in ((0, 8), (1, 9), (7, 15), tuple(range(8, 16)))), \
        "the reference entries lack zero, subnormal, maximal or negative e2m1 codes"
    got = {k: out[f"0_{k}"] for k in ref}
    frac = _check_fp4(got, ref, wr, "run_torch indexer", min_exact=1.0)
    print(f"indexer: bit-exact fractions of the written entries {frac}")
    for min_exact in (1.0, MIN_EXACT):  # the check fails on the wrong nibble order, exact or with the GPU bounds
        with pytest.raises(AssertionError):
            _check_fp4(_swap_nibbles(got), ref, wr, "swapped nibbles", min_exact=min_exact)
    got = {k: out[f"x_{k}"] for k in ref}
    frac = _check_fp4(got, _idx_x_reference(x), wr, "compress indexer", min_exact=1.0)
    print(f"compress indexer: bit-exact fractions of the written entries {frac}")


# ---------------------------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("B", [1, 32])
def test_gpu_indexer_matches_reference(B):
    """The indexer variant at V4-Flash shapes (d = 128 = index_head_dim, 64 RoPE dims, m = 4, ``Fp4Tensor`` cache),
    batch 1 and 32: one step of the jitted launcher against the jitted XLA reference (``_check_fp4``'s bounds), then
    6 further steps of both on their own outputs, and the dispatcher's ``"auto"`` path equal to the launcher's."""
    from dsv4_jax.kernels import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        pytest.skip(f"compressor decode kernel (indexer) GPU test: {why}")
    import jax
    import jax.numpy as jnp

    from dsv4_jax.config import Config
    from dsv4_jax.kernels.compressor_step import compress_decode, compress_decode_reference, compress_decode_triton
    from dsv4_jax.modeling.layers import rope_cos_sin, rope_freqs

    cfg = Config.v4_flash(kernels="auto")
    m, d, freqs = 4, cfg.index_head_dim, rope_freqs(cfg, 4)
    z = _idx_state(_gpu_rows(m, B, SEED), d, GPU_ENTRIES, SEED + 7 + B)
    w = _weights(z)

    @jax.jit
    def kern(kvn, scn, cache, kvb, scb, pos, nn):
        cos, sin = rope_cos_sin(freqs, (pos // m) * m)
        return compress_decode_triton(cfg, w.norm, kvn, scn, cache, kvb, scb, pos, nn, m, cos, sin, w.ape)

    ref = jax.jit(lambda *a: compress_decode_reference(cfg, w, *a, m, freqs, indexer=True))
    auto = jax.jit(lambda *a: compress_decode(cfg, w, *a, m, freqs, indexer=True))
    args = (jnp.asarray(z["kv_new"]), jnp.asarray(z["sc_new"]), _fp4_cache(z), jnp.asarray(z["kv_buf"]),
            jnp.asarray(z["sc_buf"]), jnp.asarray(z["pos"]), jnp.asarray(z["n_new"]))
    got = _idx_numpy(*kern(*args))
    frac = _check_fp4(got, _idx_numpy(*ref(*args)), _written(z["pos"], z["n_new"], m, GPU_ENTRIES),
                      f"GPU indexer B={B}")
    print(f"GPU indexer B={B}: bit-exact fractions of the written entries {frac}")
    via_auto = _idx_numpy(*auto(*args))
    for k in got:
        np.testing.assert_array_equal(via_auto[k].view(np.uint8), got[k].view(np.uint8), err_msg=f"auto {k}")

    rng = np.random.default_rng(SEED)  # m + 2 more steps: every row crosses a window end
    st_k = st_r = args[2:5]
    pos = jnp.asarray(z["pos"])
    nn = jnp.ones_like(pos)
    written = np.zeros((B, GPU_ENTRIES), bool)
    for _ in range(m + 2):
        written |= _written(np.asarray(pos), np.asarray(nn), m, GPU_ENTRIES)
        kvn = jnp.asarray(rng.standard_normal((B, 2 * d)) * 1.5, jnp.float32)
        scn = jnp.asarray(rng.standard_normal((B, 2 * d)) * 2.0, jnp.float32)
        st_k = kern(kvn, scn, *st_k, pos, nn)
        st_r = ref(kvn, scn, *st_r, pos, nn)
        pos = pos + 1
    _check_fp4(_idx_numpy(*st_k), _idx_numpy(*st_r), written, f"GPU indexer B={B}, {m + 2} steps")


if __name__ == "__main__":  # the interpreter subprocess
    _interpret_indexer(dict(np.load(sys.argv[1])), sys.argv[1])

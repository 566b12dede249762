"""The tensor-core FP4 expert GEMV (``dsv4_jax/kernels/fp4_moe_mma.py``, opt-in ``GEMV=2``, with e4m3 dots ``GEMV=3``)
against the reference.

CPU: the ``@triton.jit`` kernels under Triton's interpreter in one subprocess (torch CPU tensors), at shapes of one K
step (D = I = 256 or 512) and D = 1024 (two K steps of stage 1), both dot kinds (fp16, e4m3); decode loads (1-4
tokens, k = 3) with ids of other devices' experts. Oracles and tolerances are
``tests/test_kernels_fp4_moe.py``'s (exact products summed in another fp32 order: one bf16 ulp of the row maximum,
under 1 % of elements different; end to end 2e-2 normwise). :func:`act_codes`' layouts are checked on their own
against the reference quantization, bit for bit.
GPU: ``tests/test_kernels_fp4_moe.py::test_gpu_matches_reference`` runs the jax path (``GEMV=2``, ``GEMV=3`` cases) at
V4-Flash and V4-Pro expert shapes. The interpreter sums exact products in fp32: Hopper's narrower e4m3 accumulation
(promoted every ``ACC`` = 32 products) is not modelled; the GPU cases and the golden tests decide ``GEMV=3``.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.modeling import experts as ex
from dsv4_jax.modeling.quant import fp8_act_quant, quantized_input

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_act_words import _input  # noqa: E402
from test_kernels_fp4_moe import _close_bf16, _down_ref, _hidden_ref, _pairs, _weights  # noqa: E402

SEED = 4321
# (tokens, expert loads, D, I, e4m3 dots); E = 6. D = I = 256: one K step of 256 columns (8 scale groups in a
# 16-column dot, the golden model's width); 512: one step of 16 groups; D = 1024: two steps of stage 1.
CASES = [(1, "ragged", 512, 512, 0), (4, "hot", 512, 512, 0), (2, "ragged", 1024, 512, 0), (3, "ragged", 256, 256, 0),
         (1, "ragged", 512, 512, 1), (4, "hot", 1024, 512, 1), (3, "ragged", 256, 256, 1)]
ACT_CASES = [(3, 2048, "bf16", 0), (2, 4096, "f32", 0), (1, 512, "bf16", 0), (3, 2048, "bf16", 1),
             (2, 4096, "f32", 1)]  # activation kernel: (rows, K, input dtype, e4m3 codes)


@pytest.mark.parametrize("f8", [0, 1])
def test_act_codes_layout(f8):
    """fp16: column ``8 i + m + 4 j`` of each 8*nw8-wide step lands at ``2 nw8 m + 2 i + j``; e4m3: column ``8 i + 2 b
    + d`` at ``4 nw8 d + 4 i + b``; the reference's codes, exactly, and factors 2**(e + 14) (e4m3: 2**(e + 6)) per 32
    columns."""
    from dsv4_jax.kernels.fp4_moe_mma import act_codes

    rng = np.random.default_rng(SEED)
    nw8, R, K = 64, 3, 1024
    x = jnp.asarray(rng.standard_normal((R, K)) * 3, jnp.bfloat16)
    xc, xs = act_codes(x, nw8, bool(f8))
    q, s = fp8_act_quant(x, 128)
    q, s = np.asarray(q).reshape(R, K), np.asarray(s)[..., 0]
    xc = np.asarray(xc.astype(jnp.float32))
    for c0 in (0, 8 * nw8):
        for i, m, j in ((0, 0, 0), (5, 3, 1), (63, 2, 0), (17, 1, 1)):
            if f8:  # byte m of word i, nibble j
                src, dst = 8 * i + 2 * m + j, 4 * nw8 * j + 4 * i + m
            else:  # nibble m + 4 j of word i
                src, dst = 8 * i + m + 4 * j, 2 * nw8 * m + 2 * i + j
            assert xc[:, c0 + dst].tolist() == q[:, c0 + src].tolist()
    assert sorted(xc[1].tolist()) == sorted(q[1].tolist())  # a permutation, exact
    assert np.array_equal(np.asarray(xs), np.repeat(s * 2.0 ** (6 if f8 else 14), 4, axis=1))


def _interpret_main(inp: str, out: str):
    """Subprocess body: both kernels for every case in ``inp`` (npz) -> h and y in ``out``."""
    import torch

    from dsv4_jax.kernels.fp4_moe_mma import codes_torch, launch_mma_torch, mma_tiles

    z = np.load(inp)
    res = {}
    for c, (_, _, _, f8) in enumerate(ACT_CASES):
        xc, xs = codes_torch(torch.from_numpy(z[f"act{c}_x"]), 64, bool(f8), nb=1 + c % 2)
        res[f"act{c}_xc"], res[f"act{c}_xs"] = xc.view(torch.uint8 if f8 else torch.int16).numpy(), xs.numpy()
    for c in range(int(z["n_cases"])):
        g = lambda n, c=c: torch.from_numpy(z[f"{c}_{n}"])  # noqa: E731
        w = [(g(f"w{i}p"), g(f"w{i}s")) for i in (1, 2, 3)]
        E, I, D2 = w[0][0].shape
        h, y = launch_mma_torch(g("x"), g("tok"), g("wt"), g("e"), *w, float(z["limit"]),
                                mma_tiles("cpu", 2 * D2, I, f8=bool(CASES[c][4])))
        res[f"{c}_h"], res[f"{c}_y"] = h.numpy(), y.numpy()
    np.savez(out, **res)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    rng = np.random.default_rng(SEED)
    cfg = d.Config.tiny()
    E, k = 6, 3
    arrays, cases = {"limit": np.float32(cfg.swiglu_limit), "n_cases": len(CASES)}, []
    for c, (T, kind, D, I, _) in enumerate(CASES):
        w1, w2, w3 = _weights(rng, E, I, D)
        x = jnp.asarray(rng.standard_normal((T, D)) * 2, jnp.float32).astype(jnp.bfloat16)
        tok, e, wt = _pairs(rng, T, k, E, kind)
        e[0], e[-1] = 1, E + 1  # at least one local pair and one of another device
        arrays.update({f"{c}_x": np.asarray(x.astype(jnp.float32)), f"{c}_tok": tok, f"{c}_e": e, f"{c}_wt": wt})
        for i, w in zip((1, 2, 3), (w1, w2, w3)):
            arrays[f"{c}_w{i}p"], arrays[f"{c}_w{i}s"] = np.asarray(w.packed), np.asarray(w.scale)
        cases.append(dict(x=x, xq=quantized_input(x, True), tok=tok, e=e, wt=wt, w=(w1, w2, w3)))
    for c, (R, K, dtype, _) in enumerate(ACT_CASES):
        arrays[f"act{c}_x"] = _input(R, K, SEED + c, dtype)
    tmp = tmp_path_factory.mktemp("fp4_moe_mma")
    np.savez(tmp / "in.npz", **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(tmp / "in.npz"), str(tmp / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stderr[-4000:]}"
    return cfg, cases, np.load(tmp / "out.npz")


@pytest.mark.parametrize("c", range(len(ACT_CASES)), ids=[f"R{R}-K{K}-{t}-{'e4m3' if f else 'fp16'}"
                                                         for R, K, t, f in ACT_CASES])
def test_act_kernel_bit_for_bit(interpreted, c):
    """The activation kernel (interpreted; 1-2 blocks per program) gives :func:`act_codes`' codes and factors bit
    for bit, on mixed magnitudes with zeros of both signs, e4m3 rounding ties, subnormals, blocks under the scale's
    floor, amax at 448 and its neighbours, and infinities (``tests/test_kernels_act_words.py``'s inputs)."""
    from dsv4_jax.kernels.fp4_moe_mma import act_codes

    _, _, out = interpreted
    R, K, dtype, f8 = ACT_CASES[c]
    x = _input(R, K, SEED + c, dtype)
    xc, xs = act_codes(jnp.asarray(x, jnp.bfloat16 if dtype == "bf16" else jnp.float32), 64, bool(f8))
    bits = np.uint8 if f8 else np.uint16
    want = np.asarray(xc).view(bits)
    got = out[f"act{c}_xc"].view(bits)
    nan = np.isnan(np.asarray(xc.astype(jnp.float32)))
    got_nan = np.isnan(got.view(ml_dtypes.float8_e4m3fn).astype(np.float32) if f8 else got.view(np.float16))
    assert np.array_equal(got_nan, nan), "NaN codes in other places"
    assert np.array_equal(got[~nan], want[~nan]), f"{int((got[~nan] != want[~nan]).sum())} codes differ"
    assert np.array_equal(out[f"act{c}_xs"].view(np.uint32), np.asarray(xs).view(np.uint32)), "factors differ"


@pytest.mark.parametrize("c", range(len(CASES)), ids=[f"T{T}-{kind}-D{D}-I{I}-{'e4m3' if f else 'fp16'}"
                                                     for T, kind, D, I, f in CASES])
def test_interpreter_matches_reference(interpreted, c):
    """Stage 1, stage 2 (on the kernel's own h) and the pairs' outputs against the reference; other devices' pairs
    are zeros."""
    cfg, cases, out = interpreted
    cs = cases[c]
    w1, w2, w3 = cs["w"]
    h_k, y_k = out[f"{c}_h"], out[f"{c}_y"]
    tok, e, wt = cs["tok"], cs["e"], cs["wt"]
    valid = (e >= 0) & (e < w1.packed.shape[0])
    h_ref, _ = _hidden_ref(cfg, cs["xq"], tok[valid], e[valid], wt[valid], w1, w3)
    _close_bf16(h_k[valid], h_ref, f"case {c} stage 1 (h)")
    _close_bf16(y_k[valid], _down_ref(h_k[valid], e[valid], w2), f"case {c} stage 2 (y from the kernel's h)")
    assert (~valid).any() and (y_k[~valid] == 0).all(), f"case {c}: other devices' pairs not zero"
    args = (cs["x"], cs["xq"], *map(jnp.asarray, (tok, e, wt)), w1, w2, w3)
    ref = np.asarray(jax.jit(ex.pairs_gathered, static_argnums=0)(cfg, *args))
    rel = np.linalg.norm(np.where(valid[:, None], y_k, 0.0) - ref) / np.linalg.norm(ref)
    assert rel <= 2e-2, f"case {c}: end-to-end normwise error {rel:.2e}"


def test_bad_shapes_named():
    """Expert shapes the tensor-core GEMV does not tile are refused, naming the shape (no silent fallback)."""
    from dsv4_jax.kernels.fp4_moe_mma import check_mma_shapes, mma_tiles

    with pytest.raises(ValueError, match="D=192 is not tiled"):
        check_mma_shapes(192, 512, mma_tiles("cpu", 192, 512))  # one step of 192 columns: 24 words, not a power of 2
    with pytest.raises(ValueError, match="BN=192"):
        check_mma_shapes(512, 512, {**mma_tiles("cpu", 512, 512), "BN": 192})


def test_tile_override_env(monkeypatch):
    """``DSV4_MOE_TILE`` (the benchmarks' way to pick ``GEMV=2`` for a whole decode step) parses KEY=INT entries and
    refuses anything else, naming the entry."""
    from dsv4_jax.kernels.fp4_moe import tile_override

    monkeypatch.setenv("DSV4_MOE_TILE", "GEMV=2,num_stages=2")
    assert tile_override() == {"GEMV": 2, "num_stages": 2}
    monkeypatch.setenv("DSV4_MOE_TILE", "")
    assert tile_override() == {}
    for bad in ("GEMV=x", "FOO=1", "GEMV"):
        monkeypatch.setenv("DSV4_MOE_TILE", bad)
        with pytest.raises(ValueError, match=f"'{bad}' is not KEY=INT"):
            tile_override()


if __name__ == "__main__":
    _interpret_main(sys.argv[1], sys.argv[2])

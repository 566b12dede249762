"""The tensor-core FP4 expert GEMV (``dsv4_jax/kernels/fp4_moe_mma.py``, opt-in ``GEMV=2``) against the reference.

CPU: the ``@triton.jit`` kernels under Triton's interpreter in one subprocess (torch CPU tensors), at the smallest
shapes the kernels tile (D = I = 512: one K step of 512 columns, 16 scale groups per dot) and D = 1024 (two K steps
of stage 1); decode loads (1 and 4 tokens, k = 3) with ids of other devices' experts. Oracles and tolerances are
``tests/test_kernels_fp4_moe.py``'s (exact products summed in another fp32 order: one bf16 ulp of the row maximum,
under 1 % of elements different; end to end 2e-2 normwise). :func:`act_codes16`'s layout is checked on its own
against the reference quantization, bit for bit.
GPU: ``tests/test_kernels_fp4_moe.py::test_gpu_matches_reference`` runs the jax path (``GEMV=2`` cases) at V4-Flash
and V4-Pro expert shapes.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv4_jax as d
from dsv4_jax.modeling import experts as ex
from dsv4_jax.modeling.quant import fp8_act_quant, quantized_input

sys.path.insert(0, str(Path(__file__).parent))
from test_kernels_act_words import _input  # noqa: E402
from test_kernels_fp4_moe import _close_bf16, _down_ref, _hidden_ref, _pairs, _weights  # noqa: E402

SEED = 4321
CASES = [(1, "ragged", 512), (4, "hot", 512), (2, "ragged", 1024)]  # (tokens, expert loads, D); I = 512, E = 6
ACT_CASES = [(3, 2048, "bf16"), (2, 4096, "f32"), (1, 512, "bf16")]  # activation kernel: (rows, K, input dtype)


def test_act_codes16_layout():
    """Column ``8 i + m + 4 j`` of each 8*nw8-wide step lands at ``2 nw8 m + 2 i + j``, as the reference's codes;
    the factors are 2**(e + 14) per 32 columns."""
    from dsv4_jax.kernels.fp4_moe_mma import act_codes16

    rng = np.random.default_rng(SEED)
    nw8, R, K = 64, 3, 1024
    x = jnp.asarray(rng.standard_normal((R, K)) * 3, jnp.bfloat16)
    xc, xs = act_codes16(x, nw8)
    q, s = fp8_act_quant(x, 128)
    q, s = np.asarray(q).reshape(R, K), np.asarray(s)[..., 0]
    xc = np.asarray(xc, np.float32)
    for c0 in (0, 8 * nw8):
        for i, m, j in ((0, 0, 0), (5, 3, 1), (63, 2, 0), (17, 1, 1)):
            assert xc[:, c0 + 2 * nw8 * m + 2 * i + j].tolist() == q[:, c0 + 8 * i + m + 4 * j].tolist()
    assert sorted(xc[1].tolist()) == sorted(q[1].tolist())  # a permutation, fp16 exact
    assert np.array_equal(np.asarray(xs), np.repeat(s * 2.0**14, 4, axis=1))


def _interpret_main(inp: str, out: str):
    """Subprocess body: both kernels for every case in ``inp`` (npz) -> h and y in ``out``."""
    import torch

    from dsv4_jax.kernels.fp4_moe_mma import codes_torch, launch_mma_torch, mma_tiles

    z = np.load(inp)
    res = {}
    for c in range(len(ACT_CASES)):
        xc, xs = codes_torch(torch.from_numpy(z[f"act{c}_x"]), 64, nb=c + 1 if c < 2 else 1)
        res[f"act{c}_xc"], res[f"act{c}_xs"] = xc.numpy().view(np.uint16), xs.numpy()
    for c in range(int(z["n_cases"])):
        g = lambda n, c=c: torch.from_numpy(z[f"{c}_{n}"])  # noqa: E731
        w = [(g(f"w{i}p"), g(f"w{i}s")) for i in (1, 2, 3)]
        E, I, D2 = w[0][0].shape
        h, y = launch_mma_torch(g("x"), g("tok"), g("wt"), g("e"), *w, float(z["limit"]),
                                mma_tiles("cpu", 2 * D2, I))
        res[f"{c}_h"], res[f"{c}_y"] = h.numpy(), y.numpy()
    np.savez(out, **res)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory):
    rng = np.random.default_rng(SEED)
    cfg = d.Config.tiny()
    E, I, k = 6, 512, 3
    arrays, cases = {"limit": np.float32(cfg.swiglu_limit), "n_cases": len(CASES)}, []
    for c, (T, kind, D) in enumerate(CASES):
        w1, w2, w3 = _weights(rng, E, I, D)
        x = jnp.asarray(rng.standard_normal((T, D)) * 2, jnp.float32).astype(jnp.bfloat16)
        tok, e, wt = _pairs(rng, T, k, E, kind)
        arrays.update({f"{c}_x": np.asarray(x.astype(jnp.float32)), f"{c}_tok": tok, f"{c}_e": e, f"{c}_wt": wt})
        for i, w in zip((1, 2, 3), (w1, w2, w3)):
            arrays[f"{c}_w{i}p"], arrays[f"{c}_w{i}s"] = np.asarray(w.packed), np.asarray(w.scale)
        cases.append(dict(x=x, xq=quantized_input(x, True), tok=tok, e=e, wt=wt, w=(w1, w2, w3)))
    for c, (R, K, dtype) in enumerate(ACT_CASES):
        arrays[f"act{c}_x"] = _input(R, K, SEED + c, dtype)
    tmp = tmp_path_factory.mktemp("fp4_moe_mma")
    np.savez(tmp / "in.npz", **arrays)
    env = dict(os.environ, TRITON_INTERPRET="1", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, __file__, str(tmp / "in.npz"), str(tmp / "out.npz")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"interpreter subprocess failed:\n{proc.stderr[-4000:]}"
    return cfg, cases, np.load(tmp / "out.npz")


@pytest.mark.parametrize("c", range(len(ACT_CASES)), ids=[f"R{R}-K{K}-{t}" for R, K, t in ACT_CASES])
def test_act_kernel_bit_for_bit(interpreted, c):
    """The activation kernel (interpreted; 1-2 blocks per program) gives :func:`act_codes16`'s codes and factors bit
    for bit, on mixed magnitudes with zeros of both signs, e4m3 rounding ties, subnormals, blocks under the scale's
    floor, amax at 448 and its neighbours, and infinities (``tests/test_kernels_act_words.py``'s inputs)."""
    from dsv4_jax.kernels.fp4_moe_mma import act_codes16

    _, _, out = interpreted
    R, K, dtype = ACT_CASES[c]
    x = _input(R, K, SEED + c, dtype)
    xc, xs = act_codes16(jnp.asarray(x, jnp.bfloat16 if dtype == "bf16" else jnp.float32), 64)
    want = np.asarray(xc).view(np.uint16)
    got = out[f"act{c}_xc"]
    nan = np.isnan(np.asarray(xc, np.float32))
    assert np.array_equal(np.isnan(got.view(np.float16)), nan), "NaN codes in other places"
    assert np.array_equal(got[~nan], want[~nan]), f"{int((got[~nan] != want[~nan]).sum())} codes differ"
    assert np.array_equal(out[f"act{c}_xs"].view(np.uint32), np.asarray(xs).view(np.uint32)), "factors differ"


@pytest.mark.parametrize("c", range(len(CASES)), ids=[f"T{T}-{kind}-D{D}" for T, kind, D in CASES])
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

    with pytest.raises(ValueError, match="D=256, I=512"):
        check_mma_shapes(256, 512, mma_tiles("cpu", 256, 512))


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

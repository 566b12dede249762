"""The FP4 decoding helpers of ``dsv4_jax/kernels/common.py`` (``e2m1_pair``, ``e2m1_nibble``,
``e2m1_factors``, and the bf16 forms ``e2m1_pair16``, ``e2m1_bits16``, ``e2m1_factors16``) against the reference
decoding of ``dsv4_jax/modeling/quant.py``, for every packed byte and scale bytes across the whole e8m0 range, under
Triton's interpreter (the same ``@triton.jit`` code the GPU kernels inline). Exact: the decoded weights are powers
of two times 3-bit magnitudes, so any difference is a bug (a wrong bit placement, a lost sign, a flushed denormal,
an overflowing factor)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import triton_shim  # noqa: E402

# e8m0 bytes: the smallest scale (0.5 * 2**-126 is a denormal weight), typical weight scales, 1, 2 (the last with
# f2 = 1), 4 and the largest finite ones (f2 > 1)
SCALE_BYTES = np.array([1, 2, 100, 118, 122, 127, 128, 129, 130, 200, 252], np.int32)


try:  # the kernel is defined at module level, where the interpreter finds the helpers it calls
    import triton
    import triton.language as tl

    from dsv4_jax.kernels.common import e2m1_factors, e2m1_factors16, e2m1_nibble, e2m1_pair, e2m1_pair16

    @triton.jit
    def _decode(p_ptr, b_ptr, lo_ptr, hi_ptr, NB: tl.constexpr, BITS16: tl.constexpr):
        """Row j: the 256 bytes decoded with scale byte b[j] (low and high nibbles); ``BITS16``: through the bf16 bit
        patterns (the WX kernels' ``BFMUL`` form), values in fp32."""
        i = tl.arange(0, 256)
        j = tl.arange(0, NB)
        p = tl.load(p_ptr + i).to(tl.int32)[None, :]  # [1, 256]
        out = j[:, None] * 256 + i[None, :]
        if BITS16:
            g1, g2 = e2m1_factors16(tl.load(b_ptr + j))  # [NB]
            lo, hi = e2m1_pair16(p, g1[:, None], g2[:, None], True)
            tl.store(lo_ptr + out, lo)
            tl.store(hi_ptr + out, hi)
        else:
            f1, f2 = e2m1_factors(tl.load(b_ptr + j))  # [NB]
            lo, hi = e2m1_pair(p)
            tl.store(lo_ptr + out, lo * f2[:, None] * f1[:, None])
            tl.store(hi_ptr + out, hi * f2[:, None] * f1[:, None])

    @triton.jit
    def _decode_words(w_ptr, o_ptr):
        """The 64 int32 words holding bytes 0..255 -> their 8 nibbles each, [8, 64]: row m = nibble m."""
        i = tl.arange(0, 64)
        w = tl.load(w_ptr + i)
        for m in tl.static_range(8):
            tl.store(o_ptr + m * 64 + i, e2m1_nibble(w, m))
except ImportError:  # no triton: the test skips
    triton = None


def _decode_main(path: str) -> None:
    """Subprocess body: decode all 256 bytes at every scale byte with the helpers."""
    import torch

    z = dict(np.load(path))
    nb = len(z["b"])
    p = torch.from_numpy(z["p"].copy())
    b = torch.from_numpy(z["b"].copy())
    lo = torch.full((nb, 256), float("nan"), dtype=torch.float32)
    hi = torch.full((nb, 256), float("nan"), dtype=torch.float32)
    _decode[(1,)](p, b, lo, hi, NB=triton.next_power_of_2(nb), BITS16=False)
    lo16, hi16 = torch.full_like(lo, float("nan")), torch.full_like(hi, float("nan"))
    _decode[(1,)](p, b, lo16, hi16, NB=triton.next_power_of_2(nb), BITS16=True)
    words = torch.from_numpy(z["p"].copy().view(np.int32))  # little-endian: byte 4i + k at bits 8k of word i
    nib = torch.full((8, 64), float("nan"), dtype=torch.float32)
    _decode_words[(1,)](words, nib)
    np.savez(path + ".out.npz", lo=lo.numpy(), hi=hi.numpy(), nib=nib.numpy(), lo16=lo16.numpy(), hi16=hi16.numpy())


def test_fp4_pair_decoding_is_exact(tmp_path):
    pytest.importorskip("triton")
    pytest.importorskip("torch")
    nb = 16  # the kernel's power-of-two width: scale bytes padded with 127
    b = np.full(nb, 127, np.int32)
    b[:len(SCALE_BYTES)] = SCALE_BYTES
    out = triton_shim.interpret(__file__, {"p": np.arange(256, dtype=np.uint8), "b": b}, tmp_path)
    # reference: the e2m1 format (sign bit 3, exponent bits 2-1, mantissa bit 0; exponent 0 is subnormal) times
    # 2**(b - 127), in float64 (numpy keeps denormals; JAX's CPU backend flushes them), exact in float32
    mag = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
    codes = np.arange(256)
    scale = np.exp2(b.astype(np.float64) - 127)[:, None]
    ref = {half: (np.where(c & 8, -1.0, 1.0) * mag[c & 7] * scale).astype(np.float32)
           for half, c in (("lo", codes & 15), ("hi", codes >> 4))}
    for half in ("lo", "hi", "lo16", "hi16"):  # fp32 forms, then the bf16 bit patterns'
        want = ref[half[:2]]
        np.testing.assert_array_equal(out[half], want, err_msg=f"{half} nibbles")
        assert (np.signbit(out[half]) == np.signbit(want)).all(), f"{half}: the sign of -0 (code 8) is kept"
    # e2m1_nibble on the same bytes read as int32 words: nibble m of word i is column 8i + m of the packed row
    # (byte 4i + m // 2, low nibble for even m), times 2**-126 (the factor of scale byte 127, f1 * f2 = 2**126)
    cols = np.stack([codes & 15, codes >> 4], axis=1).reshape(64, 8)  # [word, nibble m]: column 8i + m's code
    want = (np.where(cols & 8, -1.0, 1.0) * mag[cols & 7] * 2.0**-126).astype(np.float32).T  # [8, 64]
    np.testing.assert_array_equal(out["nib"], want, err_msg="e2m1_nibble")
    assert (np.signbit(out["nib"]) == np.signbit(want)).all(), "e2m1_nibble: the sign of -0 is kept"


if __name__ == "__main__":  # the interpreter subprocess
    _decode_main(sys.argv[1])

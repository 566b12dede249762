"""The MoE router (spec 9) in two Triton kernels: gate logits, then per token the scores, top-k and weights.

Public function: :func:`route` ``x [T, D]`` -> expert ids ``[T, k]`` int32 and routing weights ``[T, k]`` fp32.
The reference is :func:`route_reference`, the XLA code of ``modeling/moe.py`` (the spec, the CPU path):

    logits = x_f32 @ gate_f32.T                     (fp32)
    scores = sqrt(softplus(logits))                 (softplus = logits above 20, else log1p(exp(logits)))
    ids    = top_k(scores + bias, k)                (learned routing; the bias only selects)
           | tid2eid[token]                         (hash routing, the first layers)
    wts    = scores[ids] / sum(scores[ids]) * route_scale

Why: XLA makes that ~5 kernels per layer on an H200 (a reduction, the activation, a sort-based top-k, slices,
the gather and the normalisation, ``scripts/count_launches.py``); here
1. :func:`_logits_kernel`, grid ``(E / BE, T / BT)``: each program dots BT tokens with BE gate rows over the whole
   D in fp32 (the gate, 2 MB in V4-Flash, is read by ~all SMs at batch 1);
2. :func:`_select_kernel`, grid ``(T,)``: the scores, ``k`` rounds of "largest biased score, lowest expert id on
   ties" (``jax.lax.top_k``'s order), the gathered weights summed in selection order and normalised.

Numerics contract: the same formula; the fp32 sums (the D-long dot, the k-long weight sum) in another order and
``exp``/``log``/``sqrt`` implementations (ulp-level; ``log1p`` is computed as ``log(u) * y / (u - 1)`` with
``u = 1 + y``, accurate to a few ulps where ``log(1 + y)`` alone would lose everything below 2**-24). Selections
equal the reference's except where two biased scores are within those ulps of each other.

Portable Triton (fp32 arithmetic, plain loads), tested under the interpreter in CI and compiled for sm_90 without a
GPU; its GPU test passed on an H200, and so did the golden tests of criteria 1 and 2 with it on (``kernels="triton"``,
2026-11-30: layer-isolated, end to end, both releases), so ``"auto"`` runs it on GPUs; under a mesh every device
routes its own batch rows' tokens.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.kernels import arch, env_tiles, next_pow2, triton_call, use_triton
from dsv4_jax.kernels.on_mesh import replicated_on_mesh
from dsv4_jax.modeling.quant import HIGHEST

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


def route_reference(cfg: Config, gate: jax.Array, bias, tid2eid, x: jax.Array, ids: jax.Array):
    """Router: ``x [T,D]`` -> (expert ids ``[T,k]`` int32, weights ``[T,k]`` fp32); ``ids [T]`` the token ids
    (hash routing reads ``tid2eid [vocab, k]`` at them, learned routing adds ``bias [E]`` for the selection)."""
    logits = jnp.einsum("td,ed->te", x.astype(jnp.float32), gate.astype(jnp.float32), precision=HIGHEST)
    scores = jnp.sqrt(jnp.where(logits > 20.0, logits, jnp.log1p(jnp.exp(jnp.minimum(logits, 20.0)))))
    if tid2eid is not None:  # hash routing
        idx = tid2eid[ids]
    else:  # the bias only influences the selection
        _, idx = jax.lax.top_k(scores + bias, cfg.n_activated_experts)
    wts = jnp.take_along_axis(scores, idx, axis=-1)
    wts = wts / jnp.sum(wts, axis=-1, keepdims=True) * np.float32(cfg.route_scale)
    return idx.astype(jnp.int32), wts


if triton is not None:

    @triton.jit
    def _logits_kernel(x_ptr, g_ptr, T, out_ptr, D: tl.constexpr, E: tl.constexpr, BE: tl.constexpr,
                       BT: tl.constexpr, BK: tl.constexpr, DOT: tl.constexpr = 0):
        """``out[t, e] = sum_d x[t, d] * gate[e, d]`` in fp32 for BT tokens and BE experts; ``DOT`` 1: the tile's
        products summed by an fp32 ``tl.dot`` (``ieee``: fp32 multiply-adds, no TF32); ``DOT`` 2: a ``tl.dot`` of
        the bf16 operands themselves with an fp32 accumulator (tensor cores: each product of two bf16 values is
        exact in fp32, the sums fp32); the forms for many tokens."""
        tok = tl.program_id(1) * BT + tl.arange(0, BT)
        ex = tl.program_id(0) * BE + tl.arange(0, BE)
        tm, em = tok < T, ex < E
        acc = tl.zeros((BT, BE), tl.float32)
        for k0 in range(0, D, BK):
            k = k0 + tl.arange(0, BK)
            km = k < D
            x = tl.load(x_ptr + tok[:, None].to(tl.int64) * D + k[None, :], mask=tm[:, None] & km[None, :],
                        other=0.0)  # [BT, BK]
            g = tl.load(g_ptr + ex[:, None].to(tl.int64) * D + k[None, :], mask=em[:, None] & km[None, :],
                        other=0.0)  # [BE, BK]
            if DOT == 2:
                acc = tl.dot(x, tl.trans(g), acc)
            elif DOT == 1:
                acc = tl.dot(x.to(tl.float32), tl.trans(g.to(tl.float32)), acc, input_precision="ieee")
            else:
                acc += tl.sum(x.to(tl.float32)[:, None, :] * g.to(tl.float32)[None, :, :], axis=2)
        tl.store(out_ptr + tok[:, None].to(tl.int64) * E + ex[None, :], acc, mask=tm[:, None] & em[None, :])

    @triton.jit
    def _select_kernel(logit_ptr, bias_ptr, map_ptr, ids_ptr, idx_ptr, wts_ptr, rank_ptr, E: tl.constexpr,
                       EP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, SCALE: tl.constexpr, HASH: tl.constexpr):
        """Token ``program_id(0)``: scores, the top-K experts (or the hash map's), their normalised weights, and each
        choice's rank in (expert id, position) order (:func:`dsv4_jax.modeling.experts.choice_ranks`: the order the
        MoE adds the experts' outputs in)."""
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, EP)
        em = e < E
        lg = tl.load(logit_ptr + t * E + e, mask=em, other=0.0)
        y = tl.exp(tl.minimum(lg, 20.0))
        u = 1.0 + y
        log1p = tl.where(u == 1.0, y, tl.log(u) * (y / (u - 1.0)))
        scores = tl.sqrt(tl.where(lg > 20.0, lg, log1p))  # [EP]
        kk = tl.arange(0, KP)
        chosen = tl.zeros((KP,), tl.int32)
        w = tl.zeros((KP,), tl.float32)
        if HASH:
            tokid = tl.load(ids_ptr + t).to(tl.int64)
            chosen = tl.load(map_ptr + tokid * K + kk, mask=kk < K, other=0)
            for j in tl.static_range(K):
                cj = tl.sum(tl.where(kk == j, chosen, 0), axis=0)
                w = tl.where(kk == j, tl.sum(tl.where(e == cj, scores, 0.0), axis=0), w)
        else:
            biased = tl.where(em, scores + tl.load(bias_ptr + e, mask=em, other=0.0), float("-inf"))
            for j in tl.static_range(K):
                best = tl.max(biased, axis=0)
                cj = tl.min(tl.where(biased == best, e, EP), axis=0)  # lowest id among the largest
                chosen = tl.where(kk == j, cj, chosen)
                w = tl.where(kk == j, tl.sum(tl.where(e == cj, scores, 0.0), axis=0), w)
                biased = tl.where(e == cj, float("-inf"), biased)
        total = tl.sum(tl.where(kk == 0, w, 0.0), axis=0)
        for j in tl.static_range(1, K):  # in selection order
            total = total + tl.sum(tl.where(kk == j, w, 0.0), axis=0)
        tl.store(idx_ptr + t * K + kk, chosen, mask=kk < K)
        tl.store(wts_ptr + t * K + kk, w / total * SCALE, mask=kk < K)
        ci, cj = chosen[None, :], chosen[:, None]  # [1, KP] choice i, [KP, 1] choice j
        before = (ci < cj) | ((ci == cj) & (kk[None, :] < kk[:, None]))
        rank = tl.sum((before & (kk[None, :] < K)).to(tl.int32), axis=1)  # [KP]: choices before choice j
        tl.store(rank_ptr + t * K + kk, rank, mask=kk < K)


DOT_MIN_TOKENS = 2048  # tokens from which the GPU plan takes the DOT form (plan)
# bf16 tokens and gate take the DOT form on their own bf16 values (DOT 2) rather than fp32 ieee: the products of two
# bf16 values are exact in fp32, so both sum the same products in fp32, in another order. H200, 8K tokens of V4-Flash
# (scripts/bench_prefill_ops.py --ops router, 2026-12-04): DOT 1 1.673 ms, DOT 2 0.229 ms (BT 64) / 0.175 ms (BT 128);
# one token of 8,192 picked another expert set (a near tie); golden all-position criterion passed with DOT 2 forced.
BF16_DOT = True
# tokens from which bf16 inputs take DOT 2 (H200, 2026-12-04, bench_prefill_ops.py --ops router --router-tokens ...,
# ms per call with dispatch, the decode form vs DOT 2 with 32 x 64 tiles): 256 tokens 0.282 vs 0.122, 512 0.492 vs
# 0.115, 1K 0.806 vs 0.101, 2K 1.517 vs 0.132, 4K 2.606 vs 0.211 (128 x 64: 0.233); the same expert sets throughout.
# Its GPU test cases at 256 and 1K tokens (tests/test_kernels_router.py) passed on an H200 (2026-12-05).
BF16_DOT_MIN_TOKENS = 256
# Decode plans from the sm_90a builds (docs/performance.md, "Small decode kernels"): up to WHOLE_ROW_MAX_TOKENS tokens
# take one expert per logits program and the whole D row in one step (no loop: all loads issued at once, one
# reduction); SELECT_WARPS > 0 gives the selection kernel that many warps (1: its picks need no barrier). The 3-layer
# V4-Flash decode step at batch 1 on an H100 (2026-12-05, bench_decode.py --variants): 2.156 -> 1.787 ms per call
# (the earlier 0 and 0), the same in a loop; the logits kernel 21.8 -> 7.2 us.
WHOLE_ROW_MAX_TOKENS = 1
SELECT_WARPS = 1


def plan(T: int, E: int, D: int, target: str | None = None, bf16: bool = False) -> dict:
    """Experts ``BE`` and tokens ``BT`` per logits program, the D step ``BK``, ``DOT`` (the tile summed by a dot: 1
    fp32 ``ieee``, 2 bf16 operands, for ``bf16`` tokens and gate), launch options (the one place);
    ``DSV4_ROUTER_TILE`` overrides entries (:func:`tile_override`).

    Two forms. The decode form (2 experts x up to 4 tokens per program, products summed along D): at batch 1 the
    gate's 4 MB are spread over every SM. At prefill sizes it re-reads the tokens once per 2 experts (128 times for
    V4-Flash): there, from :data:`DOT_MIN_TOKENS` tokens, the ``DOT`` form takes 64 x 64 tiles summed by an fp32
    ``ieee`` dot (512 programs for 8K tokens). Measured on an H200 (2026-12-04, ``bench_attention.py --mode prefill``,
    a 128K-token prompt in 8K chunks, 2 V4-Flash layers): 166,212 -> 176,546 tokens/s per layer, the last chunk
    108.3 -> 101.5 ms. Below :data:`DOT_MIN_TOKENS` the DOT form would leave SMs idle (``ceil(E/64) * ceil(T/64)``
    programs: 128 at 2K tokens, V4-Flash); the sizes between were not timed. ``DOT`` 2 (the bf16 operands on the
    tensor cores, the way the compressor's prefill projection gained 5.8x, ``modeling/compressor.py``) is the form
    for bf16 inputs (:data:`BF16_DOT`) from :data:`BF16_DOT_MIN_TOKENS` tokens: 128 tokens x 64 experts per program
    from 8K tokens, 9.6x faster than ``DOT`` 1 there, 64 x 32 below (more programs), 2.3-11x faster than the decode
    form from 256 to 4K tokens (H200, 2026-12-04); float32 numerics keep ``DOT`` 1 from :data:`DOT_MIN_TOKENS`."""
    if target == "cpu":  # the interpreter: few programs
        p = dict(BE=min(64, next_pow2(E)), BT=min(4, next_pow2(T)), BK=128, DOT=0, num_warps=4)
    elif T >= BF16_DOT_MIN_TOKENS and bf16 and BF16_DOT:
        wide = T >= 8192
        p = dict(BE=64 if wide else 32, BT=128 if wide else 64, BK=64, DOT=2, num_warps=4)
    elif T >= DOT_MIN_TOKENS:
        p = dict(BE=64, BT=64, BK=32, DOT=1, num_warps=4)
    elif T <= WHOLE_ROW_MAX_TOKENS:
        p = dict(BE=1, BT=next_pow2(T), BK=next_pow2(D), DOT=0, num_warps=4)
    else:
        p = dict(BE=2, BT=min(4, next_pow2(T)), BK=512, DOT=0, num_warps=4)
    if target != "cpu" and SELECT_WARPS and p["DOT"] == 0:  # decode sizes only: timed there, not at prefill
        p["SW"] = SELECT_WARPS
    return {**p, **tile_override()}


TILE_KEYS = ("BE", "BT", "BK", "DOT", "num_warps", "SW")  # SW: the selection kernel's warps (default num_warps)


def tile_override() -> dict:
    """Plan entries from the ``DSV4_ROUTER_TILE`` environment variable (``"DOT=1,BT=64,BE=64,BK=32"``; empty: none),
    for every launch traced after it is set: a benchmark knob (every plan computes the same logits up to the fp32
    order of the D-long sums)."""
    return env_tiles("DSV4_ROUTER_TILE", TILE_KEYS)


def _kernel_args(T: int, E: int, D: int, k: int, hashed: bool, route_scale: float, p: dict):
    """Grids and metaparameters of both kernels, ``((grid1, meta1), (grid2, meta2))``: the one place the jax and
    the torch launchers take them from."""
    meta1 = dict(D=D, E=E, BE=p["BE"], BT=p["BT"], BK=p["BK"], DOT=int(p.get("DOT", 0)), num_warps=p["num_warps"])
    meta2 = dict(E=E, EP=next_pow2(E), K=k, KP=next_pow2(k), SCALE=float(np.float32(route_scale)), HASH=hashed,
                 num_warps=p.get("SW", p["num_warps"]))
    return ((math.ceil(E / p["BE"]), math.ceil(T / p["BT"])), meta1), ((T,), meta2)


def route_triton(cfg: Config, gate: jax.Array, bias, tid2eid, x: jax.Array, ids: jax.Array, p: dict | None = None):
    """The Triton path of :func:`route` (same returns)."""
    return route_triton_ranked(cfg, gate, bias, tid2eid, x, ids, p)[:2]


def route_triton_ranked(cfg: Config, gate: jax.Array, bias, tid2eid, x: jax.Array, ids: jax.Array,
                        p: dict | None = None):
    """:func:`route_triton` and the choices' ranks ``[T, k]`` int32 (:func:`route_ranked`)."""
    T, D = x.shape
    E, K = gate.shape[0], cfg.n_activated_experts
    if gate.shape != (E, D):
        raise ValueError(f"route: gate has shape {gate.shape}, expected ({E}, {D}) for x [..., {D}]")
    if tid2eid is None and (bias is None or bias.shape != (E,)):
        raise ValueError(f"route: learned routing needs a bias of shape ({E},), got "
                         f"{None if bias is None else bias.shape}")
    if tid2eid is not None and tid2eid.shape[1] != K:
        raise ValueError(f"route: tid2eid has shape {tid2eid.shape}, expected [vocab, {K}]")
    bf16 = x.dtype == jnp.bfloat16 and gate.dtype == jnp.bfloat16
    p = p or plan(T, E, D, arch(), bf16)
    if p.get("DOT") == 2 and not bf16:
        raise ValueError(f"route: the DOT=2 plan needs bf16 tokens and gate, got {x.dtype} and {gate.dtype}")
    hashed = tid2eid is not None
    (g1, m1), (g2, m2) = _kernel_args(T, E, D, K, hashed, cfg.route_scale, p)
    logits = triton_call(x, gate, T, kernel=_logits_kernel, out_shape=jax.ShapeDtypeStruct((T, E), jnp.float32),
                         grid=g1, **m1)
    dummy_f, dummy_i = jnp.zeros((1,), jnp.float32), jnp.zeros((1,), jnp.int32)
    return triton_call(
        logits, dummy_f if hashed else bias.astype(jnp.float32), tid2eid.astype(jnp.int32) if hashed else dummy_i,
        ids.astype(jnp.int32) if hashed else dummy_i, kernel=_select_kernel,
        out_shape=(jax.ShapeDtypeStruct((T, K), jnp.int32), jax.ShapeDtypeStruct((T, K), jnp.float32),
                   jax.ShapeDtypeStruct((T, K), jnp.int32)), grid=g2, **m2)


def route(cfg: Config, gate: jax.Array, bias, tid2eid, x: jax.Array, ids: jax.Array):
    """Expert ids ``[T, k]`` (int32) and weights ``[T, k]`` (fp32) for tokens ``x [T, D]`` with token ids ``ids
    [T]`` (see :func:`route_reference`). The kernels run where :func:`dsv4_jax.kernels.use_triton` says so
    (``"auto"`` on GPUs); under a mesh each device routes its batch rows' tokens
    (:func:`dsv4_jax.kernels.on_mesh.replicated_on_mesh`)."""
    return route_ranked(cfg, gate, bias, tid2eid, x, ids)[:2]


def route_ranked(cfg: Config, gate: jax.Array, bias, tid2eid, x: jax.Array, ids: jax.Array):
    """:func:`route` and, where the kernels route, each choice's rank ``[T, k]`` int32 in (expert id, position)
    order, which the selection kernel computes beside the ids (the MoE's combine would otherwise compute it: on GPUs
    an XLA kernel of its own per layer); ``None`` on the XLA path."""
    if use_triton(cfg) and x.shape[0] > 0:
        return replicated_on_mesh(lambda x, ids, p: route_triton_ranked(cfg, *p, x, ids), (x, ids),
                                  (gate, bias, tid2eid))
    return (*route_reference(cfg, gate, bias, tid2eid, x, ids), None)


# ---------------------------------------------------------------------------------------------- torch launcher
def run_torch(x, gate, bias, tid2eid, ids, k: int, route_scale: float, p: dict, ranks: bool = False):
    """Both kernels on torch tensors (CI: under ``TRITON_INTERPRET=1``); ``bias`` or ``tid2eid``/``ids`` None.
    Returns ``(idx [T, k] int32, wts [T, k] fp32, logits [T, E] fp32)``, and the ranks ``[T, k]`` int32 last with
    ``ranks``."""
    import torch

    T, D = x.shape
    E = gate.shape[0]
    hashed = tid2eid is not None
    (g1, m1), (g2, m2) = _kernel_args(T, E, D, k, hashed, route_scale, p)
    logits = torch.full((T, E), float("nan"), dtype=torch.float32)
    _logits_kernel[g1](x, gate, T, logits, **m1)
    idx = torch.full((T, k), -1, dtype=torch.int32)
    wts = torch.full((T, k), float("nan"), dtype=torch.float32)
    dummy_f, dummy_i = torch.zeros(1, dtype=torch.float32), torch.zeros(1, dtype=torch.int32)
    rank = torch.full((T, k), -1, dtype=torch.int32)
    _select_kernel[g2](logits, dummy_f if hashed else bias, tid2eid if hashed else dummy_i,
                       ids if hashed else dummy_i, idx, wts, rank, **m2)
    return (idx, wts, logits, rank) if ranks else (idx, wts, logits)

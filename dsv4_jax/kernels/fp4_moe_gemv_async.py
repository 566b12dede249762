"""The FP4 routed experts at decode sizes with the weight stream in flight: :mod:`fp4_moe_gemv`'s two GEMV kernels
rewritten in Gluon so that each thread keeps ``NS - 1`` K steps of its weight words in flight by ``cp.async``
(CUDA sm_80+; its GPU tests run on sm_90), the portable kernels' arithmetic unchanged.

Why (issue 11): at one token the portable GEMV is bound by load latency, not by bytes or instructions (Nsight
Compute, H200, 2026-12-03: 0.6 issued warps per scheduler, half the stall cycles on L1TEX scoreboards; gate/up at
1.93 TB/s, down 1.51). Triton pipelines no loads in a loop without a dot, and ptxas sinks a software prefetch next
to its use to save registers (``fp4_moe_gemv``'s docstring). Here the copies go global -> shared memory without
passing through registers, ``NS - 1`` steps ahead: each thread copies exactly the 16-byte word vectors it later
reads (the copy's layout is the compute's), so a step waits on its own copies (``cp.async.wait_group``) only.

One program: ``BN`` weight rows of one (token, expert) pair over the whole K range, ``NG`` 32-column groups per K
step, ``GT`` groups (4 int32 words = 32 nibbles each) per thread and matrix and step: ``BN = num_warps * 32 * GT /
NG``. The grid and the outputs are :mod:`fp4_moe_gemv`'s (pairs as they come, another device's pair: no work in stage
1, zeros in stage 2); the activations are its :func:`fp4_moe_gemv.act_words` layout, read from global memory (L1
hits). A program's scale bytes (``[K / (32 NG), BN, NG]``, 1/16 of its weight bytes) are copied once before its K
loop and shared through one barrier. (Gluon's shared-memory analysis adds two barriers per K step, before a stage is
refilled and after its copies land, though each thread reads only what it copied.)

Numerics: :mod:`fp4_moe_gemv`'s, operation for operation (nibble x code products exact in fp32, each group's sum
times its factors, the groups summed in the same order), so the outputs should be the portable kernels' bit for
bit (the GPU test asserts it).

Scope: CUDA only (Gluon's ``cp.async``); other targets and the interpreter run :mod:`fp4_moe_gemv`. Launched from
torch (:func:`launch_torch`, the GPU tests) or inside ``jit`` (:func:`launch_jax`, jax-triton through
:mod:`gluon_route`), where ``fp4_moe``'s ``GEMV=4`` tile key sends decode calls. Its elementwise helpers are
:mod:`common`'s (``e2m1_nibble``, ``e2m1_factors``, ``round_bf16``, ``swiglu_act``), called as they are.

Status: opt-in (``DSV4_MOE_TILE=GEMV=4``), compiled for sm_90a here (no spills, 16-byte ``cp.async`` copies;
``tests/test_kernels_fp4_moe_async.py``); not yet run on a GPU (2026-12-07: no device came).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels.common import e2m1_factors, e2m1_nibble, round_bf16, swiglu_act
from dsv4_jax.kernels.fp4_moe_gemv import act_words_torch, act_words_triton

try:  # Gluon ships with triton >= 3.5; the model never needs it
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.runtime.jit import constexpr_function
except ImportError:  # pragma: no cover - a triton without Gluon
    gluon = gl = None


def plan(stage: str, D: int, I: int, n_pairs: int = 1) -> dict:
    """Tiles of one stage (``"gate_up"`` or ``"down"``): ``NG`` groups per K step, ``num_warps``, ``NS`` stages.
    Both stages stream their weights in ~1,536 programs of 4 warps at one V4-Flash token (all resident at once):
    gate/up 512-column steps (8 rows a program), down 256-column steps (16 rows a program, 8 steps). ``n_pairs``
    (the call's pairs) is not used yet: the plans are for decode sizes, to be tuned on a GPU."""
    del n_pairs
    ng = 16 if stage == "gate_up" and D % 512 == 0 else 8
    return dict(NG=ng, NS=3, GT=1, num_warps=4)


def plans(D: int, I: int, n_pairs: int, over: dict | None = None) -> tuple[dict, dict]:
    """Both stages' plans with tile overrides (``fp4_moe``'s ``DSV4_MOE_TILE`` keys): ``NG1`` / ``NG2`` the stages'
    groups per K step, ``NS`` and ``num_warps`` both stages'. Other keys are refused."""
    over = dict(over or {})
    unknown = set(over) - {"NS", "NG1", "NG2", "GT", "num_warps"}
    if unknown:
        raise ValueError(f"fp4_moe_gemv_async: tile keys {sorted(unknown)} do not apply (NS, NG1, NG2, GT, num_warps "
                         "do)")
    both = {k: over[k] for k in ("NS", "GT", "num_warps") if k in over}
    p1 = {**plan("gate_up", D, I, n_pairs), **both, **({"NG": over["NG1"]} if "NG1" in over else {})}
    p2 = {**plan("down", D, I, n_pairs), **both, **({"NG": over["NG2"]} if "NG2" in over else {})}
    return p1, p2


def rows(p: dict) -> int:
    """Weight rows per program of plan ``p``."""
    return p["num_warps"] * 32 * p["GT"] // p["NG"]


def check_plan(stage: str, K: int, N: int, p: dict) -> None:
    """``K`` (the stage's reduction width) and ``N`` (its output width) must be tiled by the plan."""
    ng, bn = p["NG"], rows(p)
    if ng not in (4, 8, 16, 32) or p["GT"] not in (1, 2) or ng < 4 * p["GT"] or K % (32 * ng) or N % bn or p["NS"] < 2:
        raise ValueError(f"fp4_moe_gemv_async ({stage}): K={K}, N={N} not tiled by {p} (need NG in 4..32, GT 1 or 2, "
                         f"K a multiple of 32*NG={32 * ng}, N of {bn} rows, NS >= 2)")


if gluon is not None:

    @constexpr_function
    def _pow2(n):
        """The least power of two >= ``n``."""
        return 1 << (int(n) - 1).bit_length()

    @constexpr_function
    def _layout(ng, gt, num_warps):
        """``[BN, NG, 4]`` int32 words: a thread holds ``gt`` groups' 4 words (16 bytes each) of one row."""
        return gl.BlockedLayout([1, gt, 4], [32 * gt // ng, ng // gt, 1], [num_warps, 1, 1], [2, 1, 0])

    @gluon.jit
    def _x3(v):
        """``[n]`` -> ``[n, 1, 1]``."""
        return gl.expand_dims(gl.expand_dims(v, 1), 2)

    @gluon.jit
    def _words(L: gl.constexpr, NG: gl.constexpr):
        """The ``[1, NG, 1]`` group and ``[1, 1, 4]`` word indices of a ``[BN, NG, 4]`` tile in layout ``L``."""
        g = gl.expand_dims(gl.expand_dims(gl.arange(0, NG, layout=gl.SliceLayout(0, gl.SliceLayout(2, L))), 0), 2)
        i = gl.expand_dims(gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L))), 0), 1)
        return g, i

    @gluon.jit
    def _issue(wp, dst, n3, K: gl.constexpr, step, ok, L: gl.constexpr, NG: gl.constexpr):
        """Start K step ``step``'s copies: rows ``n3 [BN, 1, 1]`` (int64) of the packed ``[*, K/2]`` stack, columns
        ``[32 NG step, + 32 NG)``, as int32 words ``[BN, NG, 4]`` into ``dst`` (``ok`` false: zeros, nothing
        read)."""
        g, i = _words(L, NG)
        ptr = wp.to(gl.pointer_type(gl.int32)) + n3 * (K // 8) + step * (4 * NG) + g * 4 + i
        async_copy.async_copy_global_to_shared(dst, ptr, mask=(g < NG) & ok, cache_modifier=".cg")  # g < NG: all

    @gluon.jit
    def _issue_scales(ws, n0, K: gl.constexpr, BN: gl.constexpr, NG: gl.constexpr):
        """Allocate and start filling a program's scale bytes (rows ``[n0, n0 + BN)`` of the ``[*, K/32]`` scale
        stack) -> their buffer viewed as ``[SP, BN, NG]`` (step ``s``, row ``r``, group ``g``: column ``s NG + g``;
        ``SP``: the steps rounded up to a power of two). Copied as ``[SP * BN, NG]`` rows, 4 bytes per copy (where the
        layout covers more rows than there are, Triton predicates the redundant warps' copies off: PTX checked)."""
        STEPS: gl.constexpr = K // (32 * NG)
        SP: gl.constexpr = _pow2(STEPS)  # aranges and buffers are powers of two; rows of steps past K: zeros
        SL: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0])
        buf = gl.allocate_shared_memory(gl.uint8, [SP * BN, NG], SL)
        LS: gl.constexpr = gl.BlockedLayout([1, 4], [128 // NG, NG // 4], [gl.num_warps(), 1], [1, 0])
        q = gl.expand_dims(gl.arange(0, SP * BN, layout=gl.SliceLayout(1, LS)), 1)  # [SP * BN, 1]: s BN + r
        g = gl.expand_dims(gl.arange(0, NG, layout=gl.SliceLayout(0, LS)), 0)  # [1, NG]
        async_copy.async_copy_global_to_shared(buf, ws + (n0 + q % BN).to(gl.int64) * (K // 32) + (q // BN) * NG + g,
                                               mask=(q < STEPS * BN) & (g < NG))
        return buf._reinterpret(gl.uint8, [SP, BN, NG], SL)

    @gluon.jit
    def _group_sums(w, sc, c0, xa, xf, L: gl.constexpr, NG: gl.constexpr):
        """:func:`fp4_moe_gemv._group_sums` in the ``[BN, NG, 4]`` layout: one K step of one matrix (words ``w``,
        scale bytes ``sc [BN, NG]`` int32) against the activation row ``xa``/``xf`` -> each group's sum of exact
        products times its weight and activation factors, ``[BN, NG]``."""
        g, i = _words(L, NG)
        xo = xa + c0 + g * 4 + i  # [1, NG, 4]: nibble 0's activations (the same in every row)
        p = e2m1_nibble(w, 0) * gl.load(xo)
        for m in gl.static_range(1, 8):
            p += e2m1_nibble(w, m) * gl.load(xo + 4 * NG * m)
        s = gl.sum(p, axis=2)  # [BN, NG]: a group's 4 words lie in one thread
        f1, f2 = e2m1_factors(sc)
        gx = gl.expand_dims(gl.arange(0, NG, layout=gl.SliceLayout(0, gl.SliceLayout(2, L))), 0)  # [1, NG]
        fx = gl.load(xf + c0 // 32 + gx)
        return s * (f1 * fx) * f2

    @gluon.jit
    def _gate_up_kernel(xa_ptr, xf_ptr, tok_ptr, wt_ptr, e_ptr, w1p, w1s, w3p, w3s, h_ptr, D: gl.constexpr,
                        I: gl.constexpr, LIMIT: gl.constexpr, NG: gl.constexpr, E: gl.constexpr, NS: gl.constexpr,
                        GT: gl.constexpr):
        """:func:`fp4_moe_gemv._gate_up_gemv` (same arguments and output) with ``NS - 1`` K steps of both matrices'
        words in flight by ``cp.async``."""
        L: gl.constexpr = _layout(NG, GT, gl.num_warps())
        BN: gl.constexpr = gl.num_warps() * 32 * GT // NG
        STEPS: gl.constexpr = D // (32 * NG)
        b = gl.program_id(0)
        ex = gl.load(e_ptr + b)
        if ex < 0 or ex >= E:  # another device's expert: no work (stage 2 writes its zeros)
            return
        n0 = ex * I + gl.program_id(1) * BN
        r1 = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
        n3 = _x3(n0.to(gl.int64) + r1.to(gl.int64))  # [BN, 1, 1] rows of the [E*I, D/2] stacks
        WS: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0])
        bg = gl.allocate_shared_memory(gl.int32, [NS, BN, NG, 4], WS)
        bu = gl.allocate_shared_memory(gl.int32, [NS, BN, NG, 4], WS)
        sg = _issue_scales(w1s, n0, D, BN, NG)
        su = _issue_scales(w3s, n0, D, BN, NG)
        async_copy.commit_group()
        for j in gl.static_range(NS - 1):
            _issue(w1p, bg.index(j), n3, D, j, j < STEPS, L, NG)
            _issue(w3p, bu.index(j), n3, D, j, j < STEPS, L, NG)
            async_copy.commit_group()
        async_copy.wait_group(NS - 1)  # the scale bytes (every thread's copies) ...
        gl.thread_barrier()  # ... are visible to every thread
        tok = gl.load(tok_ptr + b).to(gl.int64)
        xa = xa_ptr + tok * D
        xf = xf_ptr + tok * (D // 32)
        acc_g = gl.zeros([BN, NG], gl.float32, gl.SliceLayout(2, L))
        acc_u = gl.zeros([BN, NG], gl.float32, gl.SliceLayout(2, L))
        for s in range(STEPS):
            nx = s + NS - 1  # the step whose copies start now, into the stage read one step ago
            _issue(w1p, bg.index(nx % NS), n3, D, nx, nx < STEPS, L, NG)
            _issue(w3p, bu.index(nx % NS), n3, D, nx, nx < STEPS, L, NG)
            async_copy.commit_group()
            async_copy.wait_group(NS - 1)  # step s's words (this thread's own copies) have landed
            st = s % NS
            c0 = s * 32 * NG
            LSC: gl.constexpr = gl.SliceLayout(2, L)
            acc_g += _group_sums(bg.index(st).load(L), sg.index(s).load(LSC).to(gl.int32), c0, xa, xf, L, NG)
            acc_u += _group_sums(bu.index(st).load(L), su.index(s).load(LSC).to(gl.int32), c0, xa, xf, L, NG)
        wt = gl.load(wt_ptr + b)
        a = swiglu_act(gl.sum(acc_g, axis=1), gl.sum(acc_u, axis=1), wt, LIMIT)  # [BN]
        col = gl.program_id(1) * BN + r1
        gl.store(h_ptr + b.to(gl.int64) * I + col, a.to(h_ptr.dtype.element_ty))

    @gluon.jit
    def _down_kernel(ha_ptr, hf_ptr, e_ptr, w2p, w2s, y_ptr, D: gl.constexpr, I: gl.constexpr, NG: gl.constexpr,
                     E: gl.constexpr, NS: gl.constexpr, GT: gl.constexpr):
        """:func:`fp4_moe_gemv._down_gemv` (same arguments and output) with ``NS - 1`` K steps in flight."""
        L: gl.constexpr = _layout(NG, GT, gl.num_warps())
        BN: gl.constexpr = gl.num_warps() * 32 * GT // NG
        STEPS: gl.constexpr = I // (32 * NG)
        b = gl.program_id(0)
        r1 = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
        col = gl.program_id(1) * BN + r1
        ex = gl.load(e_ptr + b)
        if ex < 0 or ex >= E:
            zero = gl.zeros([BN], gl.float32, gl.SliceLayout(1, gl.SliceLayout(2, L)))
            gl.store(y_ptr + b.to(gl.int64) * D + col, zero.to(y_ptr.dtype.element_ty))
            return
        n0 = ex * D + gl.program_id(1) * BN
        n3 = _x3(n0.to(gl.int64) + r1.to(gl.int64))  # [BN, 1, 1] rows of the [E*D, I/2] stack
        bw = gl.allocate_shared_memory(gl.int32, [NS, BN, NG, 4], gl.SwizzledSharedLayout(1, 1, 1, order=[2, 1, 0]))
        sw = _issue_scales(w2s, n0, I, BN, NG)
        async_copy.commit_group()
        for j in gl.static_range(NS - 1):
            _issue(w2p, bw.index(j), n3, I, j, j < STEPS, L, NG)
            async_copy.commit_group()
        async_copy.wait_group(NS - 1)
        gl.thread_barrier()
        ha = ha_ptr + b.to(gl.int64) * I
        hf = hf_ptr + b.to(gl.int64) * (I // 32)
        acc = gl.zeros([BN, NG], gl.float32, gl.SliceLayout(2, L))
        for s in range(STEPS):
            nx = s + NS - 1
            _issue(w2p, bw.index(nx % NS), n3, I, nx, nx < STEPS, L, NG)
            async_copy.commit_group()
            async_copy.wait_group(NS - 1)
            acc += _group_sums(bw.index(s % NS).load(L), sw.index(s).load(gl.SliceLayout(2, L)).to(gl.int32),
                               s * 32 * NG, ha, hf, L, NG)
        y = round_bf16(gl.sum(acc, axis=1))  # [BN]
        gl.store(y_ptr + b.to(gl.int64) * D + col, y.to(y_ptr.dtype.element_ty))


def _grid_meta(p: dict, E: int) -> dict:
    return dict(NG=p["NG"], E=E, NS=p["NS"], GT=p["GT"])


def launch_jax(x, tok, wt, e, w1, w2, w3, limit: float, p1: dict | None = None, p2: dict | None = None):
    """Both kernels inside ``jit`` (:func:`fp4_moe_gemv.launch_gemv_jax`'s contract: ``x [T, D]`` bf16 tokens,
    ``tok, wt, e [R]`` -> ``y [R, D]`` bf16, zeros for other devices' pairs); ``p1``/``p2``: the stages' plans
    (default :func:`plan`)."""
    import jax_triton as jt

    from dsv4_jax.kernels import gluon_route

    gluon_route.install()
    E, I, D2 = w1.packed.shape
    D, R = 2 * D2, tok.shape[0]
    p1, p2 = p1 or plan("gate_up", D, I, R), p2 or plan("down", D, I, R)
    check_plan("gate_up", D, I, p1)
    check_plan("down", I, D, p2)
    xa, xf = act_words_triton(x, p1["NG"])
    h = jt.triton_call(xa, xf, tok, wt, e, w1.packed, w1.scale, w3.packed, w3.scale, kernel=_gate_up_kernel,
                       out_shape=jax.ShapeDtypeStruct((R, I), jnp.bfloat16), grid=(R, I // rows(p1)), D=D, I=I,
                       LIMIT=limit, num_warps=p1["num_warps"], num_stages=1, **_grid_meta(p1, E))
    ha, hf = act_words_triton(h, p2["NG"])  # rows of other devices' pairs are unwritten here and never read
    return jt.triton_call(ha, hf, e, w2.packed, w2.scale, kernel=_down_kernel,
                          out_shape=jax.ShapeDtypeStruct((R, D), jnp.bfloat16), grid=(R, D // rows(p2)), D=D, I=I,
                          num_warps=p2["num_warps"], num_stages=1, **_grid_meta(p2, E))


def launch_torch(x, tok, wt, e, w1, w2, w3, limit: float, p1: dict | None = None, p2: dict | None = None):
    """The kernels on CUDA torch tensors (the GPU tests): :func:`fp4_moe_gemv.launch_gemv_torch`'s contract (``w*``:
    ``(packed, scale)`` uint8 tensors) -> ``(h [R, I], y [R, D])`` fp32."""
    import torch

    E, I, D2 = w1[0].shape
    D, R = 2 * D2, tok.shape[0]
    p1, p2 = p1 or plan("gate_up", D, I, R), p2 or plan("down", D, I, R)
    check_plan("gate_up", D, I, p1)
    check_plan("down", I, D, p2)
    h = torch.full((R, I), float("nan"), dtype=torch.float32, device=x.device)
    y = torch.full((R, D), float("nan"), dtype=torch.float32, device=x.device)
    xa, xf = act_words_torch(x, p1["NG"], dict(NB=1, num_warps=1))
    _gate_up_kernel[(R, I // rows(p1))](xa, xf, tok, wt, e, *w1, *w3, h, D=D, I=I, LIMIT=limit,
                                        num_warps=p1["num_warps"], **_grid_meta(p1, E))
    ha, hf = act_words_torch(torch.nan_to_num(h), p2["NG"], dict(NB=1, num_warps=1))
    _down_kernel[(R, D // rows(p2))](ha, hf, e, *w2, y, D=D, I=I, num_warps=p2["num_warps"], **_grid_meta(p2, E))
    return h, y

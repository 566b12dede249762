"""Exact top-k over long rows of bf16 values by radix selection (the indexer's selection at long context).

Public function :func:`top_k`: ``(x [..., N] bf16, k) -> (values [..., k], ids [..., k] int32)``, equal to
``jax.lax.top_k(x, k)`` bit for bit: the ``k`` largest values of each row, largest first, equal values lowest id
first, in the IEEE total order ``jax.lax.top_k`` sorts by (``-0.0`` below ``+0.0``; NaNs by their bits: a positive NaN
above ``+inf``). The reference is ``jax.lax.top_k`` itself (the CPU path).

Why: the indexer's decode call scores every compressed entry of a row (262,144 at a 1M-token V4-Flash context) and
keeps the top 512. On a GPU ``jax.lax.top_k`` with so large a ``k`` becomes a sort of the whole row: at batch 32 that
was 0.49 ms per CSA layer and step (two levels of 4,096, :func:`dsv4_jax.kernels.indexer.top_k_two_level`) against
0.14 ms for scoring the 570 MB of keys (H200, ``profile_decode.py --max-len 1048576``, 2026-12-03). Selecting needs
no sort: four passes over the row, each a read of its 2 bytes per entry.

Algorithm (per row, ``P`` programs of ``CH`` entries each; a bf16 value's 16 bits map to an order-preserving key
``u`` in ``[0, 65535]``, see :func:`_ukey`):

1. ``_hist_kernel`` (high byte): every program histograms ``u >> 8`` of its entries into 256 bins and adds them to
   the row's histogram ``H1`` (integer atomics: the sums, not their order, are the result).
2. ``_hist_kernel`` (low byte): every program finds from ``H1`` the high byte ``d1`` that holds the ``k``-th largest
   key (:func:`_digit`) and histograms ``u & 255`` of its entries whose high byte is ``d1`` into ``H2``.
3. ``_count_kernel``: the threshold ``T = 256 d1 + d2`` (``d2`` from ``H2`` likewise); ``n_gt`` keys lie above it
   and the ``n_eq = k - n_gt`` ties at ``T`` with the lowest ids complete the set. Every program counts its entries
   above and at ``T`` (``G``, ``E [R, P]``).
4. ``_write_kernel``: every program writes the ids of its entries above ``T`` at slots ``[0, n_gt)`` and of its ties
   whose rank in id order is below ``n_eq`` at slots ``[n_gt, k)``, ranks from the counts of the programs before it
   and a prefix sum inside each block: deterministic.

Then XLA sorts the ``k`` chosen ids by (key descending, id ascending), which is ``jax.lax.top_k``'s order, and
gathers their values. Bytes: 4 reads of the row (2 bytes per entry); no sort of the row.

Portability: plain loads, ``tl.histogram``, ``tl.cumsum`` and integer ``tl.atomic_add``; no dot, no inline
assembly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.kernels import SM_COUNT, arch, next_pow2, triton_call, use_opt_in_triton, use_triton

try:  # the model imports this module; triton is optional (kernels="reference" needs none of it)
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only without the triton extra
    triton = tl = None


def top_k_reference(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k``: the definition (values, int32 ids)."""
    return jax.lax.top_k(x, k)


def ukey(bits: jax.Array) -> jax.Array:
    """Int32 key in ``[0, 65535]`` of bf16 values given as their int16 bit patterns, ordered as the IEEE total order
    orders the values (negative values' magnitude bits flipped, then offset by 2**15): the kernels' :func:`_ukey`."""
    b = bits.astype(jnp.int32)
    return (b ^ ((b >> 15) & 0x7FFF)) + 32768


# ---------------------------------------------------------------------------------------------- kernels
if triton is not None:
    @triton.jit
    def _ukey(x_ptr, row, j, N: tl.constexpr):
        """Keys ``u`` ``[BLOCK]`` int32 of entries ``j`` of ``row`` (bf16 bit patterns as int16; 0 past ``N``, the
        callers mask those), as :func:`ukey`: ordered as the values in the IEEE total order."""
        b = tl.load(x_ptr + row.to(tl.int64) * N + j, mask=j < N, other=0).to(tl.int32)  # sign-extended
        return (b ^ ((b >> 15) & 0x7FFF)) + 32768

    @triton.jit
    def _digit(h_ptr, row, need):
        """From a row's 256-bin histogram: the largest bin ``d`` with at least ``need`` entries at or above it (the
        bin of the ``need``-th largest), and how many entries lie in bins above ``d``."""
        d = tl.arange(0, 256)
        h = tl.load(h_ptr + row * 256 + d)
        at_or_above = tl.sum(h, axis=0) - tl.cumsum(h, axis=0) + h  # [256] entries in bins >= d
        sel = tl.max(tl.where(at_or_above >= need, d, -1), axis=0)
        return sel, tl.sum(tl.where(d > sel, h, 0), axis=0)

    @triton.jit
    def _threshold(h1_ptr, h2_ptr, row, K: tl.constexpr):
        """``(T, n_gt)``: the key of the ``K``-th largest entry of ``row`` and the number of keys above it."""
        d1, above1 = _digit(h1_ptr, row, K)
        d2, above2 = _digit(h2_ptr, row, K - above1)
        return d1 * 256 + d2, above1 + above2

    @triton.jit
    def _hist_kernel(x_ptr, h1_ptr, hz_ptr, h_ptr, N: tl.constexpr, K: tl.constexpr, CH: tl.constexpr,
                     BLOCK: tl.constexpr, LOW: tl.constexpr):
        """Program ``(row, p)``: the 256-bin histogram of the high bytes of its ``CH`` entries' keys (``LOW``
        False), or of the low bytes of those whose high byte is the ``K``-th largest's (``LOW``: from ``h1``), added
        to ``h [R, 256]`` (``hz``: the same zeroed buffer, aliased to ``h``)."""
        row = tl.program_id(0)
        j0 = tl.program_id(1) * CH
        if LOW:
            d1, _ = _digit(h1_ptr, row, K)
        hist = tl.zeros((256,), tl.int32)
        for it in range(CH // BLOCK):
            j = j0 + it * BLOCK + tl.arange(0, BLOCK)
            u = _ukey(x_ptr, row, j, N)
            if LOW:
                hist += tl.histogram(u & 255, 256, mask=(j < N) & ((u >> 8) == d1))
            else:
                hist += tl.histogram(u >> 8, 256, mask=j < N)
        d = tl.arange(0, 256)
        tl.atomic_add(h_ptr + row * 256 + d, hist, mask=hist > 0)

    @triton.jit
    def _count_kernel(x_ptr, h1_ptr, h2_ptr, g_ptr, e_ptr, N: tl.constexpr, K: tl.constexpr, CH: tl.constexpr,
                      BLOCK: tl.constexpr, P: tl.constexpr):
        """Program ``(row, p)``: how many of its entries' keys lie above (``g [R, P]``) and at (``e``) the
        threshold."""
        row = tl.program_id(0)
        p = tl.program_id(1)
        t, _ = _threshold(h1_ptr, h2_ptr, row, K)
        ng = 0
        ne = 0
        for it in range(CH // BLOCK):
            j = p * CH + it * BLOCK + tl.arange(0, BLOCK)
            u = _ukey(x_ptr, row, j, N)
            ng += tl.sum(((j < N) & (u > t)).to(tl.int32), axis=0)
            ne += tl.sum(((j < N) & (u == t)).to(tl.int32), axis=0)
        tl.store(g_ptr + row * P + p, ng)
        tl.store(e_ptr + row * P + p, ne)

    @triton.jit
    def _write_kernel(x_ptr, h1_ptr, h2_ptr, g_ptr, e_ptr, ids_ptr, N: tl.constexpr, K: tl.constexpr,
                      CH: tl.constexpr, BLOCK: tl.constexpr, P: tl.constexpr, PP: tl.constexpr):
        """Program ``(row, p)``: the ids of its entries above the threshold at slots ``[0, n_gt)`` of ``ids [R, K]``
        and of its ties ranked (in id order over the row) below ``K - n_gt`` at slots ``[n_gt, K)``; the slots
        follow from the counts ``g``/``e`` of the programs before it and exclusive prefix sums inside each block."""
        row = tl.program_id(0)
        p = tl.program_id(1)
        t, n_gt = _threshold(h1_ptr, h2_ptr, row, K)
        q = tl.arange(0, PP)
        before = (q < p) & (q < P)
        og = tl.sum(tl.where(before, tl.load(g_ptr + row * P + q, mask=q < P, other=0), 0), axis=0)
        oe = tl.sum(tl.where(before, tl.load(e_ptr + row * P + q, mask=q < P, other=0), 0), axis=0)
        out = ids_ptr + row.to(tl.int64) * K
        for it in range(CH // BLOCK):
            j = p * CH + it * BLOCK + tl.arange(0, BLOCK)
            u = _ukey(x_ptr, row, j, N)
            gt = ((j < N) & (u > t)).to(tl.int32)
            eq = ((j < N) & (u == t)).to(tl.int32)
            rg = og + tl.cumsum(gt, axis=0) - gt  # [BLOCK] slot of each entry above T
            re = oe + tl.cumsum(eq, axis=0) - eq  # [BLOCK] rank of each tie among the row's ties
            tl.store(out + rg, j, mask=gt > 0)
            tl.store(out + n_gt + re, j, mask=(eq > 0) & (n_gt + re < K))
            og += tl.sum(gt, axis=0)
            oe += tl.sum(eq, axis=0)

    @triton.jit
    def _sort_kernel(x_ptr, v_ptr, i_ptr, N: tl.constexpr, NP: tl.constexpr, K: tl.constexpr, KP: tl.constexpr):
        """Program ``row``: the ``K`` largest of the row's ``N`` entries (bf16 bit patterns as int16), largest first,
        equal values lowest id first, by one bitonic top-k (``tl.topk``) over ``NP`` (a power of two >= ``N``)
        packed keys ``key = u << 16 | (65535 - id)`` (int32: :func:`_ukey`'s order shifted to a signed ``u``, then the
        id reversed, so that a larger key is a larger value or, for equal values, a lower id; padding entries get
        the smallest int32, below every real key). Writes the values' bit patterns ``v [R, K]`` and ids ``i [R,
        K]``."""
        row = tl.program_id(0).to(tl.int64)
        j = tl.arange(0, NP)
        b = tl.load(x_ptr + row * N + j, mask=j < N, other=0).to(tl.int32)  # sign-extended bit patterns
        u = b ^ ((b >> 15) & 0x7FFF)  # [NP] in [-32768, 32767], ordered as the values in the IEEE total order
        key = tl.where(j < N, (u << 16) | (65535 - j), -2147483648)
        top = tl.topk(key, KP)  # [KP] largest first
        u = top >> 16  # the xor is its own inverse: bits back from the order key
        o = tl.arange(0, KP)
        tl.store(v_ptr + row * K + o, (u ^ ((u >> 15) & 0x7FFF)).to(tl.int16), mask=o < K)
        tl.store(i_ptr + row * K + o, 65535 - (top & 0xFFFF), mask=o < K)


# ---------------------------------------------------------------------------------------------- planning, launch
BLOCK = 1024  # entries per loop step of a program (8 per thread at 4 warps)


PER_SM = 16  # programs per SM the plan aims at over all rows (the passes are latency-bound streams)
MAX_PROGRAMS = 1024  # per row (the write kernel sums up to this many counts per program)


def plan(rows: int, n: int, target: str | None = None) -> dict:
    """Programs per row ``P`` and entries per program ``CH`` (a multiple of :data:`BLOCK`): about :data:`PER_SM`
    programs per SM over all rows, at least one block each. A program's loop is a chain of dependent loads and
    shared-memory histogram updates, so the passes need many programs in flight: with ~2 per SM (29 blocks each at
    batch 32 and 262,144 entries) the call took ~0.25 ms on an H200. The plan never changes the result."""
    target = target or arch()
    blocks = -(-n // BLOCK)
    p = max(1, min(blocks, MAX_PROGRAMS, -(-PER_SM * SM_COUNT[target] // rows)))
    ch = -(-blocks // p) * BLOCK
    p = -(-n // ch)
    return dict(P=p, PP=next_pow2(p), CH=ch, BLOCK=BLOCK, num_warps=4, num_stages=1)


def _check(x, k: int):
    if x.dtype != jnp.bfloat16:
        raise ValueError(f"top_k kernel: values must be bfloat16, got {x.dtype}")
    if not 0 < k <= x.shape[-1]:
        raise ValueError(f"top_k kernel: k={k} must be in [1, {x.shape[-1]}] (the row length)")


def top_k_triton(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """:func:`top_k` by radix selection (module docstring): 4 kernel launches, then a sort of the ``k`` chosen."""
    _check(x, k)
    lead, n = x.shape[:-1], x.shape[-1]
    xr = x.reshape(-1, n)
    R = xr.shape[0]
    p = plan(R, n)
    bits = jax.lax.bitcast_convert_type(xr, jnp.int16)  # [R, n]
    meta = dict(N=n, K=k, CH=p["CH"], BLOCK=p["BLOCK"], num_warps=p["num_warps"], num_stages=p["num_stages"])
    grid = (R, p["P"])
    hist = jax.ShapeDtypeStruct((R, 256), jnp.int32)
    zeros = jnp.zeros((R, 256), jnp.int32)  # the histograms are atomic sums into zeroed buffers (aliased)
    h1 = triton_call(bits, bits, zeros, kernel=_hist_kernel, out_shape=hist, grid=grid,
                     input_output_aliases={2: 0}, LOW=False, **meta)
    h2 = triton_call(bits, h1, jnp.zeros((R, 256), jnp.int32), kernel=_hist_kernel, out_shape=hist, grid=grid,
                     input_output_aliases={2: 0}, LOW=True, **meta)
    cnt = jax.ShapeDtypeStruct((R, p["P"]), jnp.int32)
    g, e = triton_call(bits, h1, h2, kernel=_count_kernel, out_shape=[cnt, cnt], grid=grid, P=p["P"], **meta)
    ids = triton_call(bits, h1, h2, g, e, kernel=_write_kernel, out_shape=jax.ShapeDtypeStruct((R, k), jnp.int32),
                      grid=grid, P=p["P"], PP=p["PP"], **meta)
    key = ukey(jnp.take_along_axis(bits, ids, axis=-1))
    _, ids = jax.lax.sort((-key, ids), num_keys=2)  # key descending, id ascending: jax.lax.top_k's order
    vals = jnp.take_along_axis(xr, ids, axis=-1)
    return vals.reshape(*lead, k), ids.reshape(*lead, k)


SORT_MAX = 8192  # longest rows the one-program sort kernel takes (the packed keys carry 16-bit ids)


def sort_plan(n: int) -> dict:
    """Launch options of :func:`_sort_kernel` for rows of ``n`` entries: the keys padded to a power of two, one
    program per row, 4 keys per thread up to 16 warps (8 warps at 1,024 entries: the sm_90a build runs 1,326
    instructions per thread against 4 warps' 2,055; no spills either way, nor on gfx950). :data:`SORT_WARPS`
    overrides the warps (a benchmark knob; every plan gives the same result)."""
    np_ = next_pow2(max(n, 2))
    return dict(NP=np_, num_warps=SORT_WARPS or min(16, max(4, np_ // 128)), num_stages=1)


SORT_WARPS = 0  # 0: sort_plan's choice


def _check_sort(x, k: int):
    _check(x, k)
    if x.shape[-1] > SORT_MAX:
        raise ValueError(f"top_k sort kernel: rows of {x.shape[-1]} entries exceed SORT_MAX={SORT_MAX} (the radix "
                         "kernels, top_k_triton, take longer rows)")


def top_k_sort_triton(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """:func:`top_k` of rows of at most :data:`SORT_MAX` entries in one kernel launch (one program per row sorts the
    row's packed keys: :func:`_sort_kernel`), bit for bit ``jax.lax.top_k``. For short rows, where the radix
    selection's four launches and XLA's sort of the chosen cost more than the whole row's sort (the indexer at a
    context below 32K tokens: 1,024 entries at 4K)."""
    _check_sort(x, k)
    lead, n = x.shape[:-1], x.shape[-1]
    bits = jax.lax.bitcast_convert_type(x.reshape(-1, n), jnp.int16)  # [R, n]
    R = bits.shape[0]
    p = sort_plan(n)
    v, i = triton_call(bits, kernel=_sort_kernel, out_shape=[jax.ShapeDtypeStruct((R, k), jnp.int16),
                                                             jax.ShapeDtypeStruct((R, k), jnp.int32)],
                       grid=(R,), N=n, NP=p["NP"], K=k, KP=next_pow2(k), num_warps=p["num_warps"],
                       num_stages=p["num_stages"])
    return jax.lax.bitcast_convert_type(v, jnp.bfloat16).reshape(*lead, k), i.reshape(*lead, k)


MIN_ENTRIES = 8192  # "auto": rows at least this long take the kernels (the indexer's kernel threshold, 32K tokens)


def use_kernel(kernels: str, n: int) -> bool:
    """Whether :func:`top_k` selects with the kernels for rows of ``n`` entries: always with ``kernels="triton"``
    (where :func:`use_opt_in_triton` allows), with ``"auto"`` for rows of at least :data:`MIN_ENTRIES` where Triton
    runs."""
    if kernels == "auto":
        return n >= MIN_ENTRIES and use_triton(kernels)
    return use_opt_in_triton(kernels)


def top_k(x: jax.Array, k: int, *, kernels: str = "reference",
          fallback=top_k_reference) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k(x, k)`` over the last axis (see the module docstring): the radix-selection kernels for bf16
    rows where :func:`use_kernel` says so, else ``fallback`` (default ``jax.lax.top_k``; the indexer passes its
    two-level form, the same result)."""
    if x.dtype == jnp.bfloat16 and use_kernel(kernels, x.shape[-1]):
        return top_k_triton(x, k)
    return fallback(x, k)


# ---------------------------------------------------------------------------------------------- torch launcher
def run_torch(bits, k: int, target: str = "cpu"):
    """The four kernels on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``bits [R, N]`` int16 (bf16 bit
    patterns) -> the chosen ids ``[R, k]`` int32 in slot order (not yet sorted)."""
    import torch

    R, n = bits.shape
    p = plan(R, n, target)
    meta = dict(N=n, K=k, CH=p["CH"], BLOCK=p["BLOCK"], num_warps=p["num_warps"], num_stages=p["num_stages"])
    grid = (R, p["P"])
    dev = bits.device
    h1 = torch.zeros((R, 256), dtype=torch.int32, device=dev)
    h2 = torch.zeros((R, 256), dtype=torch.int32, device=dev)
    _hist_kernel[grid](bits, h1, h1, h1, LOW=False, **meta)
    _hist_kernel[grid](bits, h1, h2, h2, LOW=True, **meta)
    g = torch.full((R, p["P"]), -1, dtype=torch.int32, device=dev)
    e = torch.full((R, p["P"]), -1, dtype=torch.int32, device=dev)
    _count_kernel[grid](bits, h1, h2, g, e, P=p["P"], **meta)
    ids = torch.full((R, k), -1, dtype=torch.int32, device=dev)
    _write_kernel[grid](bits, h1, h2, g, e, ids, P=p["P"], PP=p["PP"], **meta)
    return ids


def run_sort_torch(bits, k: int):
    """:func:`_sort_kernel` on torch tensors (CI: under ``TRITON_INTERPRET=1``): ``bits [R, N]`` int16 -> ``(v [R, k]
    int16 bit patterns, ids [R, k] int32)``, largest first."""
    import torch

    R, n = bits.shape
    p = sort_plan(n)
    v = torch.full((R, k), -1, dtype=torch.int16, device=bits.device)
    i = torch.full((R, k), -7, dtype=torch.int32, device=bits.device)
    _sort_kernel[(R,)](bits, v, i, N=n, NP=p["NP"], K=k, KP=next_pow2(k), num_warps=p["num_warps"],
                       num_stages=p["num_stages"])
    return v, i

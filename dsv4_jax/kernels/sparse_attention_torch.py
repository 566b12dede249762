"""Torch launchers of the sparse-attention kernels (:mod:`dsv4_jax.kernels.sparse_attention`): the kernels on torch
tensors, without JAX or XLA, for the interpreter tests (``TRITON_INTERPRET=1``), the probes
(``scripts/probe_kernels.py``) and the warp-specialised kernel's launcher (:mod:`sparse_attention_ws`, which shares
the merge). The metaparameters, grids and plans are :mod:`sparse_attention`'s own, as its jax launcher takes them;
torch is imported inside the functions only.
"""

from __future__ import annotations

import os

from dsv4_jax.kernels.sparse_attention import _combine_kernel, _grid, _merge_grid, _meta, _sparse_attn_kernel


def run_torch(q, sources: list, fp8: bool, idx, sink, W: int, NC: int, scale: float, p: dict, rope=None):
    """Launch the kernel(s) on torch tensors (CI: under ``TRITON_INTERPRET=1``). ``sources``: three tuples
    (codes, scales, rope) or (values, dummy, dummy) for ring, chunk, compressed; ``p``: a :func:`sparse_attention.plan`
    for this ``K``; ``rope``: ``(cos, sin)`` fp32 ``[B*S, rd/2]`` for the merge's inverse RoPE (split plans). Returns o
    ``[B,S,H,Dh]`` fp32."""
    import torch

    B, S, H, Dh = q.shape
    K = idx.shape[-1]
    flat = [t for src in sources for t in src]
    DN = sources[0][0].shape[-1] if fp8 else Dh
    meta = _meta(q.shape, W, NC, K, fp8, DN, scale, p, sources[0][1].shape[-1] if fp8 else None)
    n_main = _grid(q.shape, p)[0]
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    nan = lambda *s, dt=torch.float32: torch.full(s, float("nan"), dtype=dt, device=q.device)  # noqa: E731
    R, sp = B * S, p["SPLIT"]
    if sp == 1:
        o = nan(B, S, H, Dh)
        _sparse_attn_kernel[(n_main,)](q, idx, sink, *flat, o, o, o, INTERPRET=interp, **meta)
        return o
    acc, m, l = nan(R, sp, H, Dh), nan(R, sp, H), nan(R, sp, H)
    _sparse_attn_kernel[(n_main,)](q, idx, sink, *flat, acc, m, l, INTERPRET=interp, **meta)
    return merge_torch(acc, m, l, sink, q.shape, p, rope)


def merge_torch(acc, m, l, sink, q_shape, p: dict, rope=None):
    """:func:`_combine_kernel` on torch tensors: the split workspace ``acc [B*S, SPLIT, H, Dh]``, ``m``, ``l`` ->
    o ``[B, S, H, Dh]`` fp32, with the merge tile ``p["SP2"]``, ``p["DCC"]`` (:func:`sparse_attention.merge_tile`)
    and the inverse RoPE of ``rope`` (see :func:`run_torch`)."""
    import torch

    B, S, H, Dh = q_shape
    o = torch.full((B, S, H, Dh), float("nan"), dtype=torch.float32, device=acc.device)
    cs, sn = rope if rope is not None else (torch.zeros(1, device=acc.device), torch.zeros(1, device=acc.device))
    _combine_kernel[(_merge_grid(q_shape, p["DCC"]),)](acc, m, l, sink, cs, sn, o, H=H, DH=Dh, SPLIT=acc.shape[1],
                                                       SP2=p["SP2"], DCC=p["DCC"],
                                                       RD=0 if rope is None else 2 * cs.shape[-1], num_warps=4,
                                                       num_stages=1)
    return o

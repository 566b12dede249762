"""``load_weights``: an official HF-release checkpoint directory -> the weight pytree, one tensor at a time.

Every expected tensor (from the weight declarations, MTP included) is checked for presence, shape and dtype before
anything is read; all problems are reported together in one :class:`CheckpointError`. Tensors keep their on-disk
formats (FP8 e4m3 + e8m0 block scales, packed FP4 + e8m0 scales); only ``tid2eid`` is narrowed from int64 to int32.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from dsv4_jax.config import Config
from dsv4_jax.convert.safetensors_io import CheckpointError, SafetensorsCheckpoint
from dsv4_jax.modeling.weights import Decl, Fp4Tensor, Fp8Tensor, checkpoint_tensors, materialize, weight_decls


def validate_checkpoint(ckpt: SafetensorsCheckpoint, cfg: Config) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected or mis-shaped tensor."""
    expected = {name: (dt, tuple(shape)) for name, dt, shape in checkpoint_tensors(cfg)}
    problems = []
    missing = [n for n in expected if n not in ckpt.tensors]
    unexpected = [n for n in ckpt.tensors if n not in expected]
    for name, (dt, shape) in expected.items():
        info = ckpt.tensors.get(name)
        if info is not None and (info.dtype != dt or info.shape != shape):
            problems.append(f"  {name}: {info.dtype}{list(info.shape)} in {info.file.name}, expected {dt}{list(shape)}")
    if missing:
        problems.insert(0, f"  missing ({len(missing)}): " + ", ".join(missing[:8])
                        + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.insert(0, f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:8])
                        + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{ckpt.path}: checkpoint does not match the config "
                              f"({cfg.n_layers} layers, {cfg.n_routed_experts} experts, dim {cfg.dim}):\n"
                              + "\n".join(problems))


def _read_leaf(ckpt: SafetensorsCheckpoint, d: Decl, put):
    keys = [d.key.format(e=e) for e in range(d.n_stack)] if d.n_stack else [d.key]
    if d.kind in ("fp8", "fp4"):
        def stacked(suffix):
            arrs = [ckpt.read(k + suffix) for k in keys]
            return np.stack(arrs) if d.n_stack else arrs[0]
        if d.kind == "fp8":
            return Fp8Tensor(q=put(stacked(".weight")), scale=put(stacked(".scale")))
        return Fp4Tensor(packed=put(stacked(".weight")), scale=put(stacked(".scale")))
    a = ckpt.read(keys[0])
    if d.kind == "i32":
        if a.size and (a.min() < 0 or a.max() >= np.iinfo(np.int32).max):
            raise CheckpointError(f"{ckpt.tensors[keys[0]].file}: tensor {keys[0]} has values outside int32")
        a = a.astype(np.int32)
    return put(a)


def load_weights(path: str | Path, cfg: Config | None = None, mesh=None):
    """Load an official DeepSeek-V4 checkpoint directory into the weight pytree (device arrays).

    Args:
      path: directory with ``model.safetensors.index.json`` and shards (names as in the HF release).
      cfg: the config; ``None`` reads ``config.json`` from ``path``.
      mesh: reserved for the sharding module; ``None`` places everything on the default device.
    """
    path = Path(path)
    if cfg is None:
        cfg = Config.from_pretrained(path)
    if mesh is not None:
        raise NotImplementedError("loading onto a mesh comes with dsv4_jax.sharding (issue 5)")
    ckpt = SafetensorsCheckpoint(path)
    validate_checkpoint(ckpt, cfg)

    def put(a: np.ndarray):
        return jax.device_put(np.ascontiguousarray(a))

    return materialize(weight_decls(cfg), lambda d: _read_leaf(ckpt, d, put))

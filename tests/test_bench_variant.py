"""``scripts/bench_common.variant``: the benchmark variants that ``bench_decode.py`` and ``profile_decode.py`` time in
one process. A variant must reach what a jitted step traces (environment knobs and module constants, with JAX's
tracing caches cleared so the step is traced again), must be undone afterwards, and a malformed one must be refused
before anything is timed."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import dsv4_jax.kernels.sparse_attention as sa

_spec = importlib.util.spec_from_file_location("dsv4_bench_common", Path(__file__).parents[1] / "scripts"
                                               / "bench_common.py")
bench_common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_common)


def test_variant_reaches_the_trace_and_is_undone(monkeypatch):
    """An env entry (with '=' in its value) and a module constant apply inside, a jitted function traced before sees
    the new constant (its cache was cleared), and both are restored after, the env variable removed if unset."""
    monkeypatch.delenv("DSV4_MHC_TILE", raising=False)
    before = sa.AUTO_MIN_LIST
    f = jax.jit(lambda x: x + sa.AUTO_MIN_LIST)  # the constant is baked in at trace time
    assert int(f(jnp.int32(0))) == before
    spec = "DSV4_MHC_TILE=NS=256,warps2=4 dsv4_jax.kernels.sparse_attention:AUTO_MIN_LIST=7"
    with bench_common.variant(spec):
        assert os.environ["DSV4_MHC_TILE"] == "NS=256,warps2=4"
        assert sa.AUTO_MIN_LIST == 7
        assert int(f(jnp.int32(0))) == 7
    assert "DSV4_MHC_TILE" not in os.environ
    assert sa.AUTO_MIN_LIST == before
    assert int(f(jnp.int32(0))) == before


def test_variant_restores_after_an_error(monkeypatch):
    """A failure inside the body still restores a variable that was set before."""
    monkeypatch.setenv("DSV4_ROUTER_TILE", "SW=1")
    with pytest.raises(RuntimeError):
        with bench_common.variant("DSV4_ROUTER_TILE=BE=1"):
            raise RuntimeError
    assert os.environ["DSV4_ROUTER_TILE"] == "SW=1"


@pytest.mark.parametrize("spec,needle", [("NOEQUALS", "'NOEQUALS' is neither"),
                                         ("dsv4_jax.kernels.sparse_attention:NO_SUCH=1", "no attribute 'NO_SUCH'"),
                                         ("=3", "'=3' is neither")])
def test_bad_variant_is_named(spec, needle):
    with pytest.raises(ValueError, match=needle):
        with bench_common.variant(spec):
            pass


def test_default_is_nothing(monkeypatch):
    monkeypatch.delenv("DSV4_MHC_TILE", raising=False)
    with bench_common.variant("default"):
        assert "DSV4_MHC_TILE" not in os.environ


def test_device_events_splits_device_and_host(tmp_path):
    """``device_events`` on a Perfetto trace: the matching process's complete events, or with ``host=True`` every
    other process's; metadata, instant events and events without a duration are neither; no match is named."""
    import gzip
    import json

    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
              {"ph": "X", "pid": 1, "name": "fusion.3", "dur": 5.0}, {"ph": "X", "pid": 1, "name": "k", "dur": 2.0},
              {"ph": "X", "pid": 2, "name": "ThunkExecutor::Execute", "dur": 9.0},
              {"ph": "i", "pid": 2, "name": "mark"}, {"ph": "X", "pid": 2, "name": "no-dur"}]
    (tmp_path / "run").mkdir()
    with gzip.open(tmp_path / "run" / "a.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    _, procs, dev = bench_common.device_events(tmp_path, "/device:GPU")
    assert procs == ["/device:GPU:0"] and [e["name"] for e in dev] == ["fusion.3", "k"]
    _, _, host = bench_common.device_events(tmp_path, "/device:GPU", host=True)
    assert [e["name"] for e in host] == ["ThunkExecutor::Execute"]
    with pytest.raises(SystemExit, match="no process matches '/device:TPU'"):
        bench_common.device_events(tmp_path, "/device:TPU")
    spec = importlib.util.spec_from_file_location("dsv4_profile_decode", Path(__file__).parents[1] / "scripts"
                                                  / "profile_decode.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    tab = prof.kernel_table(tmp_path, "/device:GPU", steps=2)  # per step: the totals halved
    assert (tab["kernels_per_step"], tab["busy_us_per_step"]) == (1.0, 3.5)
    assert [(r["kernel"], r["per_step"], r["us_per_step"]) for r in tab["rows"]] == [("fusion", 0.5, 2.5),
                                                                                   ("k", 0.5, 1.0)]
    assert prof.host_table(tmp_path, "/device:GPU", steps=2) == [
        {"event": "ThunkExecutor::Execute", "per_step": 0.5, "us_per_step": 4.5}]


def test_scope_rows_sum_kernels_per_named_scope(tmp_path):
    """``profile_decode.scope_rows``: each device kernel's ``hlo_op`` looked up in the compiled step's ``op_name``
    scopes (cut to three levels), per step; unknown instructions pool under ``(no scope)``, the module span is no
    kernel."""
    import gzip
    import json

    hlo = "\n".join([
        '  %fusion.1 = f32[8]{0} fusion(%a), kind=kLoop, metadata={op_name="jit(step)/layer_0/attn/indexer/max"}',
        '  %dsv4_triton_kernel.2 = f32[8]{0} custom-call(%a), metadata={op_name="jit(f)/layer_0/attn/indexer/x/y"}',
        '  ROOT %fusion.3 = f32[8]{0} fusion(%b), kind=kLoop, metadata={op_name="jit(step)/layer_1/ffn/add"}'])
    scopes = bench_common.op_scopes(hlo)
    assert scopes["fusion.1"] == ["layer_0", "attn", "indexer", "max"]
    events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "name": "loop_fusion", "dur": 4.0, "args": {"hlo_op": "fusion.1"}},
              {"ph": "X", "pid": 1, "name": "_k", "dur": 6.0, "args": {"hlo_op": "dsv4_triton_kernel.2"}},
              {"ph": "X", "pid": 1, "name": "f3", "dur": 2.0, "args": {"hlo_op": "fusion.3"}},
              {"ph": "X", "pid": 1, "name": "memset", "dur": 1.0},
              {"ph": "X", "pid": 1, "name": "XlaModule:step", "dur": 50.0}]
    (tmp_path / "run").mkdir()
    with gzip.open(tmp_path / "run" / "a.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    spec = importlib.util.spec_from_file_location("dsv4_profile_decode", Path(__file__).parents[1] / "scripts"
                                                  / "profile_decode.py")
    prof = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prof)
    rows = prof.scope_rows(tmp_path, scopes, "/device:GPU", steps=2)
    assert [(r["scope"], r["per_step"]) for r in rows] == [("layer_0/attn/indexer", 1.0), ("layer_1/ffn", 0.5),
                                                           ("(no scope)", 0.5)]
    assert [r["us_per_step"] for r in rows] == pytest.approx([5.0, 1.0, 0.5], rel=1e-12)  # us -> ms -> us

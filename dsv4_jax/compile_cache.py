"""JAX's persistent compilation cache for the scripts, and a clock for the time spent compiling.

Every generation program (state constructor, prefill chunks, first sample, decode loop) is compiled by XLA the first
time a process needs it; on a CPU that is most of the time to the first token. With the persistent cache, a later
process with the same programs (same config, batch size, cache length, JAX version and flags) loads the compiled
executables from disk instead. JAX's defaults only cache programs that took more than one second to compile; the
scripts cache every program (the many small ones add up).

:func:`configure` selects the folder (default ``$XDG_CACHE_HOME/dsv4-jax/jax-compile``, else
``~/.cache/dsv4-jax/jax-compile``; ``$JAX_COMPILATION_CACHE_DIR`` wins over the default) or turns the cache off.
:class:`CompileClock` adds up the wall time JAX spends tracing, lowering and compiling (or loading from the cache)
from JAX's monitoring events, so the scripts can report it apart from the time spent computing.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import jax

from dsv4_jax.errors import UserInputError

OFF = "off"
# the spans JAX reports for every program it builds: trace to jaxpr, lower to MLIR, XLA compile (or cache load)
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"


def default_dir() -> Path:
    """``$JAX_COMPILATION_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/dsv4-jax/jax-compile`` (``~/.cache/...``)."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "dsv4-jax" / "jax-compile"


def _writable(folder: Path) -> str | None:
    """None if ``folder`` exists (created if needed) and accepts a file, else the reason."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".dsv4-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def configure(setting: str | None, flag: str = "--compile-cache") -> tuple[Path | None, str]:
    """Turn the persistent compilation cache on (in ``setting``, or :func:`default_dir` when None) or ``"off"``.

    Call it before the first computation of the process (JAX reads these settings when it first compiles).
    Returns ``(folder or None, a one-line description)``. An explicit folder that cannot be written is a
    :class:`UserInputError` naming it; an unwritable default folder only turns the cache off (and says so in the
    description): results never depend on the cache, only the compile time does.
    """
    if setting is not None and setting.strip().lower() == OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None, f"compile cache off ({flag} off): every run compiles its programs again"
    folder = default_dir() if setting is None else Path(setting).expanduser()
    why = _writable(folder)
    if why is not None:
        if setting is not None:
            raise UserInputError(f"{flag} {setting}: cannot write to this folder ({why}); give a writable folder "
                                 f"or '{flag} off'")
        jax.config.update("jax_enable_compilation_cache", False)
        return None, (f"compile cache off: the default folder {folder} is not writable ({why}); choose one with "
                      f"{flag} DIR")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # cache every program, small ones too
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder, f"compile cache: {folder} ({flag} DIR|off to change)"


class CompileClock:
    """Wall time spent building programs (trace + lower + XLA compile or cache load), from JAX's monitoring events.

    ``seconds(t0, t1)`` is the length of the union of those spans inside ``[t0, t1]`` (``time.time()`` clock, as JAX
    records them); nested spans (a jitted function traced inside another) count once. ``hits`` / ``misses`` count
    programs loaded from / written to the persistent cache, ``programs`` all XLA compilations requested. Use as a
    context manager (listeners removed on exit).
    """

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self.hits = 0
        self.misses = 0
        self.programs = 0  # XLA compilations requested (each either compiled or loaded from the cache)
        self._lock = threading.Lock()

    def _on_span(self, event: str, start: float, end: float, **_) -> None:
        if event in COMPILE_EVENTS:
            with self._lock:
                self.spans.append((start, end))
                self.programs += event == COMPILE_EVENTS[-1]

    def _on_event(self, event: str, **_) -> None:
        if event == HIT_EVENT:
            self.hits += 1
        elif event == MISS_EVENT:
            self.misses += 1

    def __enter__(self) -> CompileClock:
        jax.monitoring.register_event_time_span_listener(self._on_span)
        jax.monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc) -> None:
        jax.monitoring.unregister_event_time_span_listener(self._on_span)
        jax.monitoring.unregister_event_listener(self._on_event)

    @staticmethod
    def now() -> float:
        """The clock of the spans (``time.time``)."""
        return time.time()

    def seconds(self, t0: float = float("-inf"), t1: float = float("inf")) -> float:
        """Union length of the compile spans clipped to ``[t0, t1]``."""
        with self._lock:
            spans = sorted((max(a, t0), min(b, t1)) for a, b in self.spans)
        total, end = 0.0, float("-inf")
        for a, b in spans:
            if b <= a:
                continue
            if a > end:
                total += b - a
                end = b
            elif b > end:
                total += b - end
                end = b
        return total

    def describe(self) -> str:
        """E.g. ``"9 programs: 9 from the cache, 0 compiled"``."""
        return f"{self.programs} programs: {self.hits} from the cache, {self.programs - self.hits} compiled"

"""Timing and memory helpers shared by the benchmarks.

Non-obvious choices:
* The host's speed drifts (up to ~3x within minutes on the shared 2-core CPU), so a number is only
  meaningful as a *ratio* to another number taken in the same run. ``interleaved_times`` therefore runs
  every candidate once per round, round-robin, rotating the starting candidate each round so none is
  always first after the others; callers compare medians over rounds.
* One sample is the mean of ``inner`` back-to-back calls (smooths scheduler jitter on a short call);
  the median is then taken over rounds.
* Each sample is taken on two clocks: wall time and this process's CPU time. The machine is shared:
  when other jobs hold the cores, wall time counts the time this process sat descheduled, and with
  several torch threads every parallel op waits at its barrier for the slowest thread (a 2-thread
  step was seen 4x slower than a 1-thread one under load). With one torch thread the CPU time
  excludes both effects and is the steadiest measure of the work a step does; with several threads
  it also counts OpenMP spin-waiting, so use wall time there.
* Activation memory is measured as the bytes autograd *saves for backward* (``saved_tensors_hooks``),
  deduplicated by storage and excluding anything that lives in a parameter (weights are not
  activations). It is deterministic, unlike peak RSS on CPU.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable

import torch


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2, inner: int = 1,
                      progress: Callable[[int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of each fn, ``{name: {"wall": [...], "cpu": [...]}}`` with one sample per round;
    the fns run round-robin in each round. ``cpu`` is this process's CPU time (all threads)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()  # a collection inside one sample would be charged to whichever fn ran then
    try:
        for rnd in range(repeats):
            shift = rnd % len(names)
            for name in names[shift:] + names[:shift]:
                fn = fns[name]
                w0, c0 = time.perf_counter(), time.process_time()
                for _ in range(inner):
                    fn()
                c1, w1 = time.process_time(), time.perf_counter()
                times[name]["wall"].append((w1 - w0) / inner)
                times[name]["cpu"].append((c1 - c0) / inner)
            gc.collect()
            if progress is not None:
                progress(rnd)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))


def iqr(xs: Iterable[float]) -> tuple[float, float]:
    """(25th, 75th) percentiles; with fewer than 4 samples, (min, max)."""
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def saved_tensor_bytes(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> dict[str, int]:
    """Bytes autograd saves for backward while ``fn()`` runs (the forward), counted once per storage.

    ``exclude``: tensors whose storages are not counted (the parameters, frozen or not). Returns
    ``{"bytes": total, "tensors": how many distinct storages}``. The graph built by ``fn`` is dropped.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr not in skip:
            seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return {"bytes": sum(seen.values()), "tensors": len(seen)}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision(path: str = ".", pathspec: str = "lmoe") -> str:
    """HEAD's short hash of the checkout holding ``path``, with "+modified" when ``pathspec`` (the code being
    measured) differs from HEAD; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", path, *args], capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        if not head:
            return "unknown"
        return head + ("+modified" if git("status", "--porcelain", "--", pathspec) else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, object]:
    return {
        "git": git_revision(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
    """A GitHub markdown table; numbers are printed as given (format them before)."""
    cells = [[str(c) for c in row] for row in [headers] + rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])

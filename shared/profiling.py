"""CPU profiles of a service's threads, for the benchmarks: KPI_PROFILE=<directory>.

Each profiled thread (the consumer's worker and connection threads) runs under cProfile
with `time.thread_time` as its clock, so what the profile shows is the CPU that thread
spent, not the time it waited for PostgreSQL, RabbitMQ or a machine busy with other work.
The profile is written when the thread ends (SIGTERM), as
`<directory>/<service>.<thread>.prof` (pstats format). The profiler costs CPU itself:
figures taken with it on are inflated, so the benchmarks measure with it off.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import ContextManager


def profiled(directory: str | None, service: str, thread: str) -> ContextManager[None]:
    """Profile the calling thread for the block when `directory` is set."""
    return _profiled(Path(directory), service, thread) if directory else nullcontext()


@contextmanager
def _profiled(directory: Path, service: str, thread: str) -> Iterator[None]:
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        directory.mkdir(parents=True, exist_ok=True)
        profiler.dump_stats(directory / f"{service}.{thread}.prof")


def top_functions(paths: list[Path], limit: int = 15) -> str:
    """The functions that took the most CPU of their own (tottime) in these profiles,
    then the most cumulative CPU, as text."""
    existing = [str(p) for p in paths if p.exists()]
    if not existing:
        return "(no profile written)"
    out = io.StringIO()
    stats = pstats.Stats(*existing, stream=out)
    stats.strip_dirs()
    total = sum(tt for _cc, _nc, tt, _ct, _callers in stats.stats.values())  # type: ignore[attr-defined]
    out.write(f"total CPU in profiled threads: {total:.2f} s\n")
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)
    # pstats' banner lines (each file's name and date, "Ordered by") are noise here.
    return "\n".join(line for line in out.getvalue().splitlines()
                     if line.strip() and ".prof" not in line and "function calls" not in line
                     and not line.lstrip().startswith(("Ordered by", "List reduced")))

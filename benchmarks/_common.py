"""Shared helpers of the benchmarks: machine description, timing, progress bars and atomic result writing.

Benchmarks are scripts (``python benchmarks/<name>.py``); they import this module as ``_common`` (the script's
folder is first on ``sys.path``). Nothing here depends on bsnn internals, so a benchmark keeps working while the
package changes.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

ROOT = Path(__file__).resolve().parents[1]
"""The repository root (benchmarks/ lives directly under it)."""


# ----------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def git_state(root: Path = ROOT) -> dict:
    """``{'commit', 'dirty', 'dirty_paths'}`` of the repository (``None`` values when git is unavailable)."""
    def run(*args: str) -> str | None:
        try:  # strip newlines only: porcelain lines start with a status column that may be a space
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip("\n")
        except (OSError, subprocess.SubprocessError):
            return None

    status = run("status", "--porcelain", "--untracked-files=no")
    paths = [line[3:] for line in (status or "").splitlines()]
    commit = run("rev-parse", "HEAD")
    return {"commit": commit.strip() if commit else None, "dirty": None if status is None else bool(status),
            "dirty_paths": paths[:20]}


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (``None`` where unsupported)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine_info(extra_packages: Iterable[str] = ("spikingjelly",)) -> dict:
    """Describe the machine and software a benchmark ran on.

    Returns:
        CPU model, logical cores, cores usable by this process, torch threads, memory, OS, Python, torch (and
        ``extra_packages``) versions, bsnn git commit, CUDA availability and the load average at call time
        (other processes sharing the CPU distort wall times: read timings with it).
    """
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "bsnn": _version("bsnn"),
        "git": git_state(),
        "load_average_at_start": load_average(),
    }
    for pkg in extra_packages:
        info[pkg] = _version(pkg)
    return info


def machine_markdown(info: dict) -> str:
    """One short markdown paragraph describing ``info`` from :func:`machine_info`."""
    pkgs = ", ".join(f"{k} {info[k]}" for k in ("torch", "spikingjelly", "bsnn") if info.get(k))
    git = info.get("git") or {}
    commit = (git.get("commit") or "?")[:10] + (" (dirty)" if git.get("dirty") else "")
    return (f"{info['cpu_model']}, {info['logical_cores']} logical cores ({info['usable_cores']} usable, "
            f"torch threads {info['torch_threads']}), {info.get('memory_gib')} GiB RAM, "
            f"CUDA {'available' if info.get('cuda_available') else 'not used'}; Python {info['python']}, {pkgs}; "
            f"bsnn commit {commit}. Load average (1/5/15 min) at start: {info.get('load_average_at_start')}"
            + (f", at end: {info['load_average_at_end']}" if info.get("load_average_at_end") else "") + ".")


# ----------------------------------------------------------------------------------------- command, time
def command_line() -> str:
    """The command that started this process, with the script path relative to the repository root."""
    argv = list(sys.argv)
    try:
        argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
    except ValueError:
        pass
    return shlex.join(["python", *argv])


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class Timer:
    """``with Timer() as t: ...`` then ``t.s`` holds the elapsed wall time in seconds (``time.perf_counter``)."""

    def __init__(self) -> None:
        self.s = 0.0
        self._t0 = 0.0

    def __enter__(self) -> "Timer":
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.s = time.perf_counter() - self._t0


def progress(iterable: Iterable, **kwargs) -> Iterator:
    """tqdm progress bar that stays readable in a log file: updates at most every 30 s when stderr is not a TTY."""
    from tqdm.auto import tqdm

    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def log(msg: str) -> None:
    """Timestamped line on stdout (flushed, so ``nohup`` logs are live)."""
    print(f"[{_dt.datetime.now().strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------- writing
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` via a temporary file in the same folder and ``os.replace`` (never a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_results(out_dir: str | os.PathLike, stem: str, payload: dict, markdown: str) -> dict[str, Path]:
    """Atomically write ``<out_dir>/<stem>.json`` (``payload``) and ``<out_dir>/<stem>.md`` (``markdown``)."""
    out_dir = Path(out_dir)
    return {"json": atomic_write_text(out_dir / f"{stem}.json",
                                      json.dumps(payload, indent=2, default=_json_default) + "\n"),
            "md": atomic_write_text(out_dir / f"{stem}.md", markdown.rstrip() + "\n")}


def markdown_table(headers: list[str], rows: list[list]) -> str:
    """GitHub markdown table (floats with 2 decimals), as :func:`bsnn.report.markdown_table`."""
    try:
        from bsnn.report import markdown_table as _mt
    except ImportError:  # keep benchmarks usable while bsnn.report is being edited
        _mt = None
    if _mt is not None:
        return _mt(headers, rows)

    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]) + "\n"


# ----------------------------------------------------------------------------------------- models
def relu_model(*paths: Path) -> Path | None:
    """The first existing bsnn model file among ``paths`` whose activations are plain ReLU, or None.

    spikingjelly's converters and the plain-conversion baselines need ReLU networks; the default pipeline's student
    has QCFS activations since the latency ablation, so ``runs/default/student.pt`` is skipped then.
    """
    from bsnn.io import load_checkpoint

    for p in paths:
        if Path(p).is_file():
            arch = load_checkpoint(p).get("arch") or {}
            if (arch.get("activation") or {"kind": "relu"}).get("kind", "relu") == "relu":
                return Path(p)
    return None

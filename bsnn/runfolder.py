"""The run folder behind ``bsnn run`` and the stage commands: its lock, its stage records, and what ``--resume``,
``--overwrite`` and reuse may do to it.

Guarantees (tested in ``tests/test_runfolder.py``):

* **One writer.** The process working on a folder holds ``run.lock`` (an ``flock``, which the kernel releases
  when the process dies, however it dies). A second writer is refused with the holder's pid, host, start time and
  command; a lock left behind by a killed process is detected (its ``flock`` is free) and taken over.
* **A stage commits its files and its record together.** A stage writes its output files (atomically), then its
  record in ``metrics.json`` (last, atomically): the stage's metrics entry carries ``record = {outputs: {file:
  sha256}, digest, derived_from}``. A stage is finished only when its record is there and every output still has
  the recorded hash; a file without its record (a run killed in between) is unfinished and is recomputed by
  ``--resume``. ``derived_from`` names the content hash (:func:`bsnn.io.model_digest`) of every model the output
  was made from and the hash of the config sections that shaped it.
* **Nothing stale is kept.** When a stage commits outputs that differ from the ones recorded before, the records
  and files of every later stage (:data:`STAGES`) are removed, checkpoints included.
* **Overwrite is scoped.** ``--overwrite`` deletes, by name, what the command's stage and the later stages produce
  (:data:`STAGES`), nothing else, and refuses an empty ``--out`` or a folder that holds no bsnn run.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import json
import logging
import os
import re
import socket
import sys
import weakref
from pathlib import Path
from typing import Iterable, Sequence

import yaml

from bsnn.config import Config, save_config
from bsnn.distributed import DistEnv, barrier
from bsnn.errors import CheckpointError, ConfigError
from bsnn.io import atomic_write_bytes, atomic_write_json, digest, file_sha256, write_failure

try:
    import fcntl
except ImportError:  # not POSIX: no locking (documented)
    fcntl = None

log = logging.getLogger("bsnn")

LOCK_NAME = "run.lock"
TRAINING_SECTIONS = ("data", "model", "train", "binary", "student", "distill")
TEACHER_SECTIONS = ("data", "model", "train")
#: keys that do not change ``teacher.pt``: ignored when a run's teacher is reused (``bsnn distill``)
TEACHER_INDEPENDENT = {"model": ("teachers", "assistants", "student_init")}


# ----------------------------------------------------------------------------------------- stages
@dataclasses.dataclass(frozen=True)
class Stage:
    """A pipeline stage: the ``metrics.json`` keys and the files (regexes, relative to the run folder) it writes."""

    name: str
    keys: tuple[str, ...]
    files: tuple[str, ...]

    def owns_key(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p in self.keys)

    def owns_file(self, rel: str) -> bool:
        """``rel`` is one of the stage's files, or a temp file of one left by a killed atomic write."""
        for p in self.files:
            folder, _, base = p.rpartition("/")
            prefix = folder + "/" if folder else ""
            if re.fullmatch(p, rel) or re.fullmatch(prefix + r"\." + base + r"\..*tmp.*", rel):
                return True
        return False


#: the stages in pipeline order; a stage's outputs are derived from the earlier stages' outputs
STAGES = (
    Stage("teacher", ("teacher",), (r"teacher\.pt", r"checkpoints/teacher_last\.pt", r"checkpoints/teacher_epoch\d+\.pt")),
    Stage("student", ("student", "online_teacher", r"teacher_\d+", r"assistant_\d+", r"student_gen\d+"),
          (r"student\.pt", r"online_teacher\.pt", r"teacher_\d+\.pt", r"assistant_\d+\.pt", r"student_gen\d+\.pt",
           r"checkpoints/student_last\.pt", r"checkpoints/(teacher|assistant)_\d+_last\.pt",
           r"checkpoints/student_gen\d+_last\.pt", r"teacher_selection\.(md|csv|json)",
           r"knowledge_levels\.(md|csv|json)")),
    Stage("tandem", ("tandem",), (r"student_tandem\.pt", r"checkpoints/tandem_last\.pt")),
    Stage("convert", ("convert",), (r"snn\.pt",)),
    Stage("simulate", ("snn", "snn_constrained", "early_exit"),
          (r"sweep\.(md|csv|json|png)", r"sweep_(constrained|early_exit)\.(md|csv|json)")),
    Stage("cost", ("cost",), (r"cost\.(json|md)", r"cost_(breakdown|vs_T)\.png")),
)
STAGE_INDEX = {s.name: i for i, s in enumerate(STAGES)}


@dataclasses.dataclass
class Entry:
    """What a stage commits under one ``metrics.json`` key: its metrics, the files it wrote (relative to the run
    folder), what they were derived from, and the content hash of the model it produced (if any)."""

    values: dict
    files: list[str]
    derived_from: dict
    digest: str | None = None


#: Fields added after run folders were first written, with their defaults: at the default they are left out of
#: config digests and comparisons, so a folder written before they existed (its config.yaml and records lack them)
#: can still be resumed and reused. Fields added since need no entry: a field the folder's own config.yaml lacks is
#: handled per folder by :func:`legacy_fields` (this list stays, as the digests recorded since it was made use it).
LATER_FIELDS: dict[str, dict] = {
    "train": {"keep_epochs": [], "select_epochs": 0, "bias_lr_scale": 1.0},
    "student": {"keep_epochs": [], "select_epochs": 0, "bias_lr_scale": 1.0},
    "model": {"student_init": None},
    "convert": {"threshold_opt": "none", "offset_correction": "none", "offset_pre_steps": 4, "neuron": "if",
                "max_burst": 2},
}


def _without_later_defaults(section: str, value):
    """``value`` (a section's dict) without the :data:`LATER_FIELDS` of ``section`` that are at their default."""
    later = LATER_FIELDS.get(section, {})
    if not isinstance(value, dict) or not later:
        return value
    return {k: v for k, v in value.items() if not (k in later and v == later[k])}


def config_digest(cfg: Config, keys: Sequence[str], ignore: dict | None = None) -> str:
    """SHA-256 of the config sections (``"data"``) and fields (``"run.seed"``) named by ``keys``, without the
    ``ignore`` fields (``{section: (key, ...)}``) and the :data:`LATER_FIELDS` left at their defaults."""
    d, view = cfg.to_dict(), {}
    for k in keys:
        section, _, field = k.partition(".")
        value = _without_later_defaults(section, d.get(section))
        if field:
            value = (value or {}).get(field)
        view[k] = _without(value, (ignore or {}).get(k, ()))
    return digest(json.loads(json.dumps(view, sort_keys=True, default=str)))


def _read_config(root: Path) -> dict:
    """The run folder's ``config.yaml`` as a dict ({} when it has none)."""
    path = root / "config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def legacy_fields(cfg: Config, saved: dict) -> dict[str, tuple[str, ...]]:
    """``{section: fields}`` of ``cfg`` that the folder's saved config (``saved``, as read from its config.yaml)
    lacks — written by a bsnn without them — and that are at their defaults now: the folder ran with exactly these
    values. They are left out of its config.yaml when it is rewritten, compared as equal, and an old stage record's
    config digest is recomputed without them (:func:`bsnn.pipeline._same_settings`), so such a folder resumes."""
    out = {}
    for f in dataclasses.fields(cfg):
        section, old = getattr(cfg, f.name), saved.get(f.name)
        if not dataclasses.is_dataclass(section) or not isinstance(old, dict):
            continue
        default = type(section)()
        absent = tuple(g.name for g in dataclasses.fields(section)
                       if g.name not in old and getattr(section, g.name) == getattr(default, g.name))
        if absent:
            out[f.name] = absent
    return out


def merge_fields(*groups: dict) -> dict[str, tuple[str, ...]]:
    """The union of several ``{section: fields}`` maps."""
    out: dict[str, tuple[str, ...]] = {}
    for g in groups:
        for k, v in g.items():
            out[k] = tuple(dict.fromkeys((*out.get(k, ()), *v)))
    return out


def _without(section: dict | None, keys: tuple) -> dict | None:
    return section if not isinstance(section, dict) else {k: v for k, v in section.items() if k not in keys}


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------- lock
@dataclasses.dataclass
class _Held:
    fd: int
    path: Path
    count: int


#: run folders this process holds, by real path (a process may open the same folder again, e.g. `bsnn distill`
#: after `bsnn train` in one Python session); the OS lock is taken once and released with the last holder
_HELD: dict[str, _Held] = {}


class RunFolderBusy(ConfigError):
    """Another live process holds the run folder."""


def _read_info(fd: int) -> dict | None:
    try:
        info = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "null")
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _describe(info: dict | None) -> str:
    if not info:
        return "another process (which is just taking the lock)"
    cmd = f", running `{info['command']}`" if info.get("command") else ""
    return f"pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}{cmd}"


class RunLock:
    """Exclusive lock of a run folder (``<folder>/run.lock``), re-entrant within one process.

    The lock is an ``flock`` on ``run.lock``, which names the holder (pid, host, start time, command). The kernel
    drops it when the holder exits or is killed, so a ``run.lock`` left by a killed process is stale: the next
    :meth:`acquire` takes it over and reports the dead holder in :attr:`previous`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.previous: dict | None = None
        self._key: str | None = None

    def acquire(self) -> "RunLock":
        """Take the lock.

        Raises:
            RunFolderBusy: another live process holds it (the message names that process).
            OutputError: ``run.lock`` cannot be created (read-only folder, ...).
        """
        key = os.path.realpath(self.root)
        held = _HELD.get(key)
        if held is not None:
            held.count += 1
            self._key = key
            return self
        if fcntl is None:
            return self
        path = self.root / LOCK_NAME
        for _ in range(50):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise write_failure(path, e) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                info = _read_info(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunFolderBusy(
                        f"run folder {str(self.root)!r} is in use by {_describe(info)}; wait for it to finish or "
                        f"choose another --out (its lock, {LOCK_NAME}, is released when that process ends)") from None
                raise write_failure(path, e) from None
            try:  # the holder may have released (and removed) the file between our open and our flock
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self.previous = _read_info(fd)  # a holder that died without releasing: the lock was stale
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                  "command": " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:300]}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
            except OSError as e:
                os.close(fd)
                raise write_failure(path, e) from None
            _HELD[key] = _Held(fd, path, 1)
            self._key = key
            return self
        raise RunFolderBusy(f"could not lock {str(path)!r}: other processes keep taking and releasing it; retry")

    def release(self) -> None:
        """Release the lock (the last holder in this process removes ``run.lock``). Idempotent."""
        key, self._key = self._key, None
        held = _HELD.get(key) if key is not None else None
        if held is None:
            return
        held.count -= 1
        if held.count > 0:
            return
        del _HELD[key]
        try:  # remove it while still holding it: a process that opened it meanwhile re-checks and retries
            os.unlink(held.path)
        except OSError:
            pass
        os.close(held.fd)


# ----------------------------------------------------------------------------------------- records
def read_metrics(root: Path) -> dict:
    """``metrics.json`` of the run folder ``root`` (``{}`` when absent)."""
    p = root / "metrics.json"
    if not p.is_file():
        return {}
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{str(p)!r} is damaged ({e}); delete it and rerun the stages to rebuild their "
                              "records") from None
    if not isinstance(m, dict):
        raise CheckpointError(f"{str(p)!r} does not hold a mapping of stages; delete it and rerun the stages")
    return m


def _owned_files(root: Path, stages: Iterable[Stage]) -> list[str]:
    stages = list(stages)
    out = []
    for folder, prefix in ((root, ""), (root / "checkpoints", "checkpoints/")):
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                rel = prefix + p.name
                if not p.is_dir() and any(s.owns_file(rel) for s in stages):
                    out.append(rel)
    return out


def _identity(entry) -> object:
    rec = entry.get("record") if isinstance(entry, dict) else None
    return None if not isinstance(rec, dict) else (rec.get("digest") or rec.get("outputs"))


def _stat(p: Path) -> os.stat_result | None:
    try:
        return p.stat()
    except OSError:
        return None


def _write_metrics(root: Path, m: dict) -> None:
    atomic_write_json(root / "metrics.json", m)


def remove_stages(root: Path, first: str) -> list[str]:
    """Delete the records (first) and then the files of stage ``first`` and every later stage. Returns the files."""
    stages = STAGES[STAGE_INDEX[first]:]
    m = read_metrics(root)
    keep = {k: v for k, v in m.items() if not any(s.owns_key(k) for s in stages)}
    if keep != m:
        _write_metrics(root, keep)
    files = _owned_files(root, stages)
    for f in files:
        (root / f).unlink(missing_ok=True)
    return files


def commit_entries(root: Path, stage: str, entries: dict[str, Entry], replace: bool = False) -> None:
    """Commit ``entries`` of ``stage`` into ``root/metrics.json`` (their files must be written already).

    If any entry's output differs from the one recorded before, the later stages' records and files are removed
    first (they were derived from the old output). ``replace``: the stage's other keys and files go too (e.g. a
    ``sweep_constrained.*`` of an earlier simulation with constraints).
    """
    own, later = STAGES[STAGE_INDEX[stage]], STAGES[STAGE_INDEX[stage] + 1:]
    new = {k: {**e.values, "record": {"outputs": {f: file_sha256(root / f) for f in e.files}, "digest": e.digest,
                                      "derived_from": e.derived_from, "committed": _now()}}
           for k, e in entries.items()}
    m = read_metrics(root)
    changed = any(_identity(m.get(k)) != _identity(v) for k, v in new.items())
    drop, stale = set(), []
    if changed:
        drop |= {k for k in m if any(s.owns_key(k) for s in later)}
        stale += _owned_files(root, later)
    if replace:
        drop |= {k for k in m if own.owns_key(k) and k not in new}
        kept = {f for e in entries.values() for f in e.files}
        stale += [f for f in _owned_files(root, [own]) if f not in kept]
    rest = {k: v for k, v in m.items() if k not in drop}
    if drop or stale:  # records go first: a kill in between leaves files without records (unfinished), not lies
        _write_metrics(root, {k: v for k, v in rest.items() if k not in new})
        for f in stale:
            (root / f).unlink(missing_ok=True)
    out = {k: new.get(k, v) for k, v in rest.items()}
    out.update({k: v for k, v in new.items() if k not in out})
    _write_metrics(root, out)


def _is_run_folder(root: Path) -> bool:
    p = root / "config.yaml"
    if not p.is_file():
        return False
    try:
        d = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError):
        return False
    return isinstance(d, dict) and isinstance(d.get("run"), dict)


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """The run folder path of ``--out`` / ``run.out_dir``.

    Raises:
        ConfigError: it is empty (it would mean the current directory) or names a file.
    """
    if not str(out_dir).strip():
        raise ConfigError("--out / run.out_dir is empty: name the run folder, e.g. --out runs/my_run")
    root = Path(out_dir)
    for p in (root, *root.parents):
        if p.exists() and not p.is_dir():
            where = "is a file" if p == root else f"lies under {str(p)!r}, which is a file"
            raise ConfigError(f"--out {str(out_dir)!r} {where}, not a folder; choose a folder for the run")
    return root


# ----------------------------------------------------------------------------------------- run folder
class RunFolder:
    """A run folder: resolved config, log, metrics with the stages' records, checkpoints (rank 0 writes).

    Use it as a context manager, or call :meth:`close`, to release the folder's lock (it is released at exit, or
    when the object is garbage collected, anyway).
    """

    def __init__(self, cfg: Config, resume: bool = False, overwrite: bool = False, env: DistEnv = DistEnv(),
                 reuse: tuple[str, ...] | None = None, stage: str = "teacher"):
        """Open (or create) the run folder ``cfg.run.out_dir`` and lock it.

        Args:
            resume: continue the run: finished stages are skipped, training resumes from checkpoints.
            overwrite: replace what ``stage`` and the later stages wrote (by name; other files stay).
            reuse: work on an existing run's outputs (e.g. distil from its teacher, convert its student): the
                named config sections must equal the stored ones. None: the folder must be new, or
                ``resume`` / ``overwrite`` given.
            stage: the first stage this command computes (``teacher``, ``student``, ``convert``, ``simulate``,
                ``cost``): the scope of ``overwrite``.

        Raises:
            ConfigError: empty or file ``--out``; a non-empty folder that holds no bsnn run; an existing run
                without ``resume`` / ``overwrite`` / reuse; settings that differ from the reused stages';
                ``resume`` together with ``overwrite``. RunFolderBusy: another process works in the folder.
            OutputError: the folder cannot be created or written.
        """
        if stage not in STAGE_INDEX:
            raise ConfigError(f"RunFolder: stage must be one of {list(STAGE_INDEX)}, got {stage!r}")
        if resume and overwrite:
            raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass only one")
        self.cfg, self.env, self.resume, self.stage = cfg, env, resume, stage
        self.root = check_out_dir(cfg.run.out_dir)
        self.notes: list[str] = []  # logged by make_context once the run's log is open
        self.legacy_fields: dict[str, tuple[str, ...]] = {}  # see legacy_fields(); set by _open
        self._release = None
        self._made: list[Path] = []  # folders this open created, outermost first
        self._undo: dict | None = None  # how to put config.yaml / log.txt back if the command fails at once
        if env.is_main:
            p = Path(os.path.abspath(self.root))
            while not p.exists():
                self._made.insert(0, p)
                p = p.parent
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise write_failure(self.root, e) from None
            try:
                lock = RunLock(self.root).acquire()
            except BaseException:
                self._remove_made()
                raise
            self._release = weakref.finalize(self, lock.release)
            if lock.previous:
                self.notes.append(f"took over the stale lock of {_describe(lock.previous)}: that process is gone")
        if env.is_main:  # rank 0 checks and prepares the folder; the others must not look while it writes
            try:
                self._open(overwrite, reuse)
            except BaseException:
                self.close(failed=True)
                raise
        barrier()
        if not env.is_main and (self.root / "config.yaml").is_file():  # rank 0 kept those fields out of it
            self.legacy_fields = legacy_fields(cfg, _read_config(self.root))

    def _open(self, overwrite: bool, reuse: tuple[str, ...] | None) -> None:
        root, resume = self.root, self.resume
        is_run = _is_run_folder(root)
        if not is_run and root.is_dir():
            foreign = sorted(p.name for p in root.iterdir() if p.name != LOCK_NAME)
            if foreign:
                shown = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
                raise ConfigError(f"{str(root)!r} is not empty ({shown}) but holds no bsnn run (no config.yaml): bsnn "
                                  f"{'deletes' if overwrite else 'writes'} nothing there; choose a new or empty "
                                  "folder for --out")
        has_results = is_run and (any(any(s.owns_key(k) for s in STAGES) for k in self.metrics())
                                  or bool(_owned_files(root, STAGES)))
        if has_results and not (resume or overwrite or reuse is not None):
            raise ConfigError(f"run folder {str(root)!r} already holds a run; pass --resume to continue it, "
                              "--overwrite to replace it, or choose another --out")
        self.legacy_fields = legacy_fields(self.cfg, _read_config(root)) if is_run else {}
        if has_results and (resume or reuse is not None):
            self._check_config(reuse)
        if is_run and not has_results:
            self.notes.append(f"{root} held no finished or partial stage (an earlier command stopped first): "
                              "starting afresh")
        if self.env.is_main:
            cfg_path, log_path = root / "config.yaml", root / "log.txt"
            self._undo = {"config": cfg_path.read_bytes() if cfg_path.is_file() else None,
                          "log_size": log_path.stat().st_size if log_path.is_file() else None,
                          "checkpoints": not (root / "checkpoints").exists()}
            if overwrite and is_run:
                removed = remove_stages(root, self.stage)
                if removed:
                    self.notes.append(f"--overwrite removed {len(removed)} file(s) of the {self.stage} stage and "
                                      f"later: {', '.join(removed)}")
            try:
                (root / "checkpoints").mkdir(exist_ok=True)
            except OSError as e:
                raise write_failure(root / "checkpoints", e) from None
            save_config(self.cfg, root / "config.yaml", omit=self.legacy_fields)
            self._undo["state"] = self._state()

    def _check_config(self, reuse: tuple[str, ...] | None) -> None:
        sections = TRAINING_SECTIONS if self.resume or reuse is None else reuse
        old, new = _read_config(self.root), self.cfg.to_dict()
        # fields bsnn added after the folder was made count as what the folder ran with when they are at default
        ignored = merge_fields({} if sections == TRAINING_SECTIONS else TEACHER_INDEPENDENT, self.legacy_fields)
        changed = [k for k in sections
                   if _without(_without_later_defaults(k, old.get(k)), ignored.get(k, ())) !=
                   _without(_without_later_defaults(k, new.get(k)), ignored.get(k, ()))]
        if changed:
            raise ConfigError(f"run folder {str(self.root)!r} was made with other {', '.join(changed)} settings "
                              "than this config, so its models cannot be reused; use a new --out or --overwrite")

    def _state(self) -> dict:
        """Size and mtime of every stage file and of metrics.json: did the command write anything?"""
        names = [*_owned_files(self.root, STAGES), "metrics.json"]
        return {f: (st.st_size, st.st_mtime_ns) for f in names if (st := _stat(self.root / f)) is not None}

    def close(self, failed: bool = False) -> None:
        """Release the folder's lock (idempotent).

        ``failed``: the command failed. If it wrote no stage file and no record, the folder is put back as it was:
        config.yaml restored, log.txt cut back, the folders this open created removed (a new run folder vanishes).
        Partial work (a training checkpoint, a finished stage) is kept for ``--resume``.
        """
        undo, self._undo = self._undo, None
        rollback = failed and undo is not None and "state" in undo and self._state() == undo["state"]
        if rollback:
            self._put_back(undo)
        if self._release is not None:
            self._release()
        if failed and (rollback or undo is None):
            self._remove_made()

    def _put_back(self, undo: dict) -> None:
        cfg_path, log_path = self.root / "config.yaml", self.root / "log.txt"
        try:
            if undo["config"] is None:
                cfg_path.unlink(missing_ok=True)
            else:
                atomic_write_bytes(cfg_path, undo["config"])
            if undo["log_size"] is None:
                log_path.unlink(missing_ok=True)
            elif log_path.is_file():
                os.truncate(log_path, undo["log_size"])
            if undo["checkpoints"]:
                (self.root / "checkpoints").rmdir()
        except OSError:  # best effort: the command's own error is what the user needs to see
            pass

    def _remove_made(self) -> None:
        for p in reversed(self._made):
            try:
                p.rmdir()
            except OSError:
                break
        self._made = []

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(failed=exc_type is not None)

    def path(self, name: str) -> Path:
        return self.root / name

    def metrics(self) -> dict:
        return read_metrics(self.root)

    def update_metrics(self, stage: str, values: dict) -> None:
        """Set ``metrics[stage] = values`` without a record (prefer :meth:`commit`)."""
        if self.env.is_main:
            m = self.metrics()
            m[stage] = values
            _write_metrics(self.root, m)

    def commit(self, stage: str, entries: dict[str, Entry], replace: bool = False) -> None:
        """Record ``entries`` of ``stage`` (rank 0; see :func:`commit_entries`)."""
        if self.env.is_main:
            commit_entries(self.root, stage, entries, replace)

    def finished(self, key: str, files: Sequence[str]) -> dict | None:
        """The metrics entry of ``key`` if its stage finished: its record is there and each output file still has
        the recorded hash. None otherwise (never run, interrupted before its record, or a file replaced since).

        In a folder written by bsnn before records (metrics.json has entries, none with a ``record``), ``files``
        that exist are trusted, with a warning.
        """
        m = self.metrics()
        e = m.get(key)
        rec = e.get("record") if isinstance(e, dict) else None
        if not isinstance(rec, dict):
            legacy = bool(m) and not any(isinstance(v, dict) and "record" in v for v in m.values())
            if legacy and all(self.path(f).is_file() for f in files):
                log.warning("%s: this run folder predates stage records; trusting %s as it is", key, ", ".join(files))
                return e if isinstance(e, dict) else {}
            return None
        outputs = rec.get("outputs") or {}
        if any(f not in outputs for f in files):
            return None
        for f, sha in outputs.items():
            if not self.path(f).is_file() or file_sha256(self.path(f)) != sha:
                return None
        return e

    def require(self, key: str, file: str, hint: str) -> dict:
        """:meth:`finished` or a clear error: ``file`` is missing or not a finished output (``hint``: the command
        that makes it)."""
        e = self.finished(key, (file,))
        if e is not None:
            return e
        p = self.path(file)
        if not p.is_file():
            raise CheckpointError(f"{str(p)!r} not found; run `{hint}` first")
        raise CheckpointError(f"{str(p)!r} is not a finished {key} output: metrics.json holds no record of this file "
                              "(its stage was interrupted before it finished, or the file was replaced since); "
                              f"run `{hint}`")

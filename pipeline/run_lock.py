"""One writer per run directory: ``output_dir/.lock``, held while a run or a prediction writes there.

Two drivers training into one ``output_dir`` would interleave their metrics lines, overwrite each
other's checkpoints and leave a ``model.safetensors`` of neither trajectory; a ``predict`` writing
into a directory that a run is writing (or replacing it with ``--overwrite``) would do the same.
So whoever writes a run directory first takes its lock, and a second writer is refused with one
line naming the directory and the holder (pid, host, since when, command).

The mechanism is ``fcntl.flock`` on ``output_dir/.lock``, non-blocking:

- the kernel (or, on a network filesystem, the lock server) releases the lock when its holder
  dies, however it dies (``kill -9``, a node lost), so a crashed run never blocks a ``--resume``;
  a lock file left behind is *stale* exactly when its flock can be taken, and is taken over with
  a warning naming the old holder;
- it works across hosts on NFSv4 (the Linux client maps it onto NFS byte-range locks; a crashed
  client's lock goes when its lease expires, about 90 s) and on Lustre and GPFS mounted with
  flock support (Lustre's ``flock`` mount option, the default in current releases);
- the file holds the holder's pid, host, start time and command as JSON, for the message only.

Where the filesystem has no flock (``ENOLCK``, ``ENOSYS``, ``EOPNOTSUPP``: NFSv3 mounted
``nolock``, Lustre ``noflock``), the lock falls back to the file alone, created with
``O_CREAT | O_EXCL``: a holder on this host whose pid is gone is stale and taken over; a holder
on another host cannot be checked from here, so it is refused with the file's path to delete by
hand once no run is active there.

A lock held by this process (another thread, a nested call) is refused from memory without
touching the file: on NFS, whose flock emulation has POSIX-lock semantics, opening and closing
the file again in the holding process would drop the holder's lock.

On object storage (``output_dir`` a URL) there is no flock: the lock is the object
``output_dir/.lock``, holding the same JSON, created with a conditional PUT (S3's
``If-None-Match: *``, fsspec's ``mode="create"``), so of two drivers starting at once exactly one
creates it and the other is refused naming the holder. Where a store has no conditional PUT the
creation is a check then a write, with a short window in which two can both think they hold it.
Nothing releases the object of a holder that dies: like the file-only fallback above, a holder on
this host whose pid is gone is stale and taken over (with a warning); one on another host cannot
be checked, so it is refused with the object's URL to delete by hand once no run is active there.
The guarantee is therefore: one writer per run directory among live drivers, and a crashed
driver's lock taken over at once from its own host, by hand from another.

Released in ``finally``: the file is unlinked (while still locked, so that anyone who opened it
meanwhile notices, by its inode, that it is no longer the lock file) and closed. A run directory
therefore holds ``.lock`` only while it is being written, or after a crash; neither the check
"output_dir already holds a run" nor ``--resume`` looks at it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import inspect
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import ParamSpec, TypeVar

from dasktrain.errors import CheckpointError
from dasktrain.storage import AnyPath, ObjectPath, locate

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
RUN_FILES = ("checkpoints", "metrics.jsonl")
"""With ``config.yaml`` beside one of them, a directory is a run directory (for :func:`run_dir_of`):
every run that got going wrote them. A run being written also holds :data:`LOCK_FILE`."""
CONTENT_WAIT_S = 1.0
"""How long a refused writer waits for a just-created lock file to name its holder."""
ATTEMPTS = 20
"""Tries to take a lock whose file is replaced under us (released, taken over) before giving up."""
_NO_FLOCK = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL}

_HELD: dict[str, Holder] = {}
"""Locks this process holds or is taking, by lock file path (resolved): their holders."""
_HELD_MUTEX = threading.Lock()


class RunDirLockedError(CheckpointError):
    """The run directory is being written by another run or prediction (its holder is named).

    A :class:`CheckpointError`, like the other refusals to touch a run directory, so callers that
    do not retry those (the flow's train stage) do not retry this either.
    """


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file records it."""

    pid: int
    host: str
    since: str
    command: str
    purpose: str = "train"

    @classmethod
    def this_process(cls, purpose: str) -> Holder:
        command = shlex.join(sys.argv) if sys.argv and sys.argv[0] else sys.executable
        return cls(os.getpid(), socket.gethostname(), datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                   command[:300], purpose)

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lock file's bytes name, or None (empty: being written; garbled)."""
        try:
            raw = json.loads(data.decode())
            return cls(int(raw["pid"]), str(raw["host"]), str(raw["since"]), str(raw.get("command", "")),
                       str(raw.get("purpose", "train")))
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    def describe(self) -> str:
        """``train (pid 4242 on node7 since 2026-11-29T20:41:07Z; command: ...)``, on one line."""
        command = " ".join(self.command.split())  # one line whatever argv held
        return (f"{self.purpose} (pid {self.pid} on {self.host} since {self.since}"
                + (f"; command: {command})" if command else ")"))


class RunLock:
    """A held lock on one run directory; :meth:`release` (idempotent) lets it go."""

    def __init__(self, run_dir: Path, path: Path, fd: int, holder: Holder, flock: bool) -> None:
        self.run_dir = run_dir
        self.path = path
        self.holder = holder
        self.flock = flock
        """False where the filesystem has no flock and the file alone is the lock."""
        self._fd: int | None = fd

    def release(self) -> None:
        with _HELD_MUTEX:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if _same_file(fd, self.path):
                    os.unlink(self.path)  # while still locked: see the module's docstring
            except OSError as exc:  # the directory went away: nothing left to release there
                log.debug("could not remove %s: %s", self.path, exc)
            finally:
                os.close(fd)
                _HELD.pop(str(self.path), None)


class ObjectRunLock:
    """A held lock object on a run directory on object storage; :meth:`release` (idempotent)
    deletes it if it still names this holder."""

    def __init__(self, run_dir: ObjectPath, path: ObjectPath, holder: Holder) -> None:
        self.run_dir = run_dir
        self.path = path
        self.holder = holder
        self.flock = False
        self._held = True

    def release(self) -> None:
        with _HELD_MUTEX:
            if not self._held:
                return
            self._held = False
            _HELD.pop(str(self.path), None)
        try:
            if Holder.parse(self.path.read_bytes()) == self.holder:
                self.path.unlink(missing_ok=True)
        except OSError as exc:  # gone already, or the store cannot be reached: nothing left to do here
            log.debug("could not remove %s: %s", self.path, exc)


@contextmanager
def run_lock(run_dir: str | AnyPath, purpose: str = "train") -> Iterator[RunLock | ObjectRunLock]:
    """Hold ``run_dir``'s lock for the ``with`` block (the directory is created if need be);
    raises :class:`RunDirLockedError` naming the holder when someone else writes it."""
    where = locate(run_dir, key="run directory")
    lock = acquire_object(where, purpose) if isinstance(where, ObjectPath) else acquire(where, purpose)
    try:
        yield lock
    finally:
        lock.release()


def acquire(run_dir: Path, purpose: str = "train") -> RunLock:
    """Take ``run_dir``'s lock now or raise :class:`RunDirLockedError`; see :func:`run_lock`."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot create the run directory {run_dir}: {exc.strerror or exc}") from None
    path = run_dir.resolve() / LOCK_FILE
    me = _reserve(run_dir, str(path), purpose)
    try:
        return _acquire(run_dir, path, me)
    except BaseException:
        _unreserve(str(path))
        raise


def _reserve(run_dir: AnyPath, key: str, purpose: str) -> Holder:
    """This process's claim on the lock ``key``, before it is taken: another thread of this
    process is refused from here on (a lock file or object cannot tell two threads apart)."""
    with _HELD_MUTEX:
        held = _HELD.get(key)
        if held is not None:
            raise _locked(run_dir, held)
        me = Holder.this_process(purpose)
        _HELD[key] = me
        return me


def _unreserve(key: str) -> None:
    with _HELD_MUTEX:
        _HELD.pop(key, None)


def acquire_object(run_dir: ObjectPath, purpose: str = "train") -> ObjectRunLock:
    """Take the lock object of a run directory on object storage now, or raise
    :class:`RunDirLockedError`; see the module's docstring for what it guarantees."""
    path = run_dir / LOCK_FILE
    me = _reserve(run_dir, str(path), purpose)
    try:
        for _ in range(ATTEMPTS):
            if path.create_exclusive(me.to_bytes()):
                return ObjectRunLock(run_dir, path, me)
            try:
                found = path.read_bytes()
            except FileNotFoundError:  # released between the two calls: try again
                continue
            holder = Holder.parse(found)
            if holder is not None and _alive_or_unknown(holder):
                raise _locked(run_dir, holder, path if holder.host != me.host else None)
            log.warning("%s: taking over a stale lock: %s is gone", run_dir,
                        holder.describe() if holder else "a holder that never wrote its name")
            path.unlink(missing_ok=True)
        raise RunDirLockedError(f"{run_dir} is in use: its lock object {path} kept changing over {ATTEMPTS} tries")
    except BaseException:
        _unreserve(str(path))
        raise


def check_unlocked(run_dir: AnyPath) -> None:
    """Raise :class:`RunDirLockedError` if someone holds ``run_dir``'s lock; takes nothing."""
    if isinstance(run_dir, ObjectPath):
        with _HELD_MUTEX:
            held = _HELD.get(str(run_dir / LOCK_FILE))
        if held is not None:
            raise _locked(run_dir, held)
        try:
            holder = Holder.parse((run_dir / LOCK_FILE).read_bytes())
        except FileNotFoundError:
            return
        if holder is not None and _alive_or_unknown(holder):
            raise _locked(run_dir, holder, run_dir / LOCK_FILE if holder.host != socket.gethostname() else None)
        return
    path = run_dir.resolve() / LOCK_FILE
    with _HELD_MUTEX:
        held = _HELD.get(str(path))
    if held is not None:
        raise _locked(run_dir, held)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        _flock(fd)
    except BlockingIOError:
        raise _locked(run_dir, _wait_for_holder(fd)) from None
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise
        holder = Holder.parse(_read(fd))
        if holder is not None and _alive_or_unknown(holder):
            raise _locked(run_dir, holder, path if holder.host != socket.gethostname() else None) from None
    finally:
        os.close(fd)  # releases a flock taken just to look


def run_dir_of(path: str | AnyPath) -> AnyPath | None:
    """The nearest run directory holding ``path`` (``path`` itself included), or None.

    A run directory holds a lock file, or ``config.yaml`` with checkpoints or metrics: a folder
    that merely has a ``checkpoints`` subfolder (a home directory, say) is not one, so that no
    lock file is ever created there."""
    path = locate(path, key="path").resolve()
    candidates: tuple[AnyPath, ...] = (path, *path.parents)
    for candidate in candidates:
        if (candidate / LOCK_FILE).exists() or (
                (candidate / "config.yaml").is_file() and any((candidate / f).exists() for f in RUN_FILES)):
            return candidate
    return None


P = ParamSpec("P")
R = TypeVar("R")


def locks_run_dir_of(parameter: str, purpose: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorator: while the function runs, hold the lock of the run directory that holds the path
    given as ``parameter`` (when it is inside one), after checking that no enclosing run directory
    further up is locked (a URL opened with the storage options of the call's ``config``).
    Refuses with :class:`RunDirLockedError` before the function starts."""

    def decorate(func: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(func)

        @functools.wraps(func)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            arguments = signature.bind(*args, **kwargs).arguments
            # A URL is opened with the storage options of the call's run config, when it has one.
            options = getattr(arguments.get("config"), "storage_options", None)
            target = locate(arguments[parameter], options, parameter)
            run_dir = run_dir_of(target)
            if run_dir is None:
                return func(*args, **kwargs)
            for outer in run_dir.parents:
                if (outer / LOCK_FILE).exists():
                    check_unlocked(outer)
            with run_lock(run_dir, purpose):
                return func(*args, **kwargs)

        return wrapper

    return decorate


# -- inside ------------------------------------------------------------------------------------


def _acquire(run_dir: Path, path: Path, me: Holder) -> RunLock:
    for _ in range(ATTEMPTS):
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # released between the two opens: try again
                continue
        except OSError as exc:
            raise CheckpointError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            lock = _try_lock(run_dir, path, fd, created, me)
        except BaseException:
            os.close(fd)
            raise
        if lock is not None:
            return lock
        os.close(fd)
    raise RunDirLockedError(f"{run_dir} is in use: its lock file {path} kept changing over {ATTEMPTS} tries")


def _try_lock(run_dir: Path, path: Path, fd: int, created: bool, me: Holder) -> RunLock | None:
    """Lock through ``fd`` (returns the lock), or raise naming the holder, or None: try again."""
    try:
        _flock(fd)
    except BlockingIOError:
        raise _locked(run_dir, _wait_for_holder(fd)) from None
    except OSError as exc:
        if exc.errno not in _NO_FLOCK:
            raise CheckpointError(f"cannot lock {path}: {exc.strerror or exc}") from None
        return _try_file_lock(run_dir, path, fd, created, me)
    if not _same_file(fd, path):  # we locked a file its holder had just released and removed
        return None
    previous = Holder.parse(_read(fd))
    if previous is not None and not created:
        log.warning("%s: taking over a stale lock: %s is gone", run_dir, previous.describe())
    _write(fd, me)
    return RunLock(run_dir, path, fd, me, flock=True)


def _try_file_lock(run_dir: Path, path: Path, fd: int, created: bool, me: Holder) -> RunLock | None:
    """No flock here: the file is the lock (created with O_EXCL); a dead local holder's is taken over."""
    if created:
        _write(fd, me)
        return RunLock(run_dir, path, fd, me, flock=False)
    holder = _wait_for_holder(fd)
    if holder is not None and _alive_or_unknown(holder):
        raise _locked(run_dir, holder, path if holder.host != me.host else None)
    log.warning("%s: taking over a stale lock: %s is gone", run_dir,
                holder.describe() if holder else "a holder that never wrote its name")
    # Move the stale file aside: of several takers, one rename wins; the others find it gone and
    # start over, as does the winner, with a fresh O_EXCL create.
    aside = path.with_name(f"{LOCK_FILE}.stale-{os.getpid()}-{threading.get_ident()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    os.unlink(aside)
    return None


def _flock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read(fd: int) -> bytes:
    return os.pread(fd, max(os.fstat(fd).st_size, 0), 0)


def _write(fd: int, holder: Holder) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.to_bytes(), 0)
    os.fsync(fd)


def _wait_for_holder(fd: int) -> Holder | None:
    """The holder a lock file names, waiting briefly for one that has just taken it to write it."""
    deadline = time.monotonic() + CONTENT_WAIT_S
    while True:
        holder = Holder.parse(_read(fd))
        if holder is not None or time.monotonic() > deadline:
            return holder
        time.sleep(0.02)


def _alive_or_unknown(holder: Holder) -> bool:
    """False only for a holder on this host whose process is gone (or is this process: a reused pid)."""
    if holder.host != socket.gethostname():
        return True
    if holder.pid == os.getpid():
        return False  # this process's own locks are in _HELD; a file naming it is from a former owner of the pid
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _locked(run_dir: AnyPath, holder: Holder | None, remove_hint: AnyPath | None = None) -> RunDirLockedError:
    who = holder.describe() if holder is not None else "a process that has not written its name yet"
    hint = (f" (its host cannot be checked from here: if nothing runs there any more, delete {remove_hint})"
            if remove_hint is not None else "")
    return RunDirLockedError(f"{run_dir} is locked by another dasktrain {who}{hint}; wait for it to end, "
                             "or choose another output directory")

"""Where quantisation keeps its plaintext copies of a model, and how they are removed.

ORT's quantisation tools take paths and make temporary directories of their own (``pre.quant.*``:
another copy of the model) in the system's; with ``tempfile.tempdir`` pointed at the workspace
they are made inside it and removed with it. That setting is process-wide: quantisations in
threads of one process take turns, and while one runs, other threads' ``tempfile`` files land in
its directory too (quantisation is a tool, not a serving path).

SIGINT and SIGTERM unwind and remove the workspace; SIGKILL (or the OOM killer) cannot. Each
workspace therefore holds a lock file, locked (``flock``) while its quantisation runs, and every
quantisation first removes the workspaces of ``$TMPDIR`` whose lock nobody holds: the copies of a
killed run live until the next run, not for ever. A workspace is set up and locked under another
name, then renamed to a fresh random one, so the clean-up never finds a live workspace unlocked;
set-up directories of runs killed meanwhile are swept once a minute old.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["private_workspace"]

_PREFIX = "enclaveml-quant-"
_NEW_PREFIX = ".enclaveml-quant-new-"  # being set up: swept only once unlocked and a minute old
_LOCK_FILE = ".running"
_LOCK = threading.Lock()


@contextlib.contextmanager
def private_workspace() -> Iterator[str]:
    """A private (0700) directory for one quantisation, ``tempfile.tempdir`` while it runs."""
    with _LOCK:
        temporary = tempfile.gettempdir()
        _remove_abandoned(Path(temporary))
        # Made and locked under a set-up name (swept only when a minute old), then renamed: another
        # run's clean-up never sees this workspace unlocked (it would take the lock and remove it).
        directory = tempfile.mkdtemp(prefix=_NEW_PREFIX)
        lock = -1
        try:
            lock = os.open(os.path.join(directory, _LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            directory = _rename_fresh(directory, temporary)
            previous = tempfile.tempdir
            tempfile.tempdir = directory
            try:
                yield directory
            finally:
                tempfile.tempdir = previous
        finally:
            shutil.rmtree(directory, ignore_errors=True)
            if lock >= 0:
                os.close(lock)  # only now: a workspace is never seen unlocked while it exists


def _rename_fresh(directory: str, temporary: str) -> str:
    """Give the locked set-up directory a fresh random workspace name (not derived from its own:
    another user could take a name they can predict first)."""
    for _ in range(8):
        named = os.path.join(temporary, _PREFIX + secrets.token_hex(8))
        try:
            os.rename(directory, named)
        except OSError:  # the name exists (someone took it): draw another
            continue
        return named
    raise OSError(f"could not name a quantisation workspace in {temporary}")


def _remove_abandoned(temporary: Path) -> None:
    """Remove this user's workspaces whose quantisation is gone (its lock free), and set-up
    directories of killed runs (unlocked and over a minute old: a fresh one may not be locked yet)."""
    now = time.time()
    for candidate in [*temporary.glob(f"{_PREFIX}*"), *temporary.glob(f"{_NEW_PREFIX}*")]:
        try:
            status = candidate.lstat()
        except OSError:
            continue  # gone meanwhile (its run ended)
        if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.geteuid():
            continue
        if candidate.name.startswith(_NEW_PREFIX) and now - status.st_mtime < 60:
            continue
        try:
            lock = os.open(candidate / _LOCK_FILE, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            if candidate.name.startswith(_NEW_PREFIX):  # killed before its lock file existed
                shutil.rmtree(candidate, ignore_errors=True)
            continue
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            shutil.rmtree(candidate, ignore_errors=True)
        except OSError:
            pass  # its quantisation is running
        finally:
            os.close(lock)

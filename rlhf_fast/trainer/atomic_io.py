"""Files of a run written atomically (tmp + fsync + rename), and write
failures reported as WriteError naming the file and the cause."""

from __future__ import annotations

import errno
import os

import torch


class WriteError(OSError):
    """A file of the run could not be written (disk full, read-only or not
    permitted): the message names the file, the cause and what to do; the
    OSError it came from is chained."""

    def __str__(self) -> str:
        return self.strerror


def _os_error(exc: BaseException | None) -> OSError | None:
    """The first OSError with an errno in exc's chain: torch.save reports a
    failed write as RuntimeError("[enforce fail at inline_container.cc]")
    with the OSError (ENOSPC) only as its __context__."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError) and exc.errno is not None:
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def write_error(path: str, exc: BaseException) -> WriteError | None:
    """A WriteError naming path and the OSError behind exc; None when exc holds none."""
    if isinstance(exc, WriteError):
        return exc
    os_err = _os_error(exc)
    if os_err is None:
        return None
    code = os_err.errno
    where = os.path.dirname(os.path.abspath(path))
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = f"free space on the device of {where} (or its quota), or set out_dir elsewhere"
    elif code in (errno.EROFS, errno.EACCES, errno.EPERM):
        hint = f"{where} is not writable: fix its permissions or set out_dir elsewhere"
    else:
        hint = "check the device and the path"
    name = errno.errorcode.get(code, str(code))
    return WriteError(code, f"cannot write {path}: {os.strerror(code)} ({name}); {hint}", path)


def check_writable(out_dir: str) -> None:
    """Create out_dir and a temporary file in it (removed at once), so a
    read-only or unwritable out_dir fails before the first step."""
    import tempfile

    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        code = e.errno if e.errno is not None else errno.EIO
        msg = f"out_dir {out_dir} is not writable: {os.strerror(code)} ({errno.errorcode.get(code, code)})"
        raise WriteError(code, f"{msg}; fix its permissions or set out_dir elsewhere", out_dir) from e


def atomic_save(obj, path: str) -> None:
    """torch.save to path + ".tmp", fsync, rename over path, fsync the
    directory: a crash or kill -9 at any point leaves either the previous
    file or the new one, never a torn one (a stale .tmp at worst, which
    clean_stale_tmp removes)."""
    with _atomic_open(path) as f:
        torch.save(obj, f)


def atomic_write_text(path: str, text: str) -> None:
    with _atomic_open(path) as f:
        f.write(text.encode())


class _atomic_open:
    def __init__(self, path: str):
        self.path, self.tmp = path, path + ".tmp"

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.f = open(self.tmp, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            err = write_error(self.path, exc)
            if err is not None:
                raise err from exc
            return False
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self._discard()
            raise write_error(self.path, e) from e
        fd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename itself reaches the disk
        finally:
            os.close(fd)
        return False

    def _discard(self) -> None:
        """Close and remove the temp file; the old file at path stays whole."""
        try:
            self.f.close()
        except OSError:
            pass  # the buffered rest cannot be written either (the same full disk)
        try:
            os.remove(self.tmp)
        except FileNotFoundError:
            pass


ARTEFACTS = ("checkpoint.pt", "model.pt", "metrics.jsonl")  # what a run writes into out_dir


def clean_stale_tmp(out_dir: str) -> list[str]:
    """Remove the temp files a killed write left in out_dir; returns their names."""
    gone = []
    for name in ARTEFACTS:
        tmp = os.path.join(out_dir, name + ".tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
            gone.append(name + ".tmp")
    return gone

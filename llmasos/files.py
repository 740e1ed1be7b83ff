"""Writing files so that a crash or a full disk never leaves a half-written result: directories built aside and
renamed into place, fsync'ed first, and the free-space check before a large write."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Files that mark a directory as one of our outputs (a model, an adapter, a training run's final/): only such a
# directory is ever replaced whole.
OUTPUT_MARKERS = ("config.json", "adapter_config.json")


def fsync_tree(directory: Path) -> None:
    """fsync every file below `directory`, then the directory itself."""
    for path in directory.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(directory)


def fsync_directory(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_directory(target: str | Path, markers: tuple[str, ...] = OUTPUT_MARKERS) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; when the block ends it is fsync'ed and renamed to
    `target`. A previous `target` (a model or adapter directory) stays intact until the new one is complete, then is
    replaced whole; if the block fails, the temporary directory is removed and `target` is untouched. A `target` that
    exists but is not one of our outputs (none of `markers` — config.json or adapter_config.json — and not empty) is
    refused, so that nothing else is ever deleted."""
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"{target} exists and is not a directory")
        if any(target.iterdir()) and not any((target / marker).is_file() for marker in markers):
            raise FileExistsError(f"{target} exists and is not a model directory; refusing to replace it (choose "
                                  "an empty or new directory)")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists():
            old = target.parent / f".old-{target.name}-{uuid.uuid4().hex[:8]}"
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(target)
        fsync_directory(target.parent)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(exc):
            raise disk_full_error(exc, target.name, target.parent) from exc
        raise


def _remove_stale(target: Path) -> None:
    """Temporary directories beside `target` left by a process that died while writing (their pid is gone)."""
    prefix = f".tmp-{target.name}-"
    for path in target.parent.glob(prefix + "*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def read_utf8(path: Path, error: type[Exception]) -> str:
    """A text file's content, or `error` with one line naming the file and what is wrong (not UTF-8, unreadable)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); convert it to UTF-8") from None
    except OSError as exc:
        raise error(f"{path} cannot be read: {exc.strerror or exc}") from None


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_disk_full(exc: BaseException) -> bool:
    """An error from writing to a full disk: ENOSPC, or a library's message for it (safetensors, SQLite)."""
    import errno

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return "No space left on device" in text or "database or disk is full" in text


def disk_full_error(exc: BaseException, what: str, where: str | Path) -> OSError:
    """The one-line error for a full disk: what was being written, where, and what to do."""
    import errno

    free = shutil.disk_usage(_existing(Path(where))).free
    return OSError(errno.ENOSPC, f"the disk is full writing {what} in {where} ({free / 1e6:.1f} MB free): free "
                   "some space and run it again; nothing half-written was left behind")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(directory: str | Path, needed: int, what: str = "this") -> None:
    """Raise OSError(ENOSPC) naming the directory and the sizes when `needed` bytes do not fit."""
    import errno

    directory = Path(directory)
    free = shutil.disk_usage(_existing(directory)).free
    if needed > free:
        raise OSError(errno.ENOSPC, f"not enough disk space for {what}: it needs {needed / 1e9:.2f} GB and "
                      f"{directory} has {free / 1e9:.2f} GB free; free some space or choose another place")

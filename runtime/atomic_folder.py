"""Atomic folder writes: build a folder next to its destination, then rename it into place.

    with atomic_folder(out) as folder:  # an empty folder on out's filesystem
        ...  # fill it
    # success: `folder` is now `out`. Any exception (Ctrl-C too): it is removed, `out` untouched.

Layout. A write works in a hidden sibling of `out`, the work folder `.{out.name}.tmp-XXXXXXXX/`,
which holds a lock file and `content/`, the folder being built. On success `content/` is renamed
to `out` (one rename on one filesystem: readers see no folder or the whole one), then the work
folder is removed. `out` may be missing or an empty folder; anything else fails the rename and
the write.

Stale work folders. A writer killed by SIGKILL (or a power cut) cleans nothing up and leaves its
work folder behind. Each writer holds an exclusive `flock` on its work folder's lock file for its
whole life, and the kernel drops the lock when the process dies. So on entry a writer removes
every `.{out.name}.tmp-*` sibling whose lock it can take (`remove_stale_work_folders`); a live
writer's lock can't be taken, and a concurrent write to the same destination keeps its folder.
A sibling without the lock file is never touched: nothing proves it is a work folder.

The lock file sits beside `content/`, not in it, so the finished folder holds exactly what the
caller wrote (package manifests hash every file).

`check_separate(out, source)` refuses an `out` that is `source`, lies inside it or contains it:
a write there would change the folder it reads from; `check_new_folder(out, source)` also
refuses an `out` that already holds something.

Limits: where `fcntl.flock` is missing (Windows) or refused (some network filesystems), writes
stay atomic but no stale folder is removed, since no writer can be proven dead. A writer killed
in the instant between creating its work folder and its lock file leaves an empty folder that
is never removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "writer.lock"
CONTENT_NAME = "content"
_ATTEMPTS = 10  # new work folders to try when cleaners keep taking ours (see _new_work_folder)


def work_folder_prefix(out: str | os.PathLike) -> str:
    """The name prefix of `out`'s work folders: `.{out.name}.tmp-`."""
    return f".{Path(out).name}.tmp-"


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder that becomes `out` when the block succeeds (module docstring).

    `out`'s parent is created if missing; stale work folders of `out` are removed first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_work_folders(out)
    work, lock_fd = _new_work_folder(out)
    try:
        content = work / CONTENT_NAME
        content.mkdir()  # the umask's permissions, like any new folder (mkdtemp's are 0700)
        yield content
        if out.is_dir() and not out.is_symlink():
            out.rmdir()  # an empty destination; fails if anything appeared in it
        os.rename(content, out)
    finally:
        # On success only the lock file is left; the lock is held until it is gone.
        shutil.rmtree(work, ignore_errors=True)
        if lock_fd is not None:
            os.close(lock_fd)


def remove_stale_work_folders(out: str | os.PathLike) -> list[Path]:
    """Remove the work folders that dead writers left next to `out`; returns the removed ones."""
    out = Path(out)
    prefix = work_folder_prefix(out)
    try:
        entries = list(os.scandir(out.parent))
    except FileNotFoundError:
        return []
    removed = []
    for entry in entries:
        suffix = entry.name[len(prefix) :]
        # mkdtemp's suffix has no dot: `.a.tmp-x.tmp-…` belongs to the destination `a.tmp-x`.
        if not entry.name.startswith(prefix) or not suffix or "." in suffix:
            continue
        if entry.is_dir(follow_symlinks=False) and _remove_if_stale(Path(entry.path)):
            removed.append(Path(entry.path))
    return removed


def check_separate(
    out: str | os.PathLike,
    source: str | os.PathLike,
    *,
    out_arg: str = "out",
    source_arg: str = "package",
) -> None:
    """ValueError naming `out_arg` when writing `out` could change `source`: the same folder,
    `out` inside `source`, or `source` inside `out` (symlinks and hard links followed)."""
    out_path, source_path = Path(out), Path(source)
    got = f"got {out_arg}={str(out)!r}, {source_arg}={str(source)!r}"
    if _is_same_or_inside(out_path, source_path):
        if _is_same_or_inside(source_path, out_path):
            raise ValueError(f"{out_arg} must be a new folder, not the {source_arg} itself: {got}")
        raise ValueError(
            f"{out_arg} must be outside the {source_arg} (writing there would change it): {got}"
        )
    if _is_same_or_inside(source_path, out_path):
        raise ValueError(f"{out_arg} must not contain the {source_arg}: {got}")


def check_new_folder(out: str | os.PathLike, source: str | os.PathLike) -> None:
    """ValueError unless `out` is missing or empty, and apart from `source` (check_separate):
    where a copy of `source` may be written."""
    check_separate(out, source)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(
            f"out must be a new or empty folder, got {str(out)!r} (exists and is not empty)"
        )


def _is_same_or_inside(path: Path, folder: Path) -> bool:
    if not folder.is_dir():
        return False
    resolved = path.resolve()
    for candidate in (resolved, *resolved.parents):
        # samefile: the same folder under another name (a case-insensitive filesystem, a mount)
        if candidate.exists() and os.path.samefile(candidate, folder):
            return True
    return False


def _new_work_folder(out: Path) -> tuple[Path, int | None]:
    """A work folder and the fd holding its lock (None where locks don't work).

    Between creating the lock file and locking it, a cleaner may take the lock and condemn the
    folder (it unlinks the lock file, then removes the folder). Our lock call waits until that
    cleaner is done; finding the lock file gone, we start over in a new folder.
    """
    for _ in range(_ATTEMPTS):
        work = Path(tempfile.mkdtemp(prefix=work_folder_prefix(out), dir=out.parent))
        if fcntl is None:
            return work, None
        lock_path = work / LOCK_NAME
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        if not _lock(fd, blocking=True):
            os.close(fd)
            lock_path.unlink()  # no lock file: no cleaner will ever take this folder for stale
            return work, None
        if _still_at(fd, lock_path):
            return work, fd
        os.close(fd)
        shutil.rmtree(work, ignore_errors=True)
    raise OSError(f"could not create a work folder for {out}: {_ATTEMPTS} were removed under us")


def _remove_if_stale(work: Path) -> bool:
    lock_path = work / LOCK_NAME
    try:
        # O_RDWR: network filesystems emulate flock with write locks. No O_CREAT: a folder
        # without a lock file is not known to be a work folder.
        fd = os.open(lock_path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        if not _lock(fd, blocking=False) or not _still_at(fd, lock_path):
            return False  # a live writer, or another cleaner condemned it first
        os.unlink(lock_path)  # condemned: waiting writers start over, other cleaners skip it
        shutil.rmtree(work, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def _lock(fd: int, blocking: bool) -> bool:
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:  # held by a live writer, or locks unsupported here: prove nothing
        return False
    return True


def _still_at(fd: int, path: Path) -> bool:
    """Whether `path` is still the file open as `fd` (not unlinked or replaced)."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)

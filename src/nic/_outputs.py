"""Writing results without losing any: writability checked before the work, existing
results refused unless they are to be replaced, folders and files replaced only once the
new one is whole.

- :func:`check_writable`: one clean error, before hours of computing, when an output
  cannot be written (read-only folder, a file where a folder should be).
- :func:`check_new_file` / :func:`check_new_folder`: the refusal to overwrite a result
  (unless ``overwrite``), then :func:`check_writable`; every writer of a file or folder
  asks them, so the refusal reads the same everywhere.
- :func:`staged_folder`: a run folder is built as a hidden sibling
  ``.<name>.partial-<random>`` and renamed into place at the end; the folder it replaces
  (``overwrite``) stays untouched until then, so a crash or a kill leaves either the old
  result or none, never a half-written one.  Leftover partial folders of dead processes
  are removed (and a result moved aside put back) by the next run
  (:func:`remove_dead_partials`).
- :func:`write_atomic`: the same for one file (write a sibling, then ``os.replace``).
- :func:`save_safetensors`: weights with the file mode every other output gets (umask).
- :func:`file_sha256`: the checksum recorded for the files a result came from (weights,
  feature files, slides).

Errors are :class:`~nic.errors.OutputError`; ``param`` names the parameter that holds
the path (``out`` unless said otherwise), so the message says what to change.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nic.errors import OutputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "check_writable",
    "check_new_file",
    "check_new_folder",
    "staged_folder",
    "write_atomic",
    "save_safetensors",
    "file_sha256",
]

PARTIAL_MARK = ".nic-partial"


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | Path, param: str = "out", folder: bool | None = None) -> None:
    """Raise :class:`OutputError` (one line) unless ``path`` (a file or folder to create or
    replace) can be written: its nearest existing folder must accept a new file.

    ``folder`` ``True``: ``path`` is a folder to write into, so an existing file there is
    refused; ``False``: it is a file to write, so an existing folder is refused; ``None``:
    either."""
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise OutputError(f"{p}: exists and is not a folder; choose another `{param}`")
    if folder is False and p.is_dir():
        raise OutputError(f"{p}: is a folder; `{param}` is the file to write")
    base = _existing_ancestor(p if not p.exists() or p.is_dir() else p.parent)
    if base == p and p.exists() and not p.is_dir():
        base = p.parent
    if not base.is_dir():
        raise OutputError(f"{p}: {base} is a file, not a folder; choose another `{param}`")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise OutputError(
            f"{p}: cannot write in {base} ({e.strerror or e}); choose another `{param}`, or free space or fix "
            "permissions there"
        ) from e


def check_new_file(path: str | Path, overwrite: bool = False, param: str = "out") -> None:
    """:func:`check_writable` for the file ``path`` (a folder there is refused), then refuse an
    existing file unless ``overwrite``.  Call it before the work, not after."""
    p = Path(path)
    check_writable(p, param, folder=False)
    if p.exists() and not overwrite:
        raise OutputError(f"{p}: exists; pass `overwrite=True` to replace it, or choose another `{param}`")


def check_new_folder(
    out: str | Path,
    overwrite: bool | None = False,
    holds: Iterable[str] | None = None,
    what: str = "results",
    param: str = "out",
) -> None:
    """:func:`check_writable` for the folder ``out`` (a file there is refused), then refuse it
    when it already holds a result: any of the names ``holds`` (``None``: anything at all).
    ``overwrite`` ``True`` allows writing over that result; ``None`` says the writer never
    replaces one (the message then offers only another folder)."""
    out = Path(out)
    check_writable(out, param, folder=True)
    if out.is_dir() and not overwrite:
        names = list(holds) if holds is not None else None
        taken = any(out.iterdir()) if names is None else any((out / n).exists() for n in names)
        if taken:
            fix = "" if overwrite is None else "pass `overwrite=True` to replace it, or "
            never = f" ({what} are never overwritten)" if overwrite is None else ""
            raise OutputError(f"{out}: already holds {what}; {fix}choose another `{param}`{never}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_partial(folder: Path) -> None:
    """Mark ``folder`` as being built (or swapped) by this process, for
    :func:`left_by_dead_process`; remove the mark (``folder / PARTIAL_MARK``) when done."""
    (folder / PARTIAL_MARK).write_text(f"{os.getpid()}\n")


def left_by_dead_process(folder: Path) -> bool:
    """Whether ``folder`` holds the partial-marker file of a process that has ended (a
    folder being built, or being swapped, when that process was killed)."""
    try:
        pid = int((folder / PARTIAL_MARK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False  # not ours, or still being created: leave it
    return not _alive(pid)


def remove_dead_partials(out: Path) -> None:
    """Clear what a killed :func:`staged_folder` for ``out`` left beside it: its staged
    folders are removed; a result it had moved aside to swap in the new one goes back to
    ``out`` when ``out`` is missing (killed between the two renames), else it is removed."""
    out = Path(out)
    for p in out.parent.glob(f".{out.name}.partial-*"):
        if left_by_dead_process(p):
            shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        if left_by_dead_process(p):
            if not out.exists() and (p / out.name).exists():
                os.replace(p / out.name, out)
            shutil.rmtree(p, ignore_errors=True)


def holds_only(folder: Path, names: Iterable[str] = (), suffixes: Iterable[str] = ()) -> bool:
    """Whether every entry of ``folder`` is one of ``names`` or ends with one of ``suffixes``
    (what a writer may replace as its own: nothing else of the user's is in it)."""
    names, suffixes = set(names), tuple(suffixes)
    return all(p.name in names or (suffixes and p.name.endswith(suffixes)) for p in folder.iterdir())


@contextlib.contextmanager
def staged_folder(out: str | Path, replace: bool = False, is_ours: Callable[[Path], bool] | None = None,
                  param: str = "out") -> Iterator[Path]:  # fmt: skip
    """Yield a fresh hidden folder beside ``out``; on a clean exit it becomes ``out``.

    An existing, non-empty ``out`` is an :class:`OutputError` unless ``replace``, and (with
    ``is_ours``) always when ``is_ours(out)`` says it holds anything this program did not
    write.  On an exception the staged folder is removed and ``out`` stays as it was.  A
    symbolic link ``out`` is followed (the result goes where it points); a mount point is
    refused (a folder cannot be moved over it).  The swap moves ``out`` aside, the staged
    folder in, then removes the old one; if the second move fails the old ``out`` is put
    back, and a process killed between the two leaves markers from which the next
    :func:`staged_folder` (or :func:`remove_dead_partials`) puts the old result back.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    if out.is_dir() and os.path.ismount(out):
        raise OutputError(
            f"{out}: a mount point; nic builds its result beside `{param}` and moves it there, which a mount point "
            f"does not allow: give a folder inside it, e.g. {out / 'result'}"
        )
    if out.is_dir() and any(out.iterdir()) and is_ours is not None and not is_ours(out):
        raise OutputError(f"{out}: holds files nic did not write; choose another `{param}` (a new or empty folder)")
    check_new_folder(out, replace, what="files", param=param)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_partials(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; a result folder follows the umask
    mark_partial(stage)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    old = None
    try:
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            mark_partial(old)
            os.replace(out, old / out.name)
        try:
            os.replace(stage, out)
        except OSError:
            if old is not None:
                os.replace(old / out.name, out)  # the old result back in place
            raise
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise OutputError(f"{out}: cannot move the finished result into place ({e.strerror or e}); it was not kept, "
                          f"and {out} is as it was; choose another `{param}`") from e  # fmt: skip
    (out / PARTIAL_MARK).unlink(missing_ok=True)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a sibling temporary file, then move it over ``path``."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask, read at call time (os.umask can only be read by setting it)."""
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` with the file mode ``0o666 & ~umask``.

    safetensors writes through a private temporary file, which leaves mode 0600; weights
    are meant to be shared like the JSON written beside them.
    """
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

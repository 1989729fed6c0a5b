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
  are removed by the next run.
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

_PID_FILE = ".nic-partial"


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
    """Refuse to write the file ``path`` over a folder, or over an existing file unless
    ``overwrite``; then :func:`check_writable`.  Call it before the work, not after."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"{p}: is a folder; `{param}` is the file to write")
    if p.exists() and not overwrite:
        raise OutputError(f"{p}: exists; pass `overwrite=True` to replace it, or choose another `{param}`")
    check_writable(p, param, folder=False)


def check_new_folder(
    out: str | Path,
    overwrite: bool | None = False,
    holds: Iterable[str] | None = None,
    what: str = "results",
    param: str = "out",
) -> None:
    """Refuse to write into the folder ``out`` when it is a file, or when it already holds
    a result: any of the names ``holds`` (``None``: anything at all).  ``overwrite``
    ``True`` allows writing over that result; ``None`` says the writer never replaces one
    (the message then offers only another folder).  Then :func:`check_writable`."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is not a folder; choose another `{param}`")
    if out.is_dir() and not overwrite:
        names = list(holds) if holds is not None else None
        taken = any(out.iterdir()) if names is None else any((out / n).exists() for n in names)
        if taken:
            fix = "" if overwrite is None else "pass `overwrite=True` to replace it, or "
            never = f" ({what} are never overwritten)" if overwrite is None else ""
            raise OutputError(f"{out}: already holds {what}; {fix}choose another `{param}`{never}")
    check_writable(out, param, folder=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(out: Path) -> None:
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int((p / _PID_FILE).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # not ours, or still being created: leave it
        if not _alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def staged_folder(out: str | Path, replace: bool = False, is_ours: Callable[[Path], bool] | None = None,
                  param: str = "out") -> Iterator[Path]:  # fmt: skip
    """Yield a fresh hidden folder beside ``out``; on a clean exit it becomes ``out``.

    An existing, non-empty ``out`` is an :class:`OutputError` unless ``replace``, and then
    only when ``is_ours(out)`` says it is a result this program wrote.  On an exception the
    staged folder is removed and ``out`` stays as it was.
    """
    out = Path(out)
    if replace and out.is_dir() and any(out.iterdir()) and is_ours is not None and not is_ours(out):
        raise OutputError(f"{out}: not a folder nic wrote; refusing to replace it, choose another `{param}`")
    check_new_folder(out, replace, what="files", param=param)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(out)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private; a result folder follows the umask
    (stage / _PID_FILE).write_text(f"{os.getpid()}\n")
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    (stage / _PID_FILE).unlink()
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(stage, out)
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

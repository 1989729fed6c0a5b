"""Writing results without losing any: writability checked before the work, folders and
files replaced only once the new one is whole.

- :func:`check_writable`: one clean error, before hours of computing, when an output
  cannot be written (read-only folder, a file where a folder should be).
- :func:`staged_folder`: a run folder is built as a hidden sibling
  ``.<name>.partial-<random>`` and renamed into place at the end; the folder it replaces
  (``overwrite``) stays untouched until then, so a crash or a kill leaves either the old
  result or none, never a half-written one.  Leftover partial folders of dead processes
  are removed by the next run.
- :func:`write_atomic`: the same for one file (write a sibling, then ``os.replace``).
- :func:`save_safetensors`: weights with the file mode every other output gets (umask).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from nic.errors import DataError, NicError

if TYPE_CHECKING:
    import torch

__all__ = ["check_writable", "staged_folder", "write_atomic", "save_safetensors"]

_PID_FILE = ".nic-partial"


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | Path, option: str = "--out", error: type[NicError] = DataError) -> None:
    """Raise ``error`` (one line) unless ``path`` (a file or folder to create or replace)
    can be written: its nearest existing folder must accept a new file."""
    p = Path(path)
    base = _existing_ancestor(p if not p.exists() or p.is_dir() else p.parent)
    if base == p and p.exists() and not p.is_dir():
        base = p.parent
    if not base.is_dir():
        raise error(f"{p}: {base} is a file, not a folder; choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise error(
            f"{p}: cannot write in {base} ({e.strerror or e}); choose another {option}, or free space or fix "
            "permissions there"
        ) from e


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
                  option: str = "--out") -> Iterator[Path]:  # fmt: skip
    """Yield a fresh hidden folder beside ``out``; on a clean exit it becomes ``out``.

    An existing, non-empty ``out`` is a :class:`DataError` unless ``replace``, and then
    only when ``is_ours(out)`` says it is a result this program wrote.  On an exception the
    staged folder is removed and ``out`` stays as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another {option}")
    if out.is_dir() and any(out.iterdir()):
        if not replace:
            raise DataError(f"{out}: exists; pass --overwrite to replace it or choose another {option}")
        if is_ours is not None and not is_ours(out):
            raise DataError(f"{out}: not a folder nic wrote; refusing to replace it, choose another {option}")
    check_writable(out, option)
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

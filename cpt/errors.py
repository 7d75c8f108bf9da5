"""User-facing errors: raised for mistakes a user can fix, printed as one line without a traceback."""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path
from typing import Iterator

# A full disk, or a full quota: the write failed for want of space, not because of the data.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CptError(Exception):
    """A problem with the user's input (recipe, files, checkpoint) that names the problem and the fix."""


class RecipeError(CptError):
    """A recipe that does not validate: the message starts with the offending key path."""


class NonFiniteLossError(CptError):
    """The training loss became NaN or infinite; raised before the optimizer step so weights stay finite."""


class DiskFullError(CptError):
    """A write ran out of disk space (or quota); what was written before it is intact."""


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds ``path`` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


# How libraries report ENOSPC when they do not raise OSError: safetensors' message carries the OS error.
NO_SPACE_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded")


def _ran_out(e: BaseException, path: Path, needed: int | None) -> bool:
    if isinstance(e, OSError) and e.errno is not None:
        return e.errno in NO_SPACE
    # torch.save says only "unexpected pos ..." or "file write failed": less free space than the write needs
    # (measured after the caller removed its partial output) is the sign.
    return any(text in str(e) for text in NO_SPACE_TEXT) or (needed is not None and free_bytes(path) < needed)


@contextlib.contextmanager
def space_for(path: Path, what: str, needed: int | None = None) -> Iterator[None]:
    """Turn a full disk while writing ``what`` to ``path`` into a one-line :class:`DiskFullError` naming the path,
    the space free there and, when known, about how much the write needs. Other errors pass through.

    The caller is responsible for leaving no partial output behind (write to a temporary name, then rename):
    this only says what happened.
    """
    try:
        yield
    except Exception as e:
        if isinstance(e, CptError) or not _ran_out(e, path, needed):
            raise
        need = f", about {_size(needed)} needed" if needed else ""
        raise DiskFullError(f"no space left on the device writing {what} to {path} ({_size(free_bytes(path))} free"
                            f"{need}); free some space there (or point the output elsewhere) and run again; "
                            "what was written before is intact") from None

"""The study's files: atomic writes with the usual permissions, reads that name the file, and
errors said in one line for people (which file, what went wrong)."""

from __future__ import annotations

import errno
import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


class StudyError(Exception):
    """A problem with the study's input or output folder, said for people."""


def _file_in_the_way(path: Path) -> Path | None:
    """The first of ``path`` and its parents that exists and is not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


def os_problem(error: OSError) -> str:
    """What an OS error means, in a few words (the caller names the file it was writing)."""
    if isinstance(error, NotADirectoryError | FileExistsError) and error.filename:
        in_the_way = _file_in_the_way(Path(error.filename))
        if in_the_way is not None:
            return f"{in_the_way} is a file where a folder is expected"
    if error.errno == errno.ENOSPC:
        return "no space left on the device"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = f" ({error.filename})" if error.filename else ""
        return f"permission denied{where}: is the folder read-only?"
    if error.strerror:
        return error.strerror[0].lower() + error.strerror[1:]
    return str(error)


def make_folder(path: Path, what: str = "folder") -> None:
    """``mkdir -p`` with an error that names the folder."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StudyError(f"cannot create the {what} {path}: {os_problem(error)}") from error


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` through ``write(handle)`` so that a crash leaves the old file or the new,
    never half of one. The temporary file is removed when anything fails, and the new file
    gets the permissions a plain ``open`` gives (0644 under the usual umask), not the 0600
    of ``tempfile``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    created = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        created = True
        with os.fdopen(descriptor, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        created = False
    except BaseException as error:
        if created:
            try:
                temporary.unlink()
            except OSError:
                pass
        if isinstance(error, OSError):
            raise StudyError(f"cannot write {path}: {os_problem(error)}") from error
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode()))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_write`."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


def remove(path: Path) -> None:
    """Delete a file of the study if it is there."""
    try:
        path.unlink(missing_ok=True)
    except OSError as error:
        raise StudyError(f"cannot remove {path}: {os_problem(error)}") from error


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file of the study; any failure is one line naming the file."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise StudyError(f"{what} {path} cannot be read: {os_problem(error)}") from error
    except ValueError as error:  # JSONDecodeError and UnicodeDecodeError
        raise StudyError(
            f"{what} {path} cannot be read ({error}); it is corrupt or truncated"
        ) from error


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint of the study (tensors only: ``weights_only``)."""
    try:
        return torch.load(path, weights_only=True)
    except OSError as error:
        raise StudyError(f"checkpoint {path} cannot be read: {os_problem(error)}") from error
    except Exception as error:  # unpickling errors come in many types
        raise StudyError(
            f"checkpoint {path} cannot be read ({type(error).__name__}); it is corrupt or "
            "truncated: delete it and rerun to recompute its run"
        ) from error

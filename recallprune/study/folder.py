"""The output folder of a study: ``config.json`` (the settings), ``runs/`` (one record per
finished run), ``checkpoints/`` (the models that later rounds continue from), and the
results and report written at the end. A folder is reused only by the study it holds."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .config import LEGACY_DEFAULTS
from .distributed import Distributed
from .files import (
    StudyError,
    atomic_write,
    atomic_write_text,
    load_checkpoint,
    make_folder,
    read_json,
    remove,
)
from .records import check_results

log = logging.getLogger("recallprune.study")

CONFIG = "config.json"
RESULTS = "results.json"


def differing_settings(mine: dict[str, Any], theirs: Any) -> list[str]:
    """The settings of ``mine`` (a config's identity) that ``theirs`` does not share."""
    if not isinstance(theirs, dict):
        return sorted(mine)
    missing = object()
    return sorted(k for k in mine if theirs.get(k, LEGACY_DEFAULTS.get(k, missing)) != mine[k])


def _run_name(seed: int, arm: str, round_index: int) -> str:
    # An arm's gradient estimate ("undecayed:full") after a dash: ':' is not portable.
    return f"seed{seed}-{arm.replace(':', '-')}-r{round_index:02d}"


class StudyFolder:
    """The files of one study in ``path``; under torchrun only rank 0 writes."""

    def __init__(self, path: Path, dist: Distributed | None = None) -> None:
        self.path = Path(path)
        self.dist = dist if dist is not None else Distributed()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._failed = False

    def record_path(self, seed: int, arm: str, round_index: int) -> Path:
        return self.path / "runs" / f"{_run_name(seed, arm, round_index)}.json"

    def checkpoint_path(self, seed: int, arm: str, round_index: int) -> Path:
        return self.path / "checkpoints" / f"{_run_name(seed, arm, round_index)}.pt"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    def holds_runs(self) -> bool:
        """Whether the folder holds a finished run (a record, or the results)."""
        runs = self.path / "runs"
        return self.results_path.exists() or (runs.is_dir() and any(runs.glob("*.json")))

    # -- whose folder it is ---------------------------------------------------------------

    def prepare(self, config: dict[str, Any], identity: dict[str, Any]) -> None:
        """Create the folder, or check that it holds this very study (nothing is overwritten
        otherwise), and write ``config.json``. Rank 0 decides; under torchrun the other ranks
        learn its verdict."""
        problem = None
        if self.dist.is_main:
            try:
                self.check(identity)
                make_folder(self.path, "output folder")
                atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
            except StudyError as error:
                problem = str(error)
        problem = self.dist.broadcast(problem)
        if problem is not None:
            raise StudyError(problem)

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse a folder that holds something other than this study: a file, a folder of
        other files, another study's runs, or a results file of the wrong shape. A folder
        whose study stopped before its first run finished holds nothing to lose: this study
        takes its place."""
        if self.path.exists() and not self.path.is_dir():
            raise StudyError(f"--out {self.path} exists and is not a folder")
        if self.config_path.exists():
            saved = read_json(self.config_path, "the study's config")
            differing = differing_settings(identity, saved)
            if differing and self.holds_runs():
                raise StudyError(
                    f"output folder {self.path} holds another study (its config differs in "
                    f"{', '.join(differing)}); choose another --out, or resume it with "
                    f"--resume {self.path}. Nothing was overwritten."
                )
            if differing:
                log.info(
                    "%s holds a study that stopped before its first run finished; this study "
                    "takes its place",
                    self.path,
                )
            if self.results_path.exists():
                results = check_results(
                    read_json(self.results_path, "results file"), self.results_path
                )
                theirs = differing_settings(identity, results["config"])
                if theirs:
                    raise StudyError(
                        f"{self.results_path} holds the results of another study (its config "
                        f"differs in {', '.join(theirs)}); move it away or choose another "
                        "--out. Nothing was overwritten."
                    )
        elif self.path.exists() and any(self.path.iterdir()):
            raise StudyError(
                f"output folder {self.path} is not empty and holds no study (no {CONFIG}); "
                "choose another --out. Nothing was overwritten."
            )

    # -- runs -----------------------------------------------------------------------------

    def load_record(self, path: Path) -> dict[str, Any] | None:
        self.flush()
        if not path.exists():
            return None
        return read_json(path, "run record")

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        self.flush()
        return load_checkpoint(path)

    # -- writing behind -------------------------------------------------------------------

    @contextmanager
    def writing_behind(self) -> Iterator[None]:
        """Inside, :meth:`save` and :meth:`drop_checkpoint` return once the files' bytes are
        made, and one thread writes them (the file system's part: writes, fsync, renames),
        in the order given, while the caller goes on; so a record still follows its
        checkpoint on disk. The first write that fails stops the later ones; its error is
        raised by the next :meth:`flush`. Reads through the folder wait for the writes;
        leaving waits for all of them. Not under torchrun, whose ranks meet after each
        save."""
        if self.dist.active or self._writer is not None:
            yield
            return
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="recallprune-writer")
        try:
            yield
        except BaseException:
            # The runs already queued are finished ones: write them, then raise the first.
            try:
                self.flush()
            except Exception:
                pass  # the caller's error is the one to tell
            raise
        else:
            self.flush()
        finally:
            self._writer.shutdown(wait=True)
            self._writer, self._pending, self._failed = None, [], False

    def flush(self) -> None:
        """Wait for the files written behind; raise the first error among them."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.exception()  # waits
        for future in pending:
            if future.exception() is not None:
                raise future.exception()

    def _write(self, write: Callable[[], Any]) -> None:
        if self._writer is None:
            write()
            return

        def ordered() -> None:
            if self._failed:
                return  # an earlier file failed: leave the later ones unwritten
            try:
                write()
            except BaseException:
                self._failed = True
                raise

        self._pending.append(self._writer.submit(ordered))

    def save(
        self,
        record: dict[str, Any],
        path: Path,
        checkpoint: dict | None = None,
        checkpoint_path: Path | None = None,
        owned: bool = False,
    ) -> None:
        """Save a finished run: its checkpoint first, then its record (a record on disk
        means the run is done). ``owned``: the checkpoint's tensors are the caller's own
        copies, which it hands over and changes no more (they may still be read)."""
        if self.dist.is_main:
            text = json.dumps(record) + "\n"
            if checkpoint is not None and owned and self._writer is not None:
                # Serialised by the writing thread too, while the caller goes on.
                self._write(
                    lambda: atomic_write(checkpoint_path, lambda h: torch.save(checkpoint, h))
                )
            elif checkpoint is not None:
                # Serialised now (the bytes torch.save writes to a file), so that the caller
                # may change the tensors at once when the files are written behind.
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                data = buffer.getbuffer()
                self._write(lambda: atomic_write(checkpoint_path, lambda h: h.write(data)))
            self._write(lambda: atomic_write_text(path, text))
        self.dist.barrier()

    def drop_checkpoint(self, path: Path) -> None:
        if self.dist.is_main:
            self._write(lambda: remove(path))

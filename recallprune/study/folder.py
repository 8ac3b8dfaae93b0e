"""The output folder of a study: ``config.json`` (the settings), ``runs/`` (one record per
finished run), ``checkpoints/`` (the models that later rounds continue from), and the
results and report written at the end. A folder is reused only by the study it holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .distributed import Distributed
from .files import StudyError, atomic_save, atomic_write_text, read_json

CONFIG = "config.json"
RESULTS = "results.json"


class StudyFolder:
    """The files of one study in ``path``; under torchrun only rank 0 writes."""

    def __init__(self, path: Path, dist: Distributed | None = None) -> None:
        self.path = Path(path)
        self.dist = dist if dist is not None else Distributed()

    def record_path(self, seed: int, arm: str, round_index: int) -> Path:
        return self.path / "runs" / f"seed{seed}-{arm}-r{round_index:02d}.json"

    def checkpoint_path(self, seed: int, arm: str, round_index: int) -> Path:
        return self.path / "checkpoints" / f"seed{seed}-{arm}-r{round_index:02d}.pt"

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    # -- whose folder it is ---------------------------------------------------------------

    def prepare(self, config: dict[str, Any], identity: dict[str, Any]) -> None:
        """Create the folder, or check that it holds this very study (nothing is overwritten
        otherwise), and write ``config.json``. Rank 0 decides; under torchrun the other ranks
        learn its verdict."""
        problem = None
        if self.dist.is_main:
            try:
                self.check(identity)
                self.path.mkdir(parents=True, exist_ok=True)
                atomic_write_text(self.config_path, json.dumps(config, indent=2) + "\n")
            except StudyError as error:
                problem = str(error)
        problem = self.dist.broadcast(problem)
        if problem is not None:
            raise StudyError(problem)

    def check(self, identity: dict[str, Any]) -> None:
        """Refuse a folder that holds something other than this study."""
        if self.path.exists() and not self.path.is_dir():
            raise StudyError(f"--out {self.path} exists and is not a folder")
        if self.config_path.exists():
            saved = read_json(self.config_path, "the study's config")
            theirs = {k: v for k, v in saved.items() if k in identity}
            differing = sorted(k for k in identity if theirs.get(k) != identity[k])
            if differing:
                raise StudyError(
                    f"output folder {self.path} holds another study (its config differs in "
                    f"{', '.join(differing)}); choose another --out, or rerun with its settings "
                    "to resume it. Nothing was overwritten."
                )
            if self.results_path.exists():
                read_json(self.results_path, "results file")  # corrupt: an error, not a restart
        elif self.path.exists() and any(self.path.iterdir()):
            raise StudyError(
                f"output folder {self.path} is not empty and holds no study (no {CONFIG}); "
                "choose another --out. Nothing was overwritten."
            )

    # -- runs -----------------------------------------------------------------------------

    def load_record(self, path: Path) -> dict[str, Any] | None:
        if not path.exists():
            return None
        return read_json(path, "run record")

    def save(
        self,
        record: dict[str, Any],
        path: Path,
        checkpoint: dict | None = None,
        checkpoint_path: Path | None = None,
    ) -> None:
        """Save a finished run: its checkpoint first, then its record (a record on disk
        means the run is done)."""
        if self.dist.is_main:
            if checkpoint is not None:
                atomic_save(checkpoint, checkpoint_path)
            atomic_write_text(path, json.dumps(record) + "\n")
        self.dist.barrier()

    def drop_checkpoint(self, path: Path) -> None:
        if self.dist.is_main:
            path.unlink(missing_ok=True)

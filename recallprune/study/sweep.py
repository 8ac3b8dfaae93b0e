"""``recallprune sweep FILE``: a grid of studies from one settings file, then compared.

The file holds the settings every study shares (a ``[study]`` table, as ``recallprune study
--config`` reads it) and the settings that vary (a ``[sweep]`` table: each a list of values).
Every combination of the varying settings is one study, in a normal study folder under
``OUT/studies/``; then ``recallprune compare`` runs over all of them into ``OUT/compare/``.
For example, model size against task difficulty::

    [study]
    seeds = [0, 1, 2, 3, 4]

    [sweep]
    width = [0.25, 0.5, 1.0]
    train_fraction = [0.25, 1.0]

A sweep resumes as its studies do: run the same command again, and the studies already
finished are reused, an interrupted one continues from its last saved run.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import StudyConfig, check_setting, check_settings, read_settings_file
from .files import StudyError, atomic_write_text, make_folder, read_json

log = logging.getLogger("recallprune.study")

SWEEP = "sweep.json"
# Settings a sweep may not set: it places each study's folder itself.
_PLACED = ("out",)


@dataclass
class Sweep:
    """The shared settings and the varying ones (each a list of values, in order)."""

    shared: dict[str, Any]
    varying: dict[str, list[Any]]

    def studies(self, out: Path, device: str = "cpu") -> list[tuple[str, StudyConfig]]:
        """Every combination of the varying settings as (name, config), each config checked
        (an error names the study) and placed in ``out/studies/<name>``; ``device`` where the
        file names none."""
        names = list(self.varying)
        studies = []
        for values in itertools.product(*(self.varying[n] for n in names)):
            combination = dict(zip(names, values, strict=True))
            name = study_name(combination)
            settings = {"device": device, **self.shared, **combination}
            settings["out"] = str(out / "studies" / name)
            try:
                studies.append((name, StudyConfig.from_dict(settings)))
            except ValueError as error:
                raise StudyError(f"sweep study {name}: {error}") from error
        return studies

    def to_dict(self) -> dict[str, Any]:
        return {"study": self.shared, "sweep": self.varying}


def study_name(combination: dict[str, Any]) -> str:
    """A folder name that says what a study varies: ``width=0.5,train_fraction=0.25``."""

    def text(value: Any) -> str:
        value = "+".join(map(str, value)) if isinstance(value, list) else str(value)
        return re.sub(r"[^A-Za-z0-9_.+=:-]", "_", value).replace(":", "-")

    return ",".join(f"{name}={text(value)}" for name, value in combination.items())


def read_sweep_file(path: str | Path) -> Sweep:
    """A sweep from a TOML, YAML or JSON file with a ``[sweep]`` table of lists and an
    optional ``[study]`` table; anything else in it is an error naming the file."""
    path = Path(path)
    values = read_settings_file(path)
    unknown = [key for key in values if key not in ("study", "sweep")]
    if unknown or "sweep" not in values:
        raise StudyError(
            f"sweep file {path}: expected a [sweep] table (the settings that vary, each a list "
            f"of values) and optionally a [study] table (the shared settings), got "
            f"{', '.join(map(repr, values)) or 'nothing'}"
        )
    shared, varying = values.get("study", {}), values["sweep"]
    for table, content in (("study", shared), ("sweep", varying)):
        if not isinstance(content, dict):
            raise StudyError(f"sweep file {path}: [{table}] must be a table of settings")
        placed = [key for key in content if str(key).replace("-", "_") in _PLACED]
        if placed:
            raise StudyError(
                f"sweep file {path}: [{table}] sets {placed[0]!r}, which the sweep sets for "
                "each study (under --out)"
            )
    try:
        shared = check_settings(shared)
    except ValueError as error:
        raise StudyError(f"sweep file {path}: [study]: {error}") from error
    if not varying:
        raise StudyError(f"sweep file {path}: [sweep] names no setting to vary")
    checked: dict[str, list[Any]] = {}
    for key, options in varying.items():
        name = str(key).replace("-", "_")
        if not isinstance(options, list) or not options:
            raise StudyError(
                f"sweep file {path}: [sweep] {key} must be a non-empty list of values, got "
                f"{options!r}"
            )
        if name in shared:
            raise StudyError(f"sweep file {path}: {name} is both shared ([study]) and varied")
        try:
            check_settings({name: options[0]})  # an unknown name, said once
            values = [check_setting(name, option) for option in options]
        except ValueError as error:
            raise StudyError(f"sweep file {path}: [sweep] {key}: {error}") from error
        if any(values.count(v) > 1 for v in values):
            raise StudyError(f"sweep file {path}: [sweep] {key} lists a value twice: {options}")
        checked[name] = values
    return Sweep(shared, checked)


def claim_folder(out: Path, sweep: Sweep) -> None:
    """Create ``out`` for this sweep, or check that it holds this very sweep."""
    path = out / SWEEP
    mine = json.loads(json.dumps(sweep.to_dict()))
    if path.exists():
        theirs = read_json(path, "the sweep's settings")
        if theirs != mine:
            raise StudyError(
                f"{out} holds another sweep (its {SWEEP} differs); choose another --out. "
                "Nothing was overwritten."
            )
        return
    if out.exists() and any(out.iterdir()):
        raise StudyError(
            f"--out {out} is not empty and holds no sweep (no {SWEEP}); choose another --out"
        )
    make_folder(out, "sweep folder")
    atomic_write_text(path, json.dumps(mine, indent=2) + "\n")


def run_sweep(
    path: str | Path,
    out: Path,
    run_study: Callable[[StudyConfig], None],
    level: float = 0.05,
    device: str = "cpu",
) -> dict[str, Any]:
    """Every study of the sweep in ``path`` (``run_study(config)`` runs one and writes its
    report; a finished one is reused), then the comparison under ``out/compare``. Returns
    the comparison."""
    from .compare import compare, write_compare

    out = Path(out)
    sweep = read_sweep_file(path)
    studies = sweep.studies(out, device)  # every study's settings checked before anything runs
    claim_folder(out, sweep)
    for index, (name, config) in enumerate(studies, 1):
        results = Path(config.out) / "results.json"
        if results.exists():
            log.info("study %d/%d %s: finished, reused", index, len(studies), name)
            continue
        log.info("study %d/%d %s", index, len(studies), name)
        run_study(config)
    result = compare([Path(config.out) for _, config in studies], level=level)
    write_compare(result, out / "compare")
    return result

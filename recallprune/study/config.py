"""The study's configuration: defaults, a TOML or YAML file, command-line overrides, and the
identity that decides whether an output folder holds this study."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._extras import study_imports
from ..pruning.criteria import CRITERIA
from ..pruning.schedules import RETRAIN_MODES
from .datasets import DATASETS

# Fields that may differ between a study and its resumption without changing its results.
_NOT_IDENTITY = ("data_root", "download", "out")


def rounds_for(sparsity: float, fraction: float) -> int:
    """Rounds of pruning ``fraction`` of the remaining weights to reach ``sparsity``."""
    return max(1, math.ceil(math.log(1 - sparsity) / math.log(1 - fraction)))


@dataclass
class StudyConfig:
    """Every setting of a study. The defaults run offline in a few minutes on two CPU cores:
    digits, the LeNet-300-100 MLP, five seeds, four criteria, 20% of the remaining weights
    pruned per round for 18 rounds (98.2% sparsity), fine-tuning after each round."""

    dataset: str = "digits"
    model: str = "mlp"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    criteria: list[str] = field(
        default_factory=lambda: ["magnitude", "undecayed", "gradient", "random"]
    )
    fraction: float = 0.2
    rounds: int = 18
    retrain: str = "finetune"
    scope: str = "global"
    exclude: list[str] | None = None  # default: the output layer
    n_batches: int = 1  # batches of gradient for the gradient criteria
    epochs: int = 40
    finetune_epochs: int = 4
    rewind_epoch: int = 1
    batch_size: int = 64
    lr: float = 0.05
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    difficulty: float = 1.0
    imbalance: float = 0.0
    level: float = 0.05
    device: str = "cpu"
    data_root: str = "data"
    download: bool = False
    out: str = ""

    def validate(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        unknown = [c for c in self.criteria if c not in CRITERIA]
        if unknown or not self.criteria:
            raise ValueError(
                f"criteria must be a non-empty subset of {CRITERIA}, got {self.criteria}"
            )
        repeated = sorted({c for c in self.criteria if self.criteria.count(c) > 1})
        if repeated:
            raise ValueError(
                f"criteria must be distinct, got {self.criteria} ({', '.join(repeated)} twice): "
                "a repeated arm would count the same models as more seeds"
            )
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not 0 < self.fraction < 1:
            raise ValueError(f"fraction must lie in (0, 1), got {self.fraction}")
        if self.rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {self.rounds}")
        if self.retrain not in RETRAIN_MODES:
            raise ValueError(f"retrain must be one of {RETRAIN_MODES}, got {self.retrain!r}")
        for name in ("epochs", "finetune_epochs", "batch_size", "n_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.retrain == "rewind" and not 0 <= self.rewind_epoch <= self.epochs:
            raise ValueError(f"rewind_epoch must lie in [0, epochs], got {self.rewind_epoch}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must lie in (0, 1), got {self.level}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What must match for a folder's runs to be reused."""
        return {k: v for k, v in self.to_dict().items() if k not in _NOT_IDENTITY}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(known)}")
        return cls(**values)

    def nominal_sparsity(self, round_index: int) -> float:
        return 1.0 - (1.0 - self.fraction) ** round_index


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (``.toml``), YAML (``.yaml``/``.yml``, needs PyYAML) or JSON file;
    a ``[study]`` table is used when present."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".toml":
        import tomllib

        with path.open("rb") as handle:
            values = tomllib.load(handle)
    elif suffix in (".yaml", ".yml"):
        with study_imports("YAML config files"):
            import yaml
        values = yaml.safe_load(path.read_text()) or {}
    elif suffix == ".json":
        values = json.loads(path.read_text())
    else:
        raise ValueError(f"config file {path}: expected .toml, .yaml, .yml or .json")
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a table of settings")
    values = values.get("study", values)
    return {key.replace("-", "_"): value for key, value in values.items()}

"""The study's configuration: defaults, a TOML or YAML file, command-line overrides, and the
identity that decides whether an output folder holds this study."""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._extras import study_imports
from ..mitigation import DEFAULT_EPSILON, DEFAULT_STEP, MITIGATIONS, NONE
from ..pruning.criteria import CLASS_BALANCED, CRITERIA, NEEDS_GRADIENT
from ..pruning.pruner import SCOPES
from ..pruning.schedules import RETRAIN_MODES
from .datasets import DATASETS
from .files import StudyError, os_problem

# Fields that may differ between a study and its resumption without changing its results.
NOT_IDENTITY = ("data_root", "download", "out", "max_stack")
# Settings added after studies were first saved, with the value older studies ran with.
LEGACY_DEFAULTS: dict[str, Any] = {
    "execution": "sequential",
    "width": 1.0,
    "train_fraction": 1.0,
    "mitigations": [NONE],
    "epsilon": DEFAULT_EPSILON,
    "multiplier_step": DEFAULT_STEP,
}
EXECUTIONS = ("batched", "sequential")
# How a gradient criterion's arm estimates the data-loss gradient (``undecayed:full``): from
# N training batches, the whole training set, or the mean gradient over the last epoch of
# the training before the round, as UndecayedSGD tracks it.
GRADIENT_ESTIMATES = ("full", "average")


def split_arm(arm: str) -> tuple[str, str]:
    """An arm's criterion part and its mitigation: ``"undecayed:8+constrained"`` ->
    ``("undecayed:8", "constrained")``, ``"magnitude"`` -> ``("magnitude", "none")``."""
    base, plus, mitigation = str(arm).partition("+")
    if not plus:
        return base, NONE
    if mitigation not in MITIGATIONS[1:]:
        raise ValueError(f"arm {arm!r}: the mitigation after '+' must be one of {MITIGATIONS[1:]}")
    return base, mitigation


def arm_name(criterion: str, mitigation: str) -> str:
    """The arm of ``criterion`` with ``mitigation``: the criterion itself when none."""
    return criterion if mitigation == NONE else f"{criterion}+{mitigation}"


def study_arms(criteria: list[str], mitigations: list[str] | None = None) -> list[str]:
    """Every criterion with every mitigation, criterion by criterion (the control apart)."""
    return [arm_name(c, m) for c in criteria for m in (mitigations or [NONE])]


def parse_arm(arm: str) -> tuple[str, int | str | None]:
    """An arm's criterion and gradient estimate: ``"undecayed"`` -> ``("undecayed", None)``
    (``n_batches`` batches), ``"undecayed:8"`` -> 8 batches, ``"undecayed:full"``,
    ``"undecayed:average"``. Only the gradient criteria take an estimate. A mitigation after
    ``+`` (see :func:`split_arm`) does not change either."""
    base, _ = split_arm(arm)
    criterion, colon, estimate = base.partition(":")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion {arm!r}: the criterion must be one of {CRITERIA}")
    if not colon:
        return criterion, None
    if criterion not in NEEDS_GRADIENT:
        raise ValueError(
            f"criterion {arm!r}: only {', '.join(NEEDS_GRADIENT)} take a gradient estimate"
        )
    if estimate == "average" and criterion in CLASS_BALANCED:
        raise ValueError(
            f"criterion {arm!r}: the running average is the gradient of the training loss, "
            f"not of the class-balanced loss {criterion} scores with; give a number of batches "
            "or 'full'"
        )
    if estimate in GRADIENT_ESTIMATES:
        return criterion, estimate
    if estimate.isdigit() and int(estimate) >= 1 and estimate == str(int(estimate)):
        return criterion, int(estimate)
    raise ValueError(
        f"criterion {arm!r}: the gradient estimate after ':' must be a number of batches "
        f"(1, 2, ...), 'full' or 'average'"
    )


def rounds_for(sparsity: float, fraction: float) -> int:
    """Rounds of pruning ``fraction`` of the remaining weights to reach ``sparsity``."""
    return max(1, math.ceil(math.log(1 - sparsity) / math.log(1 - fraction)))


@dataclass
class StudyConfig:
    """Every setting of a study. The defaults run offline in a few minutes on two CPU cores:
    digits, the LeNet-300-100 MLP, ten seeds, four criteria, 20% of the remaining weights
    pruned per round for 18 rounds (98.2% sparsity), fine-tuning after each round.
    ``mitigations``: each criterion's arm fine-tunes with each of them (see
    :mod:`recallprune.mitigation`), bound ``epsilon``, multipliers' step ``multiplier_step``."""

    dataset: str = "digits"
    model: str = "mlp"
    seeds: list[int] = field(default_factory=lambda: list(range(10)))
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
    mitigations: list[str] = field(default_factory=lambda: [NONE])
    epsilon: float = DEFAULT_EPSILON
    multiplier_step: float = DEFAULT_STEP
    batch_size: int = 64
    lr: float = 0.05
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    difficulty: float = 1.0
    imbalance: float = 0.0
    train_fraction: float = 1.0  # a stratified share of the training set: smaller is harder
    width: float = 1.0  # times the hidden sizes of mlp and the channels of cnn
    level: float = 0.05
    device: str = "cpu"
    execution: str = "batched"  # the grid as stacked models where the model allows
    max_stack: int = 64  # models per stack, to bound memory
    data_root: str = "data"
    download: bool = False
    out: str = ""

    def validate(self) -> None:
        """Check every setting's type, then its range; types are normalised in place (an
        integer where a number is meant becomes a float)."""
        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        if not self.criteria:
            raise ValueError(f"criteria must name at least one of {CRITERIA}")
        for arm in self.criteria:
            parse_arm(arm)
            if "+" in arm:
                raise ValueError(
                    f"criteria: {arm!r} names a mitigation; give the criterion alone and the "
                    f"mitigation with mitigations (--mitigations), one of {MITIGATIONS}"
                )
        self._validate_mitigations()
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
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        for name in ("epochs", "finetune_epochs", "batch_size", "n_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.retrain == "rewind" and not 0 <= self.rewind_epoch <= self.epochs:
            raise ValueError(f"rewind_epoch must lie in [0, epochs], got {self.rewind_epoch}")
        if not 0 < self.level < 1:
            raise ValueError(f"level must lie in (0, 1), got {self.level}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        if not self.width > 0:
            raise ValueError(f"width must be positive, got {self.width}")
        if self.width != 1 and self.model not in ("mlp", "cnn"):
            raise ValueError(f"width applies to the mlp and cnn models only, not {self.model!r}")
        if self.max_stack < 1:
            raise ValueError(f"max_stack must be at least 1, got {self.max_stack}")

    def _validate_mitigations(self) -> None:
        if not self.mitigations:
            raise ValueError(f"mitigations must name at least one of {MITIGATIONS}")
        for mitigation in self.mitigations:
            if mitigation not in MITIGATIONS:
                raise ValueError(
                    f"mitigations must be of {MITIGATIONS}, got {mitigation!r} in "
                    f"{self.mitigations}"
                )
        if len(set(self.mitigations)) != len(self.mitigations):
            raise ValueError(f"mitigations must be distinct, got {self.mitigations}")
        if not self.epsilon >= 0:
            raise ValueError(f"epsilon must be at least 0, got {self.epsilon}")
        if not self.multiplier_step > 0:
            raise ValueError(f"multiplier_step must be positive, got {self.multiplier_step}")
        mitigated = [m for m in self.mitigations if m != NONE]
        if mitigated and self.retrain != "finetune":
            raise ValueError(
                f"mitigations {mitigated} constrain fine-tuning against the dense model, and "
                f"need retrain 'finetune', got retrain {self.retrain!r}; use --retrain "
                "finetune or --mitigations none"
            )

    def arms(self) -> list[str]:
        """The pruning arms: every criterion with every mitigation."""
        return study_arms(self.criteria, self.mitigations)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def identity(self) -> dict[str, Any]:
        """What must match for a folder's runs to be reused."""
        return {k: v for k, v in self.to_dict().items() if k not in NOT_IDENTITY}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> StudyConfig:
        """A config from settings (names as in the dataclass or with dashes), each checked."""
        config = cls(**check_settings(values))
        config.validate()
        return config


_KINDS = {f.name: f.type for f in fields(StudyConfig)}


def _describe(value: Any) -> str:
    kind = "a string" if isinstance(value, str) else f"a {type(value).__name__}"
    return f"{value!r} ({kind})"


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {_describe(value)}")
    return value


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {_describe(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _string(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {_describe(value)}")
    return value


def _boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {_describe(value)}")
    return value


def _list(item, what: str, example: str):
    def check(name: str, value: Any) -> list:
        if not isinstance(value, list | tuple):
            raise ValueError(
                f"{name} must be a list of {what}, e.g. {example}, got {_describe(value)}"
            )
        return [item(f"{name}[{i}]", v) for i, v in enumerate(value)]

    return check


_CHECKS = {
    "str": _string,
    "int": _integer,
    "float": _number,
    "bool": _boolean,
    "list[int]": _list(_integer, "integers", "[12]"),
    "list[str]": _list(_string, "strings", '["magnitude"]'),
    "list[str] | None": _list(_string, "strings", '["fc3"]'),
}


def check_setting(name: str, value: Any) -> Any:
    """``value`` as setting ``name`` takes it, or a ValueError that says what was expected:
    a bare string is not a list (``seeds = "12"`` is not seeds 1 and 2), a bool is not a
    number, a fraction is not an integer, a numeric string is not a number."""
    kind = _KINDS[name]
    if value is None and kind.endswith("| None"):
        return None
    return _CHECKS[kind](name, value)


def check_settings(values: dict[str, Any]) -> dict[str, Any]:
    """Settings with their names normalised (dashes to underscores), every name known and
    every value of its setting's type."""
    if not isinstance(values, dict):
        raise ValueError(f"settings must be a table of names and values, got {_describe(values)}")
    out = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in _KINDS:
            close = difflib.get_close_matches(name, _KINDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown setting {key!r}{hint}; known: {', '.join(sorted(_KINDS))}")
        if name in out:
            raise ValueError(f"setting {name!r} is given twice")
        out[name] = check_setting(name, value)
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Settings from a TOML (``.toml``), YAML (``.yaml``/``.yml``, needs PyYAML) or JSON file:
    at the top level, or all in a ``[study]`` table. Anything else in the file (another
    table, an unknown name, a value of the wrong type) is an error naming the file, never
    silently ignored."""
    path = Path(path)
    values = read_settings_file(path)
    if "study" in values:
        others = [key for key in values if key != "study"]
        if others:
            raise StudyError(
                f"config file {path}: only the [study] table is read, and it holds "
                f"{', '.join(map(repr, others))} besides it; move those settings into [study] "
                "or remove them"
            )
        values = values["study"]
        if not isinstance(values, dict):
            raise StudyError(f"config file {path}: 'study' must be a table of settings")
    try:
        return check_settings(values)
    except ValueError as error:
        raise StudyError(f"config file {path}: {error}") from error


def read_settings_file(path: Path) -> dict[str, Any]:
    """The table a TOML, YAML or JSON file holds, unchecked; unreadable or unparsable files
    and anything but a table are errors naming the file."""
    if not path.exists():
        raise StudyError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise StudyError(f"config file {path}: expected .toml, .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise StudyError(f"config file {path} cannot be read: {os_problem(error)}") from error
    except UnicodeDecodeError as error:
        raise StudyError(f"config file {path} is not UTF-8 text ({error})") from error
    values = _parse(path, suffix, text)
    if not isinstance(values, dict):
        raise StudyError(f"config file {path} must hold a table of settings")
    return values


def _parse(path: Path, suffix: str, text: str) -> Any:
    if suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise StudyError(f"config file {path} is not valid TOML: {error}") from error
    if suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise StudyError(f"config file {path} is not valid JSON: {error}") from error
    with study_imports(f"config file {path} (YAML)"):
        import yaml
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        reason = " ".join(str(error).split())
        raise StudyError(f"config file {path} is not valid YAML: {reason}") from error

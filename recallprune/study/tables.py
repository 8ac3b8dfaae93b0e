"""The numbers the report and the plots share, read from a results file: the analysis's
summaries by (criterion, sparsity), accuracy per arm and sparsity level with its interval,
and the mitigations' numbers: per seed the largest per-class excess accuracy drop, and the
multipliers' trajectories (statistics from :mod:`recallprune.distortion`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import distortion as D
from ..mitigation import NONE, excess_accuracy_drop
from .config import split_arm, study_arms
from .records import CONTROL, DENSE


def as_float(x: Any) -> float:
    """A JSON number (None for NaN) as a float."""
    return math.nan if x is None else float(x)


def level(sparsity: float) -> float:
    """A sparsity as a table key (the analysis and the runs round it alike)."""
    return round(sparsity, 6)


def mean_half(values: list[Any], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the t-interval (the analysis's statistics)."""
    result = D.mean_statistics([as_float(v) for v in values], 0.0, confidence)
    return result["mean"], result["ci_high"] - result["mean"]


def summaries(results: dict[str, Any]) -> dict[tuple[str, float], dict[str, Any]]:
    return {(s["criterion"], level(s["sparsity"])): s for s in results["analysis"]["summaries"]}


def arms(results: dict[str, Any]) -> list[str]:
    """The criteria (each with each mitigation), then the control arm."""
    config = results["config"]
    return [*study_arms(config["criteria"], config.get("mitigations")), CONTROL]


def arm_groups(results: dict[str, Any]) -> dict[str, list[str]]:
    """Each criterion's arms: itself and its mitigated arms (the control apart)."""
    groups: dict[str, list[str]] = {}
    for arm in arms(results)[:-1]:
        groups.setdefault(split_arm(arm)[0], []).append(arm)
    return groups


def mitigated_arms(results: dict[str, Any]) -> list[str]:
    return [arm for arm in arms(results)[:-1] if split_arm(arm)[1] != NONE]


def unmitigated(arm: str) -> str:
    """The arm of the same criterion without a mitigation."""
    return split_arm(arm)[0]


def runs_at(results: dict[str, Any], arm: str, sparsity: float) -> dict[Any, dict[str, Any]]:
    """The runs of ``arm`` at ``sparsity``, by seed."""
    return {
        r["seed"]: r
        for r in results["runs"]
        if r["criterion"] == arm and level(r["nominal_sparsity"]) == sparsity
    }


def largest_excess_drops(results: dict[str, Any], arm: str, sparsity: float) -> dict[Any, float]:
    """Per seed, the largest per-class excess accuracy drop on the test set of ``arm``'s
    model at ``sparsity`` against its dense model: the quantity the constraint bounds."""
    dense = {r["seed"]: r["confusion"] for r in dense_runs(results)}
    out = {}
    for seed, run in runs_at(results, arm, sparsity).items():
        if seed in dense:
            excess = excess_accuracy_drop(dense[seed], run["confusion"]).numpy()
            out[seed] = float(np.nanmax(excess)) if np.isfinite(excess).any() else math.nan
    return out


def paired(first: dict[Any, float], second: dict[Any, float]) -> list[float]:
    """``first - second`` for the seeds both have."""
    return [as_float(first[s]) - as_float(second[s]) for s in first if s in second]


def multiplier_trajectories(results: dict[str, Any], arm: str) -> dict[Any, np.ndarray]:
    """Per seed, ``arm``'s multipliers after every fine-tuning epoch of every round, in
    order: ``[epochs in all, C]`` (runs without them, as of older studies, are left out)."""
    by_seed: dict[Any, list[tuple[int, list[list[float]]]]] = {}
    for r in results["runs"]:
        if r["criterion"] == arm and r.get("multipliers"):
            by_seed.setdefault(r["seed"], []).append((r["round"], r["multipliers"]))
    return {
        seed: np.asarray([m for _, epochs in sorted(rounds) for m in epochs], dtype=np.float64)
        for seed, rounds in by_seed.items()
    }


def sparsities(results: dict[str, Any]) -> list[float]:
    """The study's sparsity levels, 0 (the dense models) first."""
    return sorted({s for _, s in summaries(results)})


def dense_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["runs"] if r["criterion"] == DENSE]


def accuracies(results: dict[str, Any], arm: str, sparsity: float) -> list[Any]:
    """The accuracy of every seed's model of ``arm`` at ``sparsity`` (the dense models at 0)."""
    if sparsity == 0:
        return [r["accuracy"] for r in dense_runs(results)]
    return [
        r["accuracy"]
        for r in results["runs"]
        if r["criterion"] == arm and level(r["nominal_sparsity"]) == sparsity
    ]

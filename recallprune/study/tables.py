"""The numbers the report and the plots share, read from a results file: the analysis's
summaries by (criterion, sparsity), and accuracy per arm and sparsity level with its interval
(statistics from :mod:`recallprune.distortion`)."""

from __future__ import annotations

import math
from typing import Any

from .. import distortion as D
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
    """The criteria, then the control arm."""
    return [*results["config"]["criteria"], CONTROL]


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

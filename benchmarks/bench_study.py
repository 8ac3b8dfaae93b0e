"""The study's grid, batched against sequential, in one process on the same data.

Runs the default study (or the grid given by the flags) twice, once with every model trained
alone (``--execution sequential``) and once as stacked models (``batched``), each into a
fresh temporary folder, and reports per execution: the wall time in all, the time spent in
the training steps alone (the training loops), the wall time per round, models per second,
and the ratios. The order alternates between repeats so that a slow spell of a shared
machine hits both alike. JSON under ``benchmarks/results/study-<device>.json``.

    python benchmarks/bench_study.py                 # the default grid (10 seeds x 5 arms)
    python benchmarks/bench_study.py --seeds 5       # fewer seeds
    python benchmarks/bench_study.py --quick         # a small grid: a smoke run
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from _common import device_name, environment, print_table, slugify, write_json

from recallprune.study import grid, runner
from recallprune.study.config import StudyConfig

RESULTS = Path(__file__).resolve().parent / "results"


class Timers:
    """Wall time spent inside the training loops and inside each round, by wrapping the
    study's own functions (nothing else changes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, name: str, key: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start

        setattr(owner, name, timed)
        self._restore.append((owner, name, original))

    def __enter__(self) -> Timers:
        self._restore: list[tuple[Any, str, Any]] = []
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original in reversed(self._restore):
            setattr(owner, name, original)


def run_once(config: StudyConfig, execution: str) -> dict[str, float]:
    config = StudyConfig.from_dict({**config.to_dict(), "execution": execution, "out": ""})
    with tempfile.TemporaryDirectory() as folder, Timers() as timers:
        # The training loops: the sequential one (runner imports it) and the stacked one.
        timers.wrap(runner, "train", "training")
        timers.wrap(grid, "train_stacked", "training")
        timers.wrap(runner.Study, "round", "rounds")
        timers.wrap(grid.BatchedStudy, "_round_stack", "rounds")
        study = grid.make_study(config, Path(folder) / "study", progress=False)
        start = time.perf_counter()
        runs = study.run()
        wall = time.perf_counter() - start
    models = len(runs)
    return {
        "wall_s": wall,
        "training_s": timers.seconds["training"],
        "round_s": timers.seconds["rounds"] / config.rounds,
        "models": models,
        "models_per_s": models / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds 0..N-1 (default: the default study's, 10)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default: 18)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each execution")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="a small grid: a smoke run")
    parser.add_argument("--out", type=Path, default=None, help="JSON path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    values: dict[str, Any] = {"device": args.device}
    if args.quick:
        values.update(seeds=[0, 1], rounds=2, epochs=2, finetune_epochs=1)
    if args.seeds is not None:
        values["seeds"] = list(range(args.seeds))
    if args.rounds is not None:
        values["rounds"] = args.rounds
    config = StudyConfig.from_dict(values)
    results: dict[str, list[dict[str, float]]] = {"sequential": [], "batched": []}
    for repeat in range(args.repeats):
        order = ("sequential", "batched") if repeat % 2 == 0 else ("batched", "sequential")
        for execution in order:
            results[execution].append(run_once(config, execution))

    def best(execution: str, key: str) -> float:
        return min(r[key] for r in results[execution])

    ratios = {
        key: best("sequential", key) / best("batched", key)
        for key in ("wall_s", "training_s", "round_s")
    }
    rows = [
        [
            execution,
            f"{best(execution, 'wall_s'):.1f}",
            f"{best(execution, 'training_s'):.1f}",
            f"{best(execution, 'round_s'):.2f}",
            f"{max(r['models_per_s'] for r in results[execution]):.1f}",
        ]
        for execution in ("sequential", "batched")
    ]
    rows.append(
        [
            "ratio (sequential / batched)",
            f"{ratios['wall_s']:.2f}x",
            f"{ratios['training_s']:.2f}x",
            f"{ratios['round_s']:.2f}x",
            "",
        ]
    )
    print_table(
        f"study grid: {len(config.seeds)} seeds x {len(config.criteria) + 1} arms x "
        f"{config.rounds} rounds ({config.dataset} / {config.model}), "
        f"{device_name(args.device)}, {torch.get_num_threads()} threads",
        ["execution", "wall s", "training s", "s per round", "models/s"],
        rows,
    )
    payload = {
        "benchmark": "study",
        "environment": environment(args.device),
        "threads": torch.get_num_threads(),
        "config": config.to_dict(),
        "results": results,
        "ratios": ratios,
    }
    name = f"study-{slugify(device_name(args.device))}" + ("-quick" if args.quick else "")
    path = write_json(args.out or RESULTS / f"{name}.json", payload)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

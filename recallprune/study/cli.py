"""The ``recallprune`` command: ``study``, ``report`` and ``analyze``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import distortion as D
from .config import StudyConfig, read_config_file
from .files import StudyError, atomic_write_text
from .runner import Study

log = logging.getLogger("recallprune.study")

# Command-line flag -> (type, help). Every flag defaults to "not given", so that a config
# file's values stand unless a flag overrides them.
_FLAGS: dict[str, tuple[Any, str]] = {
    "dataset": (str, "digits | synthetic | mnist1d | mnist | fashion-mnist | cifar10 | cifar100"),
    "model": (str, "mlp | cnn | resnet20 | resnet56 | vgg11 | vgg16 | a torchvision model name"),
    "seeds": (int, "seeds, each a dense model and its pruned descendants"),
    "criteria": (str, "magnitude undecayed gradient random"),
    "fraction": (float, "fraction of the remaining weights pruned per round"),
    "rounds": (int, "pruning rounds"),
    "retrain": (str, "finetune | rewind (to the weights after --rewind-epoch epochs)"),
    "scope": (str, "global | layer"),
    "exclude": (str, "module names left dense (default: the output layer)"),
    "n_batches": (int, "training batches of gradient for the gradient criteria"),
    "epochs": (int, "epochs of dense training"),
    "finetune_epochs": (int, "epochs of retraining after each round"),
    "rewind_epoch": (int, "epoch whose weights rewinding restores"),
    "batch_size": (int, "batch size"),
    "lr": (float, "learning rate of dense training"),
    "finetune_lr": (float, "learning rate of fine-tuning"),
    "momentum": (float, "SGD momentum"),
    "weight_decay": (float, "weight decay (also UP's lambda)"),
    "difficulty": (float, "synthetic task: higher is harder (class_sep = 2 / difficulty)"),
    "imbalance": (float, "synthetic task: 0 balanced; larger values skew class frequencies"),
    "level": (float, "significance level of the verdicts"),
    "device": (str, "cpu | cuda | cuda:N (default: cuda when available)"),
    "data_root": (str, "folder of the torchvision datasets"),
}
_LISTS = ("seeds", "criteria", "exclude")


def _study_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "study",
        help="train, prune, measure and report (the main job)",
        description="Train a dense model per seed, prune it with each criterion through a "
        "ladder of sparsities (plus a control arm that prunes nothing), evaluate every model "
        "with ConfusionCounter, and write results and a report.",
    )
    parser.add_argument("--config", help="TOML, YAML or JSON file of settings (flags override)")
    for name, (kind, text) in _FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if name in _LISTS:
            parser.add_argument(flag, type=kind, nargs="+", default=None, help=text)
        else:
            parser.add_argument(flag, type=kind, default=None, help=text)
    parser.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download torchvision datasets into --data-root",
    )
    parser.add_argument("--out", help="output folder (default: runs/<dataset>-<model>-<time>)")


def _config_from_args(args) -> StudyConfig:
    values: dict[str, Any] = {}
    if args.config:
        values.update(read_config_file(args.config))
    for f in fields(StudyConfig):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    if values.get("device") is None:
        import torch

        values["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    config = StudyConfig.from_dict(values)
    if not config.out:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        config.out = str(Path("runs") / f"{config.dataset}-{config.model}-{stamp}")
    return config


def cmd_study(args) -> int:
    from .environment import describe
    from .report import write_outputs

    config = _config_from_args(args)
    study = Study(config, Path(config.out), progress=not args.quiet)
    start = time.perf_counter()
    runs = study.run()
    if study.dist.is_main:
        write_outputs(config.to_dict(), runs, Path(config.out), describe(config.device))
        minutes = (time.perf_counter() - start) / 60
        reused = f", {study.reused} reused" if study.reused else ""
        print(
            f"study done in {minutes:.1f} min ({study.computed} runs computed{reused}); "
            f"report: {Path(config.out) / 'report.md'}"
        )
    return 0


def cmd_report(args) -> int:
    from .report import rebuild

    rebuild(Path(args.dir))
    print(f"rebuilt {Path(args.dir) / 'report.md'} and its plots from results.json")
    return 0


def _seed(value: Any, where: str) -> int:
    """A seed as an integer: ints, whole floats and decimal strings; anything else refused
    (a fractional seed would be truncated into another seed)."""
    if isinstance(value, np.generic):  # from an NPZ file
        value = value.item()
    if isinstance(value, bool):
        raise ValueError(f"{where}: seed {value!r} is not an integer")
    if isinstance(value, str):
        text = value.strip()
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{where}: seed {value!r} is not an integer")
        return int(text)
    number = float(value)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{where}: seed {value!r} is not an integer")
    return int(number)


def _seed_map(pairs, where: str) -> dict[int, Any]:
    """``{seed: matrix}`` from (raw seed, matrix) pairs, refusing raw seeds that name the same
    integer (JSON keys "0" and "00", say), which would silently drop a matrix."""
    out: dict[int, Any] = {}
    raw: dict[int, Any] = {}
    for value, matrix in pairs:
        seed = _seed(value, where)
        if seed in out:
            raise ValueError(
                f"{where}: seeds {raw[seed]!r} and {value!r} are both seed {seed}; give each "
                "dense model once"
            )
        out[seed], raw[seed] = matrix, value
    return out


def load_matrices(path: Path) -> tuple[dict[Any, np.ndarray], list[dict[str, Any]]]:
    """Confusion matrices a user brings (see the README's format): JSON or NPZ. Seeds are
    read as integers; the counts themselves are checked by the analysis."""
    if not path.exists():
        raise StudyError(f"{path} does not exist")
    try:
        if path.suffix == ".npz":
            data = np.load(path, allow_pickle=False)
            dense = _seed_map(zip(data["dense_seed"], data["dense"], strict=True), "dense_seed")
            pruned = [
                {
                    "seed": _seed(s, f"pruned_seed[{i}]"),
                    "criterion": str(c),
                    "sparsity": float(t),
                    "confusion": m,
                }
                for i, (s, c, t, m) in enumerate(
                    zip(
                        data["pruned_seed"],
                        data["pruned_criterion"],
                        data["pruned_sparsity"],
                        data["pruned"],
                        strict=True,
                    )
                )
            ]
        else:
            data = json.loads(path.read_text())
            dense = _seed_map(
                ((s, np.asarray(m, dtype=np.float64)) for s, m in data["dense"].items()), "dense"
            )
            pruned = [
                dict(
                    r,
                    seed=_seed(r["seed"], f"pruned[{i}]"),
                    confusion=np.asarray(r["confusion"], dtype=np.float64),
                )
                for i, r in enumerate(data["pruned"])
            ]
    except (KeyError, ValueError, TypeError, OSError, AttributeError) as error:
        detail = f"no {error.args[0]!r} entry" if isinstance(error, KeyError) else error
        raise StudyError(
            f"{path} is not a confusion-matrix file as the README describes: {detail}"
        ) from error
    return dense, pruned


def cmd_analyze(args) -> int:
    dense, pruned = load_matrices(Path(args.file))
    analysis = D.analyze(
        dense,
        pruned,
        level=args.level,
        relative=args.relative,
        control=args.control or None,
        bootstrap=args.bootstrap,
    )
    vs_control = analysis.control is not None
    header = (
        f"{'criterion':<14} {'sparsity':>8} {'seeds':>5} {'ratio':>7} {'95% CI':>17} "
        f"{'p':>8} {'p adj':>8} {'MDE':>6} {'meas sd':>7}  verdict"
    )
    if vs_control:
        header += f" | {'vs ' + analysis.control:>12} {'p adj':>8}  verdict vs control"
    print(header)
    for s in analysis.summaries:
        ci = f"[{s.ci_low:.3f}, {s.ci_high:.3f}]"
        line = (
            f"{s.criterion:<14} {s.sparsity:>8.3f} {s.n_seeds:>5} {s.mean:>7.3f} {ci:>17} "
            f"{s.p_value:>8.2g} {s.p_adjusted:>8.2g} {s.min_detectable_effect:>6.3f} "
            f"{s.measurement_sd:>7.3f}  {s.verdict}"
        )
        if vs_control and s.diff_vs_control is not None:
            line += (
                f" | {s.diff_vs_control:>+12.3f} {s.p_vs_control_adjusted:>8.2g}  "
                f"{s.verdict_vs_control}"
            )
        print(line)
    print(
        f"p adj: Benjamini-Hochberg within each family of tests; verdicts at level {args.level} "
        "on adjusted p. MDE: the smallest |ratio - 1| these seeds could detect (power 0.8); "
        "meas sd: the ratio's spread under resampling of the test set."
    )
    if args.out:
        atomic_write_text(Path(args.out), json.dumps(analysis.to_dict(), indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recallprune", description="Measure the recall distortion that pruning causes."
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars, warnings only"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log every run")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _study_parser(subparsers)
    report = subparsers.add_parser("report", help="rebuild report.md and plots from results.json")
    report.add_argument("dir", help="a study's output folder")
    analyze = subparsers.add_parser(
        "analyze", help="the distortion analysis of confusion matrices from elsewhere"
    )
    analyze.add_argument("file", help="JSON or NPZ file of dense and pruned confusion matrices")
    analyze.add_argument(
        "--level", type=float, default=0.05, help="significance level of the verdicts (0.05)"
    )
    analyze.add_argument("--relative", action="store_true", help="use gaps r / a - 1")
    analyze.add_argument(
        "--control",
        default=D.CONTROL,
        help="criterion name of the control arm, compared with every other criterion at the "
        "same seed and sparsity (default: 'control'; '' for none)",
    )
    analyze.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        help="test-set resamples per model for the measurement noise (default 200; 0: skip)",
    )
    analyze.add_argument("--out", help="write the analysis as JSON here")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    commands = {"study": cmd_study, "report": cmd_report, "analyze": cmd_analyze}
    try:
        return commands[args.command](args)
    except (StudyError, ValueError, FileNotFoundError, KeyError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"recallprune {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: finished runs are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())

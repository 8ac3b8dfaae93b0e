"""The ``recallprune`` command: ``study``, ``report`` and ``analyze``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import distortion as D
from .config import StudyConfig, read_config_file
from .runner import Study, StudyError, atomic_write_text

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
    from .report import write_outputs

    config = _config_from_args(args)
    study = Study(config, Path(config.out), progress=not args.quiet)
    start = time.perf_counter()
    runs = study.run()
    if study.dist.is_main:
        write_outputs(config.to_dict(), runs, Path(config.out))
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


def load_matrices(path: Path) -> tuple[dict[Any, np.ndarray], list[dict[str, Any]]]:
    """Confusion matrices a user brings (see the README's format): JSON or NPZ."""
    if not path.exists():
        raise StudyError(f"{path} does not exist")
    try:
        if path.suffix == ".npz":
            data = np.load(path, allow_pickle=False)
            dense = {int(s): m for s, m in zip(data["dense_seed"], data["dense"], strict=True)}
            pruned = [
                {"seed": int(s), "criterion": str(c), "sparsity": float(t), "confusion": m}
                for s, c, t, m in zip(
                    data["pruned_seed"],
                    data["pruned_criterion"],
                    data["pruned_sparsity"],
                    data["pruned"],
                    strict=True,
                )
            ]
        else:
            data = json.loads(path.read_text())
            dense = {int(s): np.asarray(m) for s, m in data["dense"].items()}
            pruned = [dict(r, confusion=np.asarray(r["confusion"])) for r in data["pruned"]]
    except (KeyError, ValueError, TypeError, OSError) as error:
        raise StudyError(
            f"{path} is not a confusion-matrix file as the README describes ({error!r})"
        ) from error
    return dense, pruned


def cmd_analyze(args) -> int:
    dense, pruned = load_matrices(Path(args.file))
    analysis = D.analyze(dense, pruned, level=args.level, relative=args.relative)
    print(
        f"{'criterion':<14} {'sparsity':>8} {'seeds':>5} {'ratio':>7} {'95% CI':>17} "
        f"{'p':>8} {'Wilcoxon':>8}  verdict"
    )
    for s in analysis.summaries:
        ci = f"[{s.ci_low:.3f}, {s.ci_high:.3f}]"
        print(
            f"{s.criterion:<14} {s.sparsity:>8.3f} {s.n_seeds:>5} {s.mean:>7.3f} {ci:>17} "
            f"{s.p_value:>8.2g} {s.wilcoxon_p_value:>8.2g}  {s.verdict}"
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
    analyze.add_argument("--level", type=float, default=0.05)
    analyze.add_argument("--relative", action="store_true", help="use gaps r / a - 1")
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

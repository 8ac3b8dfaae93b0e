"""The ``recallprune`` command: ``study``, ``report`` and ``analyze``."""

from __future__ import annotations

import argparse
import json
import logging
import math
import shlex
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from .. import distortion as D
from ..mitigation import MITIGATIONS
from ..pruning.criteria import CRITERIA
from ..pruning.pruner import SCOPES
from ..pruning.schedules import RETRAIN_MODES
from .config import EXECUTIONS, NOT_IDENTITY, StudyConfig, check_setting, read_config_file
from .datasets import DATASETS
from .files import StudyError, atomic_write_text, os_problem, read_json
from .grid import make_study
from .models import MODELS
from .runner import Study, parse_shard

log = logging.getLogger("recallprune.study")

_DEFAULTS = StudyConfig()

# Command-line flag -> (type, help, choices). Every flag defaults to "not given", so that a
# config file's values stand unless a flag overrides them; the help shows StudyConfig's
# defaults.
_FLAGS: dict[str, tuple[Any, str, Any]] = {
    "dataset": (str, "the task", DATASETS),
    "model": (
        str,
        f"{', '.join(MODELS)}, or a torchvision classification model by name (resnet18, ...)",
        None,
    ),
    "seeds": (int, "seeds, each a dense model and its pruned descendants", None),
    "criteria": (
        str,
        f"pruning criteria, of {', '.join(CRITERIA)} (a control arm that prunes nothing is "
        "added); a gradient criterion may say how its gradient is estimated: gradient:N or "
        "undecayed:N (N training batches), undecayed:full (the whole training set), "
        "undecayed:average (the mean gradient over the last epoch of training before the round)",
        None,
    ),
    "mitigations": (
        str,
        "fine-tune every criterion's arm with each of these: none (plain fine-tuning), "
        "constrained (per class, excess accuracy drop on the training set <= --epsilon, "
        "Hashemizadeh et al. 2023), loss-gap (per class, loss - dense loss <= --epsilon, after "
        "Tran et al. 2022); arms are named CRITERION and CRITERION+MITIGATION",
        MITIGATIONS,
    ),
    "epsilon": (float, "the mitigations' bound per class", None),
    "multiplier_step": (
        float,
        "step size of the per-class multipliers, updated once per fine-tuning epoch",
        None,
    ),
    "fraction": (float, "fraction of the remaining weights pruned per round", None),
    "rounds": (int, "pruning rounds", None),
    "retrain": (
        str,
        "after each round: fine-tune, or rewind to the weights after --rewind-epoch epochs",
        RETRAIN_MODES,
    ),
    "scope": (str, "one threshold across layers (global) or per layer", SCOPES),
    "exclude": (str, "module names or patterns left dense", None),
    "n_batches": (int, "training batches of gradient for the gradient criteria", None),
    "epochs": (int, "epochs of dense training (cosine learning-rate schedule)", None),
    "finetune_epochs": (int, "epochs of retraining after each round", None),
    "rewind_epoch": (int, "epoch whose weights --retrain rewind restores", None),
    "batch_size": (int, "batch size", None),
    "lr": (float, "learning rate of dense training (and of retraining when rewinding)", None),
    "finetune_lr": (float, "learning rate of fine-tuning", None),
    "momentum": (float, "SGD momentum", None),
    "weight_decay": (float, "weight decay (also UP's lambda)", None),
    "difficulty": (float, "synthetic task: higher is harder (class_sep = 2 / difficulty)", None),
    "imbalance": (float, "synthetic task: 0 balanced; larger skews class frequencies", None),
    "train_fraction": (
        float,
        "train on this stratified share of the training set (smaller: a harder task)",
        None,
    ),
    "width": (float, "multiply the hidden sizes of mlp and the channels of cnn by this", None),
    "level": (float, "significance level of the verdicts", None),
    "device": (str, "cpu, cuda or cuda:N", None),
    "execution": (
        str,
        "train the grid's models as stacked models (batched; mlp and cnn) or one at a time",
        EXECUTIONS,
    ),
    "max_stack": (int, "at most this many models per stack (bounds memory)", None),
    "data_root": (str, "folder of the torchvision datasets", None),
}
_LISTS = ("seeds", "criteria", "mitigations", "exclude")
_SHOWN_DEFAULTS = {
    "exclude": "the output layer",
    "device": "cuda when available, else cpu",
}


def _default_text(name: str) -> str:
    if name in _SHOWN_DEFAULTS:
        return _SHOWN_DEFAULTS[name]
    value = getattr(_DEFAULTS, name)
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _add_verbosity(parser: argparse.ArgumentParser, *, top_level: bool) -> None:
    """-q / -v, before the subcommand or after it. A subcommand's flags default to 'not
    given' (SUPPRESS), so that they never undo the same flag given before it."""
    default = False if top_level else argparse.SUPPRESS
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=default,
        help="no progress bars, warnings only",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=default, help="log every run"
    )


def _study_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "study",
        help="train, prune, measure and report (the main job)",
        description="Train a dense model per seed, prune it with each criterion through a "
        "ladder of sparsities (plus a control arm that prunes nothing), evaluate every model "
        "with ConfusionCounter, and write results and a report. Interrupted, it resumes "
        "with --resume DIR (or the same command and --out).",
    )
    _add_verbosity(parser, top_level=False)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML, YAML or JSON file of settings, at its top level or in a [study] table "
        "(flags override it)",
    )
    for name, (kind, text, choices) in _FLAGS.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{text} (default: {_default_text(name)})"
        nargs = "+" if name in _LISTS else None
        parser.add_argument(
            flag, type=kind, nargs=nargs, choices=choices, default=None, help=help_text
        )
    parser.add_argument(
        "--download",
        action="store_true",
        default=None,
        help="download torchvision datasets into --data-root (default: never download)",
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="output folder (default: runs/<dataset>-<model>-<date>-<time>)",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="resume the study in DIR with the settings of its config.json",
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        type=_shard_argument,
        help="run only every N-th seed, from the I-th (1 <= I <= N): N processes, or machines "
        "sharing a file system, split the grid and write into one --out; the last to finish "
        "writes the report (or run `recallprune report DIR`) (default: all seeds)",
    )


def _shard_argument(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _config_from_args(args) -> StudyConfig:
    if args.resume:
        return _resumed_config(args)
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


def _resumed_config(args) -> StudyConfig:
    """``--resume DIR``: the settings of DIR/config.json; flags may repeat them, or change
    what does not change the results (--data-root, --download), nothing else."""
    folder = Path(args.resume)
    path = folder / "config.json"
    if not path.is_file():
        raise StudyError(f"--resume {folder}: no study there (no {path.name})")
    if args.config:
        raise StudyError("--resume takes its settings from the study's config.json: drop --config")
    if args.out and Path(args.out).resolve() != folder.resolve():
        raise StudyError(f"--resume {folder} and --out {args.out} name different folders")
    try:
        config = StudyConfig.from_dict(read_json(path, "the study's config"))
    except ValueError as error:
        raise StudyError(f"{path}: {error}") from error
    for f in fields(StudyConfig):
        given = getattr(args, f.name, None)
        if given is None or f.name == "out":
            continue
        if f.name in NOT_IDENTITY:
            setattr(config, f.name, given)
        elif check_setting(f.name, given) != getattr(config, f.name):
            flag = "--" + f.name.replace("_", "-")
            raise StudyError(
                f"--resume {folder} runs the study with its own settings; {flag} "
                f"{given} would change them (the study has {getattr(config, f.name)!r}): "
                "drop the flag, or start a new study with another --out"
            )
    config.out = str(folder)
    return config


def _program() -> str:
    """How this process was started: the ``recallprune`` script or ``python -m``."""
    script = sys.argv[0] if sys.argv else ""
    if Path(script).name == "recallprune":
        return shlex.quote(script)
    return f"{shlex.quote(sys.executable)} -m recallprune"


def resume_command(out: Path, shard: tuple[int, int] | None = None) -> str:
    """The command that resumes the study (or this shard of it) in ``out``."""
    shard_flag = f" --shard {shard[0]}/{shard[1]}" if shard else ""
    return f"{_program()} study --resume {shlex.quote(str(out))}{shard_flag}"


def _stopped_note(study: Study) -> str:
    if not study.started:
        return "nothing was written"
    return (
        f"{study.computed} runs computed in this session, {study.reused} reused; every "
        f"finished run is saved in {study.out}. Resume with:\n  "
        f"{resume_command(study.out, study.shard)}"
    )


def cmd_study(args) -> int:
    from .environment import describe
    from .report import write_outputs

    if args.shard and not (args.out or args.resume):
        raise StudyError(
            "--shard needs the folder that every shard writes into: give --out DIR "
            "(or --resume DIR)"
        )
    config = _config_from_args(args)
    study = make_study(config, Path(config.out), progress=not args.quiet, shard=args.shard)
    start = time.perf_counter()
    try:
        runs = study.run()
        missing = 0
        if study.shard is not None:
            # The whole grid, when every shard's runs are there: the last shard reports.
            runs, missing = study.saved_records()
        if missing:
            if study.dist.is_main:
                index, count = study.shard
                print(
                    f"shard {index}/{count} done ({study.computed} runs computed); "
                    f"{missing} runs of other shards are not finished yet: the last shard to "
                    f"finish writes the report, or run\n  {_program()} report "
                    f"{shlex.quote(str(config.out))}\nonce they are"
                )
            return 0
        if study.dist.is_main:
            write_outputs(
                config.to_dict(),
                runs,
                Path(config.out),
                describe(config.device),
                study.model_info,
            )
    except KeyboardInterrupt:
        if study.dist.is_main:
            print(f"interrupted: {_stopped_note(study)}", file=sys.stderr)
        return 130
    except _USER_ERRORS as error:
        if not study.started:
            raise
        _print_error("study", error)
        if study.dist.is_main:
            print(_stopped_note(study), file=sys.stderr)
        return 2
    if study.dist.is_main:
        minutes = (time.perf_counter() - start) / 60
        reused = f", {study.reused} reused" if study.reused else ""
        print(
            f"study done in {minutes:.1f} min ({study.computed} runs computed{reused}); "
            f"report: {Path(config.out) / 'report.md'}"
        )
    return 0


def cmd_sweep(args) -> int:
    from .environment import describe
    from .report import write_outputs
    from .sweep import run_sweep

    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(args.file).stem}"
    command = f"{_program()} sweep {shlex.quote(args.file)} --out {shlex.quote(str(out))}"

    def run_study(config: StudyConfig) -> None:
        study = make_study(config, Path(config.out), progress=not args.quiet)
        runs = study.run()
        if study.dist.is_main:
            write_outputs(
                config.to_dict(), runs, Path(config.out), describe(config.device), study.model_info
            )

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        result = run_sweep(args.file, out, run_study, level=args.level, device=device)
    except KeyboardInterrupt:
        print(
            f"interrupted: every finished run is saved under {out}; resume with:\n  {command}",
            file=sys.stderr,
        )
        return 130
    for i, answer in enumerate(result["answers"], 1):
        print(f"{i}. {answer['question']} {answer['answer']}")
    print(f"sweep of {len(result['studies'])} studies done; wrote {out / 'compare' / 'compare.md'}")
    return 0


def cmd_report(args) -> int:
    from .report import rebuild

    folder = Path(args.dir)
    if not (folder / "results.json").exists() and (folder / "config.json").exists():
        merged = _merge_shards(folder)
        print(f"wrote {folder / 'report.md'} from the {merged} runs in {folder / 'runs'}")
        return 0
    rebuild(folder)
    print(f"rebuilt {folder / 'report.md'} and its plots from results.json")
    return 0


def _merge_shards(folder: Path) -> int:
    """``report DIR`` of a study whose results were never written (its shards ran apart, or
    it stopped early): the results and report from the run records, when all are there."""
    from .environment import describe
    from .report import write_outputs

    path = folder / "config.json"
    try:
        config = StudyConfig.from_dict(read_json(path, "the study's config"))
    except ValueError as error:
        raise StudyError(f"{path}: {error}") from error
    config.out = str(folder)
    study = make_study(config, folder, progress=False)
    runs, missing = study.saved_records()
    if missing:
        raise StudyError(
            f"{folder} holds {len(runs)} of the study's {len(runs) + missing} runs: finish "
            f"them first (every shard, or `{resume_command(folder)}`)"
        )
    study.check()  # the model's size for the results, as the study measured it
    write_outputs(config.to_dict(), runs, folder, describe(config.device), study.model_info)
    return len(runs)


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
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _add_verbosity(parser, top_level=True)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _study_parser(subparsers)
    sweep = subparsers.add_parser(
        "sweep",
        help="a grid of studies from one file, then compare them",
        description="Run a study for every combination of the settings that a file's [sweep] "
        "table varies (each a list of values), with the settings of its [study] table shared, "
        "each in its own folder under OUT/studies; then compare them into OUT/compare. "
        "Rerunning the same command resumes it.",
    )
    _add_verbosity(sweep, top_level=False)
    sweep.add_argument("file", help="TOML, YAML or JSON file with [study] and [sweep] tables")
    sweep.add_argument(
        "--out", metavar="DIR", help="output folder (default: runs/sweep-<file name>)"
    )
    sweep.add_argument(
        "--level",
        type=float,
        default=0.05,
        help="significance level of the comparison's verdicts (default: 0.05)",
    )
    report = subparsers.add_parser(
        "report",
        help="rebuild report.md and plots from results.json",
        description="Rebuild a study's report.md, results.csv and plots from its results.json.",
    )
    _add_verbosity(report, top_level=False)
    report.add_argument("dir", help="a study's output folder")
    analyze = subparsers.add_parser(
        "analyze",
        help="the distortion analysis of confusion matrices from elsewhere",
        description="The distortion analysis of dense and pruned confusion matrices from a "
        "JSON or NPZ file (the README describes the format).",
    )
    _add_verbosity(analyze, top_level=False)
    analyze.add_argument("file", help="JSON or NPZ file of dense and pruned confusion matrices")
    analyze.add_argument(
        "--level",
        type=float,
        default=0.05,
        help="significance level of the verdicts (default: 0.05)",
    )
    analyze.add_argument(
        "--relative", action="store_true", help="use relative gaps r / a - 1 (default: r - a)"
    )
    analyze.add_argument(
        "--control",
        default=D.CONTROL,
        help="criterion name of the control arm, compared with every other criterion at the "
        "same seed and sparsity ('' for none; default: control)",
    )
    analyze.add_argument(
        "--bootstrap",
        type=int,
        default=200,
        help="test-set resamples per model for the measurement noise (0: skip; default: 200)",
    )
    analyze.add_argument("--out", metavar="FILE", help="write the analysis as JSON here")
    compare = subparsers.add_parser(
        "compare",
        help="the paper's questions across studies (task difficulty, model size)",
        description="Pool the per-seed ratios of several study folders and, per criterion, fit "
        "the ratio on sparsity, the dense error and log2 of the parameter count (errors "
        "clustered by study and seed); write compare.md, compare.json, compare.csv and a plot.",
    )
    _add_verbosity(compare, top_level=False)
    compare.add_argument("dirs", nargs="+", metavar="DIR", help="study output folders")
    compare.add_argument(
        "--out", default="compare", metavar="DIR", help="output folder (default: compare)"
    )
    compare.add_argument(
        "--level",
        type=float,
        default=0.05,
        help="significance level of the answers (default: 0.05)",
    )
    return parser


def cmd_compare(args) -> int:
    from .compare import compare, write_compare

    result = compare([Path(d) for d in args.dirs], level=args.level)
    write_compare(result, Path(args.out))
    for i, answer in enumerate(result["answers"], 1):
        print(f"{i}. {answer['question']} {answer['answer']}")
    print(f"wrote {Path(args.out) / 'compare.md'}")
    return 0


# Errors that are the user's to fix: said in one line, with no traceback.
_USER_ERRORS = (StudyError, ValueError, FileNotFoundError, KeyError, RuntimeError, OSError)


def _print_error(command: str, error: BaseException) -> None:
    if isinstance(error, KeyError) and error.args:
        message = error.args[0]
    elif isinstance(error, OSError) and error.errno is not None:
        where = f"{error.filename}: " if error.filename else ""
        message = f"{where}{os_problem(error)}"
    else:
        message = str(error)
    print(f"recallprune {command}: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quiet and args.verbose:
        parser.error("-q and -v contradict each other: give one")
    level = logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("recallprune").setLevel(level)
    commands = {
        "study": cmd_study,
        "report": cmd_report,
        "sweep": cmd_sweep,
        "analyze": cmd_analyze,
        "compare": cmd_compare,
    }
    try:
        return commands[args.command](args)
    except _USER_ERRORS as error:
        _print_error(args.command, error)
        return 2
    except KeyboardInterrupt:
        print(f"recallprune {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

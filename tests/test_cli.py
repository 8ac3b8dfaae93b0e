"""The command line: help with defaults and choices, help text for every option, -q / -v on
either side of the subcommand, --version."""

import argparse

import pytest

from recallprune import __version__
from recallprune.study.cli import build_parser, main
from recallprune.study.datasets import DATASETS


def _subparsers(parser):
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return action.choices


def test_every_option_has_help_text():
    parser = build_parser()
    for name, sub in {"": parser, **_subparsers(parser)}.items():
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)


def test_study_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["study", "--help"])
    assert exit_status.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    for shown in (
        "{" + ",".join(DATASETS) + "}",
        "pruning criteria, of magnitude, gradient, undecayed, undecayed-balanced, random",
        "{none,constrained,loss-gap}",
        "(default: none)",
        "undecayed:full (the whole training set)",
        "{finetune,rewind}",
        "{global,layer}",
        "(default: digits)",
        "(default: mlp)",
        "(default: 0 1 2 3 4 5 6 7 8 9)",
        "(default: magnitude undecayed gradient random)",
        "(default: 0.2)",
        "(default: 18)",
        "(default: 0.05)",
        "(default: the output layer)",
        "(default: cuda when available, else cpu)",
        "--resume DIR",
        "--shard I/N",
        "-q, --quiet",
    ):
        assert shown in text, shown


@pytest.mark.parametrize(
    ("argv", "quiet", "verbose"),
    [
        (["study"], False, False),
        (["-q", "study"], True, False),
        (["study", "-q"], True, False),
        (["study", "--quiet"], True, False),
        (["-v", "study"], False, True),
        (["study", "-v"], False, True),
        (["report", "dir", "-q"], True, False),
        (["analyze", "file", "-v"], False, True),
        (["-q", "analyze", "file"], True, False),
    ],
)
def test_quiet_and_verbose_before_or_after_the_subcommand(argv, quiet, verbose):
    args = build_parser().parse_args(argv)
    assert (args.quiet, args.verbose) == (quiet, verbose)


def test_quiet_and_verbose_together_refused(capsys):
    with pytest.raises(SystemExit):
        main(["-q", "study", "-v"])
    assert "-q and -v contradict each other" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_status:
        main(["--version"])
    assert exit_status.value.code == 0
    assert capsys.readouterr().out.strip() == f"recallprune {__version__}"

"""Helpers of the study's tests: the smallest study, and an interruption at a chosen run."""

from recallprune.study import runner

# One seed, one round, one criterion: three runs (dense, control, magnitude).
# These tests reach into the one-model-at-a-time runner (tests/test_batched.py covers the
# stacked grid and its agreement with this one).
MINI = [
    "--execution",
    "sequential",
    "--seeds",
    "0",
    "--rounds",
    "1",
    "--epochs",
    "1",
    "--finetune-epochs",
    "1",
    "--criteria",
    "magnitude",
    "--device",
    "cpu",
]


def interrupt_evaluation(monkeypatch, at: int):
    """Make the study's ``at``-th evaluation raise KeyboardInterrupt, as Ctrl-C would;
    returns the real ``evaluate``, to put back."""
    evaluate = runner.evaluate
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(runner, "evaluate", interrupted)
    return evaluate

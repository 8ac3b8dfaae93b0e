"""The README's examples run as written."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def _example(name):
    text = README.read_text()
    match = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)```", text, re.S)
    assert match, f"README example {name!r} not found"
    return match.group(1)


def test_iterative_up_example(capsys):
    code = _example("iterative-up")
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    sparsities = [float(s) for s in re.findall(r"sparsity ([0-9.]+)", out)]
    assert len(sparsities) == 5
    for rounds, sparsity in enumerate(sparsities, start=1):
        assert sparsity == pytest.approx(1 - 0.8**rounds, abs=1e-3)
    pruner, opt = namespace["pruner"], namespace["opt"]
    for name, param in pruner.params.items():
        keep = pruner.masks[name]
        assert bool((param[~keep] == 0).all())
        assert bool((opt.state[param]["momentum_buffer"][~keep] == 0).all())


def test_constrained_finetune_example(capsys):
    code = _example("constrained-finetune")
    namespace = {"__name__": "readme_example"}
    exec(compile(code, "README.md", "exec"), namespace)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3"]
    finetune, pruner = namespace["finetune"], namespace["pruner"]
    assert len(finetune.history) == 3 and finetune.multipliers.shape == (10,)
    assert all((m >= 0).all() for m in finetune.history)
    # The multipliers rose exactly where the first epoch's violation was positive.
    assert torch.equal(finetune.history[0] > 0, finetune.violations[0] > 0)
    assert pruner.sparsity() == pytest.approx(0.95, abs=1e-3)
    for name, param in pruner.params.items():
        assert bool((param[~pruner.masks[name]] == 0).all())  # still pruned after fine-tuning

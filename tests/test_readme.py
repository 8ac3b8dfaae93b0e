"""The README's examples run as written."""

import re
from pathlib import Path

import pytest

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

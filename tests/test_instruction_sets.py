"""The CPU kernels are compiled once per instruction set and picked at run time like torch's
own (ATEN_CPU_CAPABILITY overrides): every variant must agree with the reference, and no
code outside the AVX2 and AVX-512 variants may use those instruction sets (on a CPU without
them it would fault)."""

import collections
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _torch_capability(env):
    """The instruction set torch picks under ``env`` (it falls back when the CPU lacks the
    one ATEN_CPU_CAPABILITY asks for)."""
    probe = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip().lower()


@pytest.mark.parametrize("capability", ["default", "avx2", "avx512"])
def test_kernels_under_each_instruction_set(capability):
    pytest.importorskip("recallprune._C")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    if _torch_capability(env) != capability:
        pytest.skip(f"this CPU does not have {capability}")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "tests/test_undecayed_sgd.py",
            "tests/test_confusion.py",
            "tests/test_stacked_linear.py",
            "tests/test_stacked_mlp_grads.py",
            "-k",
            "kernel or property or pruned or decay or average",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


# -- what runs on a CPU without AVX ---------------------------------------------------------

# Code compiled for an instruction set lives in a namespace named after it: the kernels'
# (recallprune::cpu::AVX2) and at::vec's inline ones (at::vec::AVX2), which also appear in the
# names of templates instantiated with their types.
INSTRUCTION_SET_NAMESPACES = ("::AVX2::", "::AVX512::")
# What a CPU with SSE2 only cannot run: the 256- and 512-bit registers and AVX-512's mask
# registers; any VEX- or EVEX-encoded instruction, on xmm registers too (AT&T mnemonics that
# start with "v"; no instruction of user code outside AVX does); and the BMI1, BMI2, LZCNT
# and POPCNT instructions of the [avx2] flags. Left out: tzcnt, which runs as bsf where BMI1
# is missing and which GCC emits for the baseline too.
WIDE_REGISTER = re.compile(r"%(?:[yz]mm[0-9]+|k[0-7])\b")
BIT_INSTRUCTIONS = frozenset(
    "andn bextr blsi blsmsk blsr bzhi mulx pdep pext rorx sarx shlx shrx lzcnt popcnt".split()
)
FUNCTION = re.compile(r"^[0-9a-f]+ <(?P<name>.+)>:$")


def _avx_instructions(disassembly: str) -> dict[str, set[str]]:
    """{function: mnemonics of its instructions a CPU without AVX2 cannot run}, over the
    output of ``objdump -d -C --no-show-raw-insn``."""
    found: dict[str, set[str]] = collections.defaultdict(set)
    function = None
    for line in disassembly.splitlines():
        if match := FUNCTION.match(line):
            function = match["name"]
            continue
        fields = line.split("\t")
        if function is None or len(fields) < 2 or not fields[-1].strip():
            continue
        instruction = fields[-1].strip()
        mnemonic = instruction.split()[0]
        if (
            mnemonic.startswith("v")
            or WIDE_REGISTER.search(instruction)
            or mnemonic in BIT_INSTRUCTIONS
            or (mnemonic[:-1] in BIT_INSTRUCTIONS and mnemonic[-1] in "wlq")
        ):
            found[function].add(mnemonic)
    return found


def test_only_the_instruction_set_kernels_use_avx():
    """The linker keeps one copy of each inline function that several objects hold: if a
    file compiled for AVX2 holds one the baseline code calls (a c10 string helper behind
    TORCH_CHECK, say), the baseline may end up calling AVX2 code. And a static initializer
    of such a file (named after the file, not a namespace) runs wherever the library loads.
    The library's disassembly shows which functions use what."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the instruction sets checked are x86-64's")
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    pytest.importorskip("recallprune._C")
    library = importlib.util.find_spec("recallprune._C").origin
    disassembly = subprocess.run(
        ["objdump", "-d", "-C", "--no-show-raw-insn", library],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = _avx_instructions(disassembly)

    def compiled_for(namespace):
        return [f for f in found if namespace in f and "recallprune::cpu" in f]

    # The check sees the kernels that are meant to use AVX2 and AVX-512.
    assert compiled_for("::AVX2::"), f"no AVX2 code found in {library}"
    assert compiled_for("::AVX512::"), f"no AVX-512 code found in {library}"
    outside = {
        function: sorted(mnemonics)
        for function, mnemonics in found.items()
        if not any(namespace in function for namespace in INSTRUCTION_SET_NAMESPACES)
    }
    assert not outside, (
        f"functions outside the AVX2 and AVX-512 namespaces of {library} use instructions a "
        f"CPU without AVX2 lacks ({len(outside)}):\n"
        + "\n".join(f"  {function}: {' '.join(m)}" for function, m in sorted(outside.items()))
    )

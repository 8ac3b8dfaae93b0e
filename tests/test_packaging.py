"""Packaging as users install it: the sdist carries everything the extension is built from,
setup.py and CMakeLists.txt build the same sources with the same flags, the metadata says
what the code needs, and the study's packages are an extra whose absence is one clear line.
One test pip-installs a freshly built sdist, compiling the extension from it (2.5 minutes
on 2 busy cores)."""

import email.parser
import importlib.util
import json
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tarfile
import textwrap
import tomllib
from pathlib import Path

import pytest

import recallprune
from recallprune import _extras

ROOT = Path(__file__).resolve().parents[1]
STUDY_MODULES = [*_extras.STUDY_PACKAGES, "torchvision"]


def _files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(ROOT)) for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """A freshly built sdist, as ``python -m build --sdist --no-isolation`` makes it (through
    ``setup.py sdist`` where the build front end is not installed). No extension is built:
    the sdist must carry csrc/ by MANIFEST.in alone."""
    out = tmp_path_factory.mktemp("sdist")
    env = {**os.environ, "RECALLPRUNE_BUILD_EXT": "0"}
    # "build.__main__": a bare "build" also finds the build/ folder of a checkout.
    if importlib.util.find_spec("build.__main__") is not None:
        command = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", out]
    else:
        command = [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", out]
    result = subprocess.run(
        [str(c) for c in command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = out.glob("recallprune-*.tar.gz")
    return path


def _members(sdist: Path) -> tuple[str, set[str]]:
    with tarfile.open(sdist) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    prefix = names[0].split("/", 1)[0]
    return prefix, {name.split("/", 1)[1] for name in names}


def test_the_sdist_holds_every_file_under_csrc(sdist):
    _, members = _members(sdist)
    csrc = _files_under(ROOT / "csrc")
    assert {f for f in csrc if f.endswith((".h", ".inl", ".cuh"))}, "no headers found to check"
    assert not csrc - members, f"missing from the sdist: {sorted(csrc - members)}"
    for name in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "setup.py",
        "CMakeLists.txt",
        "recallprune/py.typed",
        "csrc/sources.txt",
    ):
        assert name in members, name
    assert not [m for m in members if m.endswith((".so", ".o", ".pyc"))]


def test_the_sdist_metadata(sdist):
    prefix, _ = _members(sdist)
    with tarfile.open(sdist) as tar:
        info = email.parser.Parser().parsestr(tar.extractfile(f"{prefix}/PKG-INFO").read().decode())
    assert info["Version"] == recallprune.__version__ and prefix.endswith(info["Version"])
    assert info["License"] == "BSD-3-Clause" and info["License-File"] == "LICENSE"
    assert info["Requires-Python"] == ">=3.11"
    core = [r for r in info.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0] for r in core) == ["numpy", "scipy", "torch"]
    study = {
        r.split(";")[0].strip() for r in info.get_all("Requires-Dist") if 'extra == "study"' in r
    }
    assert study == set(_extras.STUDY_PACKAGES.values())
    assert "Typing :: Typed" in info.get_all("Classifier")


def test_the_metadata_matches_the_code():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    # The version is written once, in recallprune/__init__.py.
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"]["attr"] == "recallprune.__version__"
    # tomllib (the study's TOML configs, these tests) needs Python 3.11; ruff checks as much.
    assert project["project"]["requires-python"] == ">=3.11"
    assert project["tool"]["ruff"]["target-version"] == "py311"
    assert "ninja" in project["build-system"]["requires"]
    assert (ROOT / "LICENSE").read_text().startswith("BSD 3-Clause License")
    assert (ROOT / "recallprune" / "py.typed").is_file()


def _read_sources_list() -> dict[str, list[str]]:
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="recallprune_setup")
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return setup["read_sources_list"]()
    finally:
        os.chdir(cwd)


def _instruction_set_sources(listed) -> dict[str, str]:
    """{source: its instruction set} for the sources compiled with flags of their own."""
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="recallprune_setup")
    return {source: name for name in setup["INSTRUCTION_SETS"] for source in listed[name]}


def test_the_sources_list_names_every_source():
    listed = _read_sources_list()
    on_disk = {f for f in _files_under(ROOT / "csrc") if f.endswith((".cpp", ".cu"))}
    per_set = _instruction_set_sources(listed)
    assert set(listed["cxx"]) | set(listed["cuda"]) | set(per_set) == on_disk
    assert all(f.endswith(".cu") for f in listed["cuda"])
    assert "-std=c++20" in listed["cxx-flags"] and "-std=c++20" in listed["nvcc-flags"]
    # Each instruction set's kernels, and nothing else, with its flags.
    assert per_set == {"csrc/cpu/kernels_avx2.cpp": "avx2", "csrc/cpu/kernels_avx512.cpp": "avx512"}
    assert "-mavx2" in listed["avx2-flags"] and "-mfma" in listed["avx2-flags"]
    assert {"-mavx512f", "-mavx2"} <= set(listed["avx512-flags"])


def test_the_default_cuda_architectures_cover_turing_to_hopper_in_both_builds():
    """Without a GPU at build time: Turing, Ampere, Hopper and PTX for newer GPUs, the same
    list in setup.py and CMakeLists.txt."""
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="recallprune_setup")
    archs = setup["DEFAULT_CUDA_ARCHS"]
    assert archs.split(";") == ["7.5", "8.0", "9.0+PTX"]
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(ENV{{TORCH_CUDA_ARCH_LIST}} "{archs}")' in cmake
    assert "set(CMAKE_CUDA_ARCHITECTURES 75 80 90)" in cmake


def test_a_source_missing_from_the_list_stops_the_build(tmp_path):
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "csrc" / "cpu" / "new_op.cpp").write_text("// a new op\n")
    setup = runpy.run_path(str(ROOT / "setup.py"), run_name="recallprune_setup")
    with pytest.raises(SystemExit, match="add \\['.*new_op.cpp'\\]"):
        setup["read_sources_list"](str(tmp_path / "csrc" / "sources.txt"))
    (tmp_path / "csrc" / "sources.txt").write_text("[cxx-flag]\n-O3\n")
    with pytest.raises(SystemExit, match="unknown section \\[cxx-flag\\]"):
        setup["read_sources_list"](str(tmp_path / "csrc" / "sources.txt"))


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_cmake_builds_the_same_sources_with_the_same_flags(tmp_path):
    import torch

    result = subprocess.run(
        [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(tmp_path),
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = json.loads((tmp_path / "compile_commands.json").read_text())
    listed = _read_sources_list()
    per_set = _instruction_set_sources(listed)
    built = {str(Path(c["file"]).resolve().relative_to(ROOT)): c["command"] for c in commands}
    # No CUDA: RECALLPRUNE_BUILD_CUDA is OFF by default.
    assert set(built) == set(listed["cxx"]) | set(per_set)
    flags = listed["cxx-flags"]
    for source, command in built.items():
        arguments = command.split()
        start = arguments.index(flags[0])
        assert arguments[start : start + len(flags)] == flags, source
        # An instruction set's flags on its own sources (x86-64), on no other.
        own = listed[f"{per_set[source]}-flags"] if source in per_set else []
        if platform.machine().lower() in ("x86_64", "amd64"):
            assert [a for a in arguments if a.startswith("-m")] == own, source


# -- the study's extra ----------------------------------------------------------------------

# A module set to None in sys.modules is one that is not installed: importing it raises
# ModuleNotFoundError, importlib.util.find_spec returns None.
_BLOCK = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
"""


def _python_without(modules, code, *args, cwd=None):
    return subprocess.run(
        [sys.executable, "-c", _BLOCK + textwrap.dedent(code), ",".join(modules), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_the_library_needs_none_of_the_study_packages():
    result = _python_without(
        STUDY_MODULES,
        """
        import torch
        from torch import nn
        from recallprune import ConfusionCounter, Pruner, UndecayedSGD, analyze

        model = nn.Linear(4, 3)
        opt = UndecayedSGD(model.parameters(), lr=0.1)
        Pruner(model, optimizer=opt).prune(0.5)
        counter = ConfusionCounter(3)
        counter.update(torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0]))
        print("ok", int(counter.compute().sum()))
        """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", "5"]


def test_the_command_says_in_one_line_which_extra_to_install(tmp_path):
    """tqdm is imported with the study, before the command line can report anything itself:
    the entry point turns its absence into one line."""
    result = _python_without(
        ["tqdm"],
        """
        import sys
        from recallprune.__main__ import main
        sys.exit(main(["report", "."]))
        """,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "recallprune: error: the study needs the tqdm package, which is not installed: "
        "pip install 'recallprune[study]' (or pip install tqdm)"
    ]


@pytest.mark.parametrize(
    ("module", "call"),
    [
        ("mnist1d", lambda: _load("mnist1d")),
        ("sklearn", lambda: _load("digits")),
        ("torchvision", lambda: _load("cifar10")),
        ("yaml", lambda: _read_config("x.yaml")),
        ("matplotlib", lambda: _plot()),
        ("statsmodels", lambda: _fit()),
    ],
)
def test_a_missing_study_package_is_an_error_naming_the_extra(module, call, monkeypatch, tmp_path):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text("seeds: [1]\n")
    with pytest.raises(_extras.MissingExtra) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and isinstance(caught.value, RuntimeError | ImportError)
    if module == "torchvision":
        assert "install the torchvision release built for your torch" in message
    else:
        package = _extras.STUDY_PACKAGES[module]
        assert f"needs the {package} package, which is not installed" in message
        assert "pip install 'recallprune[study]'" in message


def _load(name):
    from recallprune.study.datasets import load_dataset

    return load_dataset(name, data_root=".")


def _plot():
    from recallprune.study.report import write_plots

    return write_plots({}, Path("."))


def _fit():
    from recallprune.study.compare import fit

    return fit([])


def _read_config(path):
    from recallprune.study.config import read_config_file

    return read_config_file(path)


def test_other_missing_modules_are_left_alone():
    with pytest.raises(ModuleNotFoundError) as caught, _extras.study_imports():
        import recallprune_no_such_module  # noqa: F401
    assert not isinstance(caught.value, _extras.MissingExtra)


# -- pip install of the sdist -----------------------------------------------------------------


def test_pip_installs_the_sdist_and_its_kernels_load(sdist, tmp_path):
    """pip builds the extension from the sdist alone (no network, the torch at hand) and the
    installed package runs its compiled kernel. CUDA sources are left out to save minutes;
    the file list above covers them."""
    target = tmp_path / "site"
    env = {
        **os.environ,
        "RECALLPRUNE_BUILD_CUDA": "0",
        "MAX_JOBS": os.environ.get("MAX_JOBS", "2"),
    }
    env.pop("PYTHONPATH", None)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--no-build-isolation",
            "--no-cache-dir",
            "--quiet",
            "--target",
            str(target),
            str(sdist),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    assert (target / "recallprune" / "py.typed").is_file()
    assert (target / "bin" / "recallprune").is_file()
    check = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                """
                import torch, recallprune
                from recallprune import UndecayedSGD
                print(recallprune.__file__)
                assert recallprune.has_ops(), recallprune.load_error()
                w = torch.nn.Parameter(torch.ones(3))
                w.grad = torch.ones(3)
                UndecayedSGD([w], lr=0.5, backend="kernel").step()
                print(w.tolist())
                """
            ),
        ],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(target)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr[-3000:]
    where, weights = check.stdout.split("\n")[:2]
    assert Path(where).is_relative_to(target)
    assert weights == "[0.5, 0.5, 0.5]"

"""Build recallprune._C: the C++ kernels always, the CUDA kernels whenever a toolkit is found.

The sources and compiler flags are listed in csrc/sources.txt, which CMakeLists.txt reads too.
The CPU kernels of each instruction set (AVX2, AVX-512) are compiled with flags of their own,
on x86-64, before the other sources (BuildExtension below).
Switches (environment):
  RECALLPRUNE_BUILD_EXT=0   build no extension (pure-torch fallback only)
  RECALLPRUNE_BUILD_CUDA=0  build the C++ kernels only
The CUDA sources are compiled whenever a CUDA toolkit is found and torch is a CUDA
build, even without a GPU, so that every build compile-checks them.
"""

import glob
import os
import platform
import shutil

from setuptools import setup


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


SOURCES_LIST = os.path.join("csrc", "sources.txt")
# The GPUs a build without a visible GPU serves (TORCH_CUDA_ARCH_LIST overrides; with a GPU
# visible, torch builds for that GPU): Turing (T4), Ampere (A100; its code also runs on the
# 8.6 and 8.9 GPUs), Hopper (H100, H200), and PTX that the driver compiles for newer GPUs.
# CUDA 13 supports nothing older than Turing. On one core of a 2-core build machine, each CUDA
# source takes about 22 s whatever the list (the host-side compile), and each architecture
# adds 6-7 s: Turing made the CUDA sources 67 s -> 81 s.
DEFAULT_CUDA_ARCHS = "7.5;8.0;9.0+PTX"
# The sections of C++ sources compiled with flags of their own: one per instruction set.
INSTRUCTION_SETS = ("avx2", "avx512")
SECTIONS = ("cxx-flags", "nvcc-flags", "link-flags", "cxx", "cuda", *INSTRUCTION_SETS)


def read_sources_list(path: str = SOURCES_LIST) -> dict[str, list[str]]:
    """The sections of csrc/sources.txt: ``{"cxx": [...], "cxx-flags": [...], ...}``, sources
    as paths relative to the project root. An instruction set's section holds sources and
    flags (the items that start with "-"): ``"avx2"`` the sources, ``"avx2-flags"`` the flags.
    Every .cpp and .cu file under csrc/ must be listed."""
    sections: dict[str, list[str]] = {name: [] for name in SECTIONS}
    current = None
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = line[1:-1].strip()
                if current not in sections:
                    raise SystemExit(
                        f"{path}:{number}: unknown section [{current}]; setup.py knows "
                        f"{', '.join(SECTIONS)} (teach CMakeLists.txt a new one too)"
                    )
                continue
            if current is None:
                raise SystemExit(f"{path}:{number}: {line!r} comes before any [section]")
            sections[current].extend(line.split())
    for name in INSTRUCTION_SETS:
        items = sections[name]
        sections[name] = [item for item in items if not item.startswith("-")]
        sections[f"{name}-flags"] = [item for item in items if item.startswith("-")]
    csrc = os.path.dirname(path)
    kinds = ("cxx", "cuda", *INSTRUCTION_SETS)
    for kind in kinds:
        sections[kind] = [os.path.join(csrc, source) for source in sections[kind]]
    listed = {os.path.normpath(s) for kind in kinds for s in sections[kind]}
    on_disk = {
        os.path.normpath(os.path.join(folder, name))
        for folder, _, names in os.walk(csrc)
        for name in names
        if name.endswith((".cpp", ".cu"))
    }
    if on_disk - listed:
        raise SystemExit(f"{path}: add {sorted(on_disk - listed)} (or remove the files)")
    if listed - on_disk:
        raise SystemExit(f"{path}: {sorted(listed - on_disk)} listed but missing")
    return sections


def _find_cuda_home() -> str | None:
    """The toolkit root: $CUDA_HOME, /usr/local/cuda, or the parent of nvcc's bin/."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if (
            root
            and os.path.exists(os.path.join(root, "bin", "nvcc"))
            and os.path.exists(os.path.join(root, "include", "cuda_runtime.h"))
        ):
            return root
    return None


def _build_ext_class(cpp_extension):
    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension, plus the sources of ``ext.instruction_sets`` (name ->
        (sources, flags)): each set is compiled with the C++ flags and its own into a folder of
        its own under build_temp (a ninja file of its own, so that rebuilds stay incremental),
        before the other sources, and linked after them. Where several objects hold a copy of
        one inline function, the linker keeps the first: a baseline one."""

        def build_extension(self, ext):
            args = ext.extra_compile_args  # with the flags BuildExtension added to every source
            cxx_flags = args["cxx"] if isinstance(args, dict) else args
            objects = []
            for name, (sources, flags) in getattr(ext, "instruction_sets", {}).items():
                objects += self.compiler.compile(
                    sources,
                    output_dir=os.path.join(self.build_temp, name),
                    macros=ext.define_macros,
                    include_dirs=ext.include_dirs,
                    debug=self.debug,
                    extra_postargs={"cxx": [*cxx_flags, *flags]},
                    depends=ext.depends,
                )
            # Linked after the other objects (once, should the command run twice).
            ext.extra_objects = [o for o in ext.extra_objects if o not in objects] + objects
            super().build_extension(ext)

    return BuildExtension.with_options(use_ninja=True)


def _extensions():
    if not _flag("RECALLPRUNE_BUILD_EXT"):
        return [], {}

    cuda_home = _find_cuda_home() if _flag("RECALLPRUNE_BUILD_CUDA") else None
    if cuda_home:
        # cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home

    import torch
    from torch.utils import cpp_extension

    here = os.path.dirname(os.path.abspath(__file__))
    listed = read_sources_list()
    cpp_sources, cuda_sources = listed["cxx"], listed["cuda"]
    # torch has per-instruction-set kernels on x86-64 only; elsewhere these files compile to
    # tables that point at the baseline kernels.
    if platform.machine().lower() in ("x86_64", "amd64"):
        instruction_sets = {
            name: (listed[name], listed[f"{name}-flags"]) for name in INSTRUCTION_SETS
        }
    else:
        instruction_sets = {}
        cpp_sources = cpp_sources + [s for name in INSTRUCTION_SETS for s in listed[name]]
    cxx_flags = listed["cxx-flags"]
    extra_link_args = listed["link-flags"]
    include_dirs = [os.path.join(here, "csrc")]
    use_cuda = bool(cuda_home) and torch.version.cuda is not None and bool(cuda_sources)

    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        # The CUDA 13 library headers ship in the torch wheels (nvidia/cu13/include).
        try:
            import nvidia

            for base in nvidia.__path__:
                wheel_include = os.path.join(base, "cu13", "include")
                if os.path.isdir(wheel_include):
                    include_dirs.append(wheel_include)
        except ImportError:
            pass
        nvcc_flags = listed["nvcc-flags"]
        ext = cpp_extension.CUDAExtension(
            "recallprune._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=extra_link_args,
        )
    else:
        ext = cpp_extension.CppExtension(
            "recallprune._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link_args,
        )
    ext.instruction_sets = instruction_sets
    # The flags, every file a source includes, and the sources compiled apart: setuptools
    # rebuilds when one of them is newer than the library (ninja then recompiles what changed).
    files = glob.glob(os.path.join("csrc", "**", "*"), recursive=True)
    headers = sorted(f for f in files if f.endswith((".h", ".inl", ".cuh")))
    apart = [s for sources, _ in instruction_sets.values() for s in sources]
    ext.depends = [SOURCES_LIST, *headers, *apart]
    print(f"recallprune: building _C with {'C++ and CUDA' if use_cuda else 'C++ only'} kernels")
    return [ext], {"build_ext": _build_ext_class(cpp_extension)}


# Build front ends (pip, python -m build, python setup.py) run this file as __main__; the
# tests load it under another name to read the sources list without building.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

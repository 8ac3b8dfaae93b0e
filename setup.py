"""Build recallprune._C: the C++ kernels always, the CUDA kernels whenever a toolkit is found.

The sources and compiler flags are listed in csrc/sources.txt, which CMakeLists.txt reads too.
Switches (environment):
  RECALLPRUNE_BUILD_EXT=0   build no extension (pure-torch fallback only)
  RECALLPRUNE_BUILD_CUDA=0  build the C++ kernels only
The CUDA sources are compiled whenever a CUDA toolkit is found and torch is a CUDA
build, even without a GPU, so that every build compile-checks them.
"""

import os
import shutil

from setuptools import setup


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


SOURCES_LIST = os.path.join("csrc", "sources.txt")
SECTIONS = ("cxx-flags", "nvcc-flags", "link-flags", "cxx", "cuda")


def read_sources_list(path: str = SOURCES_LIST) -> dict[str, list[str]]:
    """The sections of csrc/sources.txt: ``{"cxx": [...], "cxx-flags": [...], ...}``, sources
    as paths relative to the project root. Every .cpp and .cu file under csrc/ must be listed."""
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
    csrc = os.path.dirname(path)
    for kind in ("cxx", "cuda"):
        sections[kind] = [os.path.join(csrc, source) for source in sections[kind]]
    listed = {os.path.normpath(s) for s in sections["cxx"] + sections["cuda"]}
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
    cxx_flags = listed["cxx-flags"]
    extra_link_args = listed["link-flags"]
    include_dirs = [os.path.join(here, "csrc")]
    use_cuda = bool(cuda_home) and torch.version.cuda is not None and bool(cuda_sources)

    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
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
    print(f"recallprune: building _C with {'C++ and CUDA' if use_cuda else 'C++ only'} kernels")
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


# Build front ends (pip, python -m build, python setup.py) run this file as __main__; the
# tests load it under another name to read the sources list without building.
if __name__ == "__main__":
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)

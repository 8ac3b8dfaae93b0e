"""Build recallprune._C: the C++ kernels always, the CUDA kernels whenever a toolkit is found.

Switches (environment):
  RECALLPRUNE_BUILD_EXT=0   build no extension (pure-torch fallback only)
  RECALLPRUNE_BUILD_CUDA=0  build the C++ kernels only
The CUDA sources are compiled whenever a CUDA toolkit is found and torch is a CUDA
build, even without a GPU, so that every build compile-checks them.
"""

import glob
import os
import shutil

from setuptools import setup


def _flag(name: str, default: str = "1") -> bool:
    return os.environ.get(name, default).strip().lower() not in ("0", "false", "no", "off", "")


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
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cpp_sources += sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))

    cxx_flags = [
        "-O3",
        "-std=c++20",
        "-fopenmp",
        "-Wall",
        "-Wno-unused-function",
        "-Wno-unknown-pragmas",
        "-Wno-psabi",  # ABI notes about vector returns in the per-instruction-set files
    ]
    extra_link_args = ["-fopenmp"]
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
        nvcc_flags = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo"]
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


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

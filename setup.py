"""Builds imp_fast._C from csrc/ (the pytorch/extension-cpp pattern).

CPU sources (csrc/*.cpp) are always compiled; CUDA sources (csrc/cuda/*.cu) only when the
installed torch has CUDA and a CUDA toolkit is found. With no sources, nothing is built and
imp_fast falls back to its reference backend.

The sdist carries all of csrc/ (MANIFEST.in); build with torch already installed:
`pip install . --no-build-isolation`, or from the sdist `pip wheel --no-build-isolation
--no-deps imp_fast-<version>.tar.gz` (build isolation would install an unpinned torch).
"""
import glob
import os

from setuptools import setup


def _extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources or os.environ.get("IMP_FAST_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    # Headers: not compiled, but a change to one must rebuild the sources that include it.
    headers = sorted(
        glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "cuda", "*.cuh"))
    )
    use_cuda = (
        bool(cuda_sources)
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and os.environ.get("IMP_FAST_NO_CUDA") != "1"
    )
    # No -std flag: BuildExtension adds the one the installed torch needs (C++17 for
    # older torch, C++20 from torch 2.14, whose headers refuse to build as C++17).
    cxx = ["-O3"] if os.name != "nt" else ["/O2"]
    if use_cuda:
        ext = CUDAExtension(
            "imp_fast._C",
            sources + cuda_sources,
            depends=headers,
            extra_compile_args={"cxx": cxx + ["-DIMP_FAST_WITH_CUDA"], "nvcc": ["-O3", "-DIMP_FAST_WITH_CUDA"]},
            py_limited_api=False,
        )
    else:
        ext = CppExtension("imp_fast._C", sources, depends=headers, extra_compile_args={"cxx": cxx})
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

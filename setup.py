"""Builds krypton._C, the compiled stitch op (see ext/ and krypton/ops.py).

CPU kernel always (CppExtension, OpenMP). The CUDA kernel and its binding are added only when the
installed torch is a CUDA build and nvcc is found (CUDAExtension); set KRYPTON_BUILD_CUDA=0 to
force a CPU-only build, KRYPTON_BUILD_CUDA=1 to fail instead of silently skipping CUDA.

Needs torch at build time: pip install --no-build-isolation -e .
"""
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - build-time guidance
    sys.exit(
        "krypton's extension builds against the installed torch; install torch first "
        "(pip install -r requirements.txt) and build with `pip install --no-build-isolation -e .` "
        f"({exc})"
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda():
    flag = os.environ.get("KRYPTON_BUILD_CUDA", "").strip()
    has_cuda_torch = torch.version.cuda is not None
    home = cpp_extension.CUDA_HOME
    # torch guesses CUDA_HOME from nvcc's location; a wrapper script in /usr/local/bin makes it
    # guess /usr/local, which has no CUDA headers. Require the headers, or say what to set.
    has_nvcc = home is not None and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))
    if flag == "0":
        return False
    if has_cuda_torch and home is not None and not has_nvcc:
        print(
            f"krypton: CUDA_HOME={home!r} has no include/cuda_runtime.h; set CUDA_HOME to the "
            "CUDA toolkit (e.g. /usr/local/cuda) to build the CUDA kernel"
        )
    if flag == "1" and not (has_cuda_torch and has_nvcc):
        sys.exit(
            f"KRYPTON_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r}, "
            f"CUDA_HOME={home!r}"
        )
    return has_cuda_torch and has_nvcc


def _extension():
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    sources = ["ext/stitch.cpp", "ext/arena.cpp"]
    if _want_cuda():
        sources += ["ext/cuda/stitch_cuda.cpp", "ext/cuda/stitch_kernel.cu"]
        print("krypton: building CPU + CUDA kernels (torch CUDA %s)" % torch.version.cuda)
        return cpp_extension.CUDAExtension(
            "krypton._C",
            sources,
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            extra_link_args=link,
        )
    print(
        "krypton: building the CPU kernel only (torch.version.cuda=%r, CUDA_HOME=%r, "
        "KRYPTON_BUILD_CUDA=%r)"
        % (torch.version.cuda, cpp_extension.CUDA_HOME, os.environ.get("KRYPTON_BUILD_CUDA"))
    )
    return cpp_extension.CppExtension(
        "krypton._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    # the extension is ABI-bound to the torch it was compiled against
    install_requires=[f"torch=={torch.__version__}", "numpy"],
    zip_safe=False,
)

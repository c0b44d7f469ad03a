"""Only for the optional ahead-of-time build of the native extension (metadata: pyproject.toml).

    FASTSSL_BUILD_NATIVE=1 pip install --no-build-isolation .

compiles csrc/ (CPU ops; CUDA ops too where torch has CUDA and nvcc is found) into
``fastssl/_fastssl_native*.so``, which ``fastssl.native`` loads instead of building on first
use. ``--no-build-isolation`` builds against the installed torch (the library only works with
the torch it was built for). Without the variable nothing is compiled and the extension is
built just-in-time on first use. The ahead-of-time build is portable (no -march=native), so it
can be slower than the JIT build, which targets the CPU it runs on.
"""
import os
from glob import glob

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTSSL_BUILD_NATIVE", "0") == "1":
    import torch
    from torch.utils import cpp_extension

    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    sources = sorted(glob("csrc/cpu/*.cpp"))
    if with_cuda:
        sources += sorted(glob("csrc/cuda/*.cu") + glob("csrc/cuda/*.cpp"))
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    ext_modules = [extension(
        "fastssl._fastssl_native", sources,
        extra_compile_args={"cxx": ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"], "nvcc": ["-O3"]},
        extra_link_args=["-fopenmp"],
    )]
    cmdclass = {"build_ext": cpp_extension.BuildExtension}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

"""Only for the optional ahead-of-time build of the native extension (metadata: pyproject.toml).

    FASTSSL_BUILD_NATIVE=1 pip install --no-build-isolation .

compiles the native extension's parts (``fastssl.runtime.native``): the CPU part
(``csrc/<family>/*_cpu.cpp``) into ``fastssl/_fastssl_native_cpu*.so`` and, where torch has CUDA
and nvcc is found, the CUDA part (``*.cu``, ``*_cuda.cpp``) into ``fastssl/_fastssl_native_cuda*.so``,
which the runtime loads instead of its cache; a CUDA part that fails to compile is reported and
left out, so the CPU part still installs (``python -m fastssl.build --part cuda`` retries it, and
``python -m fastssl.info`` says it is not built). ``--no-build-isolation`` builds against the
installed torch (the library only works with the torch it was built for). Without the variable
nothing is compiled; ``python -m fastssl.build`` builds it later. The ahead-of-time build is
portable (no -march=native), so it can be slower than ``fastssl.build``'s, which targets the CPU
it runs on.
"""
import os
import sys
from glob import glob

from setuptools import setup

ext_modules, cmdclass = [], {}
if os.environ.get("FASTSSL_BUILD_NATIVE", "0") == "1":
    import torch
    from torch.utils import cpp_extension

    flags = {"cxx": ["-O3", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"], "nvcc": ["-O3"]}
    common = dict(include_dirs=[os.path.abspath("csrc/common")], extra_compile_args=flags, extra_link_args=["-fopenmp"])
    ext_modules = [cpp_extension.CppExtension("fastssl._fastssl_native_cpu", sorted(glob("csrc/*/*_cpu.cpp")), **common)]
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None:
        ext_modules.append(cpp_extension.CUDAExtension(
            "fastssl._fastssl_native_cuda", sorted(glob("csrc/*/*.cu") + glob("csrc/*/*_cuda.cpp")), **common))

    class BuildExtensionKeepingCpu(cpp_extension.BuildExtension):
        """torch's build_ext, except that a failed CUDA part leaves the CPU part installed."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as error:  # compiler errors surface as CompileError, RuntimeError, ...
                if ext.name != "fastssl._fastssl_native_cuda":
                    raise
                print(f"fastssl: the native CUDA part failed to build ({type(error).__name__}: {error}); installing "
                      "the CPU part only (`python -m fastssl.build --part cuda` retries it)", file=sys.stderr)

    cmdclass = {"build_ext": BuildExtensionKeepingCpu}

setup(ext_modules=ext_modules, cmdclass=cmdclass)

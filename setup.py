"""Build of mofast: pure-Python packages plus one native extension built by CMake.

The extension (`mofast.kernels._C`) holds the CPU implementations of the standalone
ops and registers them with `torch.library`. It links against the torch that is
installed in the build environment, so the runtime torch must be the same release.

Environment switches:
    MAX_JOBS          parallel compile jobs (default: the number of CPUs)
    CMAKE_BUILD_TYPE  Release (default), Debug or RelWithDebInfo
    MOFAST_VERBOSE    1 to echo the CMake commands
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only places the result."""

    def __init__(self, name: str, cmake_target: str) -> None:
        super().__init__(name, sources=[])
        self.cmake_target = cmake_target


class CMakeBuild(build_ext):
    """Configure once per build folder, then build each target with CMake."""

    def _jobs(self) -> int:
        return int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)

    def _configure(self, build_dir: Path, out_dir: Path) -> None:
        import torch
        from torch.utils import cpp_extension

        build_type = os.environ.get("CMAKE_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            # The include and library folders of the installed torch, passed directly
            # rather than through find_package(Torch): that keeps a CUDA build of torch
            # from asking for a CUDA toolkit when only the CPU code is compiled.
            "-DTORCH_INCLUDE_DIRS=" + ";".join(cpp_extension.include_paths()),
            "-DTORCH_LIBRARY_DIRS=" + ";".join(cpp_extension.library_paths()),
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        if os.environ.get("MOFAST_VERBOSE") == "1":
            args.append("-DCMAKE_VERBOSE_MAKEFILE=ON")
        subprocess.check_call(["cmake", str(ROOT), *args], cwd=build_dir)

    def build_extensions(self) -> None:
        if shutil.which("cmake") is None:
            raise RuntimeError("building mofast needs cmake: pip install cmake")

        build_dir = Path(self.build_temp).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        for ext in self.extensions:
            out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
            out_dir.mkdir(parents=True, exist_ok=True)
            self._configure(build_dir, out_dir)
            build = ["cmake", "--build", ".", "--target", ext.cmake_target]
            subprocess.check_call([*build, "--parallel", str(self._jobs())], cwd=build_dir)


setup(
    ext_modules=[CMakeExtension("mofast.kernels._C", cmake_target="_C")],
    cmdclass={"build_ext": CMakeBuild},
)

"""The compiled CPU kernel (`gemma4_jax/_cpu_kernels.cc`, an XLA FFI custom call; see `gemma4_jax.kernels`),
built at install time against the XLA FFI headers that jaxlib ships. Optional: where it does not build (no C++17
compiler, not x86-64), the install goes on and the model keeps XLA's float32 path. Everything else is in
pyproject.toml."""

import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class BuildWithJaxlibHeaders(build_ext):
    def build_extensions(self):
        import jax.ffi

        for ext in self.extensions:
            ext.include_dirs.append(jax.ffi.include_dir())
        super().build_extensions()


X86_64 = platform.machine().lower() in ("x86_64", "amd64") and sys.platform != "win32"
kernels = [
    Extension(
        "gemma4_jax._cpu_kernels",
        ["gemma4_jax/_cpu_kernels.cc"],
        # -ffp-contract=off: no fused multiply-adds, the kernel's float steps are the pure-JAX twin's.
        extra_compile_args=["-O3", "-std=c++17", "-ffp-contract=off", "-fno-math-errno"],
        optional=True,
    )
]
setup(ext_modules=kernels if X86_64 else [], cmdclass={"build_ext": BuildWithJaxlibHeaders})

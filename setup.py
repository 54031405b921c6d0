"""Build script: the package, its Triton kernels (``sande_fast.kernels``) and the C++ planner."""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext_modules = [
    Pybind11Extension(
        "sande_fast._planner",
        ["csrc/planner.cpp"],
        cxx_std=17,
        extra_compile_args=["-O3"],
    ),
]

setup(
    packages=["sande_fast", "sande_fast.kernels"],
    ext_modules=ext_modules,
    cmdclass={"build_ext": build_ext},
)

"""Build of dsl_kernels.

``pip install --no-build-isolation -e .`` compiles against the installed torch:
the C++ CPU extension always, the CUDA extension when torch has CUDA and nvcc is present
(``DSL_KERNELS_CUDA=0/1`` forces it off/on). See csrc/.
"""
from setuptools import find_packages, setup


def extensions():
    """The compiled extensions and the build command (filled in by csrc/)."""
    return [], {}


ext_modules, cmdclass = extensions()

setup(
    name="dsl_kernels",
    version="0.1.0",
    description="Block-sparse embedding bags trained sparse from start to finish "
                "(Dynamic Sparse Learning) with Triton and C++/CUDA kernels",
    python_requires=">=3.10",
    packages=find_packages(include=["dsl_kernels", "dsl_kernels.*"])
    + find_packages("python", include=["dsl_train", "dsl_train.*"]),
    package_dir={"dsl_train": "python/dsl_train"},
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"]},
    entry_points={"console_scripts": ["dsl-train=dsl_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

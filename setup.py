"""Build of dsl_kernels.

``pip install --no-build-isolation -e .`` compiles against the installed torch:
the C++ CPU extension always, the CUDA extension when torch has CUDA and nvcc is present
(``DSL_KERNELS_CUDA=0/1`` forces it off/on). See csrc/.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern, exclude_dir=None):
    """Files under csrc/ matching ``pattern`` (recursive, sorted, relative to the repo root) so
    that new kernel files are built without editing this file."""
    out = []
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True):
        rel = os.path.relpath(path, ROOT)
        if exclude_dir and rel.startswith(os.path.join("csrc", exclude_dir) + os.sep):
            continue
        out.append(rel)
    return sorted(out)


def _want_cuda(torch, cpp_extension):
    """Build the CUDA extension? ``DSL_KERNELS_CUDA=0/1`` forces; by default only when torch
    is a CUDA build and nvcc is found."""
    force = os.environ.get("DSL_KERNELS_CUDA", "").strip()
    has_nvcc = cpp_extension.CUDA_HOME is not None or shutil.which("nvcc") is not None
    if force == "0":
        return False
    if force == "1":
        if torch.version.cuda is None:
            raise RuntimeError("DSL_KERNELS_CUDA=1 but the installed torch is a CPU-only build; "
                               "install a CUDA build of torch (csrc/cuda/*.cu alone can be "
                               "checked with scripts/check_nvcc.sh)")
        if not has_nvcc:
            raise RuntimeError("DSL_KERNELS_CUDA=1 but nvcc was not found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and has_nvcc


def extensions():
    """The compiled extensions and the build command.

    * ``dsl_kernels._C`` (always): csrc/**/*.cpp except csrc/cuda/ -- the op schemas and the
      OpenMP CPU kernels.
    * ``dsl_kernels._C_cuda`` (CUDA torch + nvcc, or ``DSL_KERNELS_CUDA=1``): csrc/cuda/**/*.cu
      (raw-pointer kernels) and csrc/cuda/**/*.cpp (the torch bindings).

    Without torch (e.g. metadata-only builds) nothing is compiled.
    """
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    # -ffp-contract=off: no FMA contraction, so sums are formed exactly as the reference forms
    # them (bit-identical fp32 results, independent of the compiler's target).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off", "-DDSL_KERNELS_PYTHON_MODULE"]
    if os.environ.get("DSL_KERNELS_NATIVE") == "1":
        cxx.append("-march=native")
    exts = [cpp_extension.CppExtension(
        "dsl_kernels._C", _sources("*.cpp", exclude_dir="cuda"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])]
    if _want_cuda(torch, cpp_extension):
        # The kernels spell out __fmul_rn/__fadd_rn where the order of rounding matters.
        nvcc = ["-O3", "-DDSL_KERNELS_PYTHON_MODULE"]
        exts.append(cpp_extension.CUDAExtension(
            "dsl_kernels._C_cuda", _sources("*.cu") + _sources(os.path.join("cuda", "*.cpp")),
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": ["-O3", "-DDSL_KERNELS_PYTHON_MODULE"], "nvcc": nvcc}))
    return exts, {"build_ext": cpp_extension.BuildExtension}


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
    # [torchrec]: dsl_kernels.torchrec (sharding with DistributedModelParallel). torchrec names
    # the CUDA fbgemm-gpu; on CPU-only machines install as the README says (fbgemm-gpu-cpu, then
    # torchrec --no-deps).
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"],
                    "torchrec": ["torchrec==1.8.0", "fbgemm-gpu==1.8.0", "tensordict",
                                 "torchmetrics==1.0.3", "pyre-extensions", "iopath"]},
    entry_points={"console_scripts": ["dsl-train=dsl_train.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

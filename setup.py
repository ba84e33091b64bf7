"""Install ``kernels`` and ``engine``; build the CUDA extension ``kernels._C`` only when asked
or when a CUDA build of PyTorch and a CUDA toolchain are both present.

Environment flags (flash-attention's pattern):
    SSL_FORCE_CUDA_BUILD=1   build the extension even without a visible GPU (e.g. CI with nvcc)
    SSL_SKIP_CUDA_BUILD=1    never build it
    SSL_CUDA_ARCHS="90a;80"  target architectures (default 90a)
A missing toolchain is a warning, never a failure: everything runs without the extension.
"""
import glob
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if _flag("SSL_SKIP_CUDA_BUILD") or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        warnings.warn("PyTorch is not importable at build time: skipping the CUDA extension")
        return [], {}
    wanted = _flag("SSL_FORCE_CUDA_BUILD") or (torch.version.cuda is not None and torch.cuda.is_available())
    if not wanted:
        return [], {}
    if CUDA_HOME is None:
        warnings.warn("no CUDA toolchain found (CUDA_HOME unset): skipping the CUDA extension")
        return [], {}
    archs = os.environ.get("SSL_CUDA_ARCHS", "90a").split(";")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    ext = CUDAExtension(
        name="kernels._C",
        sources=sources,
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "--use_fast_math", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="ssl-kernels-engine",
    version="0.1.0",
    description="Kernel-backed engine for self-supervised visual pre-training (HPM, MAE, contrastive)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["kernels", "kernels.*", "engine", "engine.*"]),
    install_requires=[
        "torch>=2.6",
        "numpy",
        'triton; platform_system == "Linux" and platform_machine == "x86_64"',
        'tomli; python_version < "3.11"',
    ],
    extras_require={
        # the embedded digits data set, images and pictures of the demo run
        "demo": ["scikit-learn", "pillow"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "pillow"],
    },
    entry_points={"console_scripts": ["ssl-engine = engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

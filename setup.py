"""Install the ``sslpt`` package (the folders kernels/, engine/, configs/, csrc/ as ``sslpt.kernels``,
``sslpt.engine``, ``sslpt.configs``, ``sslpt.csrc``); build the CUDA extension ``sslpt.kernels._C`` only when asked
or when a CUDA build of PyTorch and a CUDA toolchain are both present.

Environment flags (flash-attention's pattern):
    SSL_FORCE_CUDA_BUILD=1   build the extension even without a visible GPU (e.g. CI with nvcc)
    SSL_SKIP_CUDA_BUILD=1    never build it
    SSL_CUDA_ARCHS="90a;80"  target architectures (default 90a)
A missing toolchain is a warning, never a failure: everything runs without the extension.
How it is built (nvcc for csrc/*.cu, the host compiler for the torch binding, linked with libcudart) is in
kernels/_cuda.py, which also builds it on first use (JIT) where the package was installed without it.
"""
import glob
import importlib.util
import os
import warnings

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _cuda_helper():
    """kernels/_cuda.py loaded by path: importing the kernels package would need its dependencies."""
    spec = importlib.util.spec_from_file_location("_ssl_cuda_build", os.path.join(HERE, "kernels", "_cuda.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cuda_extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if _flag("SSL_SKIP_CUDA_BUILD") or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        warnings.warn("PyTorch is not importable at build time: skipping the CUDA extension")
        return [], {}
    wanted = _flag("SSL_FORCE_CUDA_BUILD") or (torch.version.cuda is not None and torch.cuda.is_available())
    if not wanted:
        return [], {}
    helper = _cuda_helper()
    home = helper.cuda_home()
    if home is None:
        warnings.warn("no CUDA toolchain found (nvcc; set CUDA_HOME): skipping the CUDA extension")
        return [], {}
    # The .cu files need no torch header: nvcc compiles them (build_ext below) and the binding, an ordinary
    # C++ torch extension, links the objects. CUDAExtension is not used: the CPU build of torch has no CUDA home.
    ext = CppExtension(name="sslpt.kernels._C", sources=["csrc/bindings.cpp"], include_dirs=["csrc"],
                       extra_compile_args=["-O2"], extra_link_args=helper.link_args(home))

    class BuildWithNvcc(BuildExtension):
        def build_extension(self, extension):
            if extension.name != "sslpt.kernels._C":
                return super().build_extension(extension)
            try:
                objects = helper.build_objects(os.path.join(os.path.abspath(self.build_temp), "cuda_objects"),
                                               home=home, verbose=True)
                extension.extra_objects = [*extension.extra_objects, *objects]
                super().build_extension(extension)
            except Exception as exc:  # noqa: BLE001 - never fail the install over the optional extension
                warnings.warn(f"building the CUDA extension sslpt.kernels._C failed, continuing without it: {exc}")

    return [ext], {"build_ext": BuildWithNvcc}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="sslpt",
    version="0.2.0",
    description="Kernel-backed engine for self-supervised visual pre-training (HPM, MAE, contrastive)",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # the top-level folders become subpackages of one distinctive import name (see sslpt/__init__.py)
    packages=["sslpt", "sslpt.configs", "sslpt.csrc"] + [f"sslpt.{name}" for name in
                                                          find_packages(include=["kernels", "kernels.*", "engine",
                                                                                 "engine.*"])],
    package_dir={"sslpt": "sslpt", "sslpt.kernels": "kernels", "sslpt.engine": "engine",
                 "sslpt.configs": "configs", "sslpt.csrc": "csrc"},
    # presets, and the CUDA sources the extension is built from on first use
    package_data={"sslpt": ["py.typed"], "sslpt.configs": ["*.toml"],
                  "sslpt.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp", "*.md"]},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "pillow",   # images: the folder data set and the pictures every run writes
        "safetensors",   # exported encoders (python -m sslpt export)
        'triton; platform_system == "Linux" and platform_machine == "x86_64"',
        'tomli; python_version < "3.11"',
    ],
    extras_require={
        # the embedded digits data set (scikit-learn ships it)
        "demo": ["scikit-learn"],
        "test": ["pytest", "pytest-benchmark", "scikit-learn", "tensorboard", "simplejpeg",
                 "opencv-python-headless"],
        # the fast image input pipeline: JPEGs through libjpeg-turbo, uint8 resizing with OpenCV (data.decoder)
        "fast-data": ["simplejpeg", "opencv-python-headless"],
        # optional run loggers (train.loggers)
        "loggers": ["tensorboard", "wandb"],
    },
    entry_points={"console_scripts": ["sslpt = sslpt.engine.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

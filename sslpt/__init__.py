"""sslpt: a kernel-backed engine for self-supervised visual pre-training.

    from sslpt.kernels import info_nce, patch_loss    # drop-in fused ops
    python -m sslpt pretrain hpm_digits                # the training engine

The repository keeps its folders at the top (``kernels/``, ``engine/``, ``configs/``, ``csrc/``);
the wheel installs them as ``sslpt.kernels``, ``sslpt.engine``, ``sslpt.configs`` and ``sslpt.csrc``,
so neither name can clash with another distribution's ``kernels`` or a user's ``engine.py``.
"""
import os as _os

__version__ = "0.2.0"

# A source checkout (a fresh clone, or an editable install) has the subpackages beside this folder rather
# than inside it: extend the package path to the checkout so `sslpt.kernels` is `<checkout>/kernels`.
_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if (not _os.path.isdir(_os.path.join(_here, "kernels"))
        and _os.path.isfile(_os.path.join(_checkout, "setup.py"))
        and _os.path.isfile(_os.path.join(_checkout, "kernels", "__init__.py"))):
    __path__.append(_checkout)  # noqa: F821 - a package's __path__

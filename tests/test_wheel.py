"""What a user of the drop-in ops gets: the wheel, installed (not editable) into a fresh virtual environment,
used from another directory, beside another distribution's top-level ``kernels`` and a user's ``engine.py``."""
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

USE_OPS = textwrap.dedent('''
    import pathlib, sys
    import torch
    import kernels, engine                                  # the other distribution's and the user's
    assert kernels.OWNER == "someone else" and engine.OWNER == "the user"
    import sslpt
    from sslpt.kernels import attention, gather_tokens, info_nce, patch_loss, random_masking
    from sslpt.kernels.reference import info_nce_ref
    site = pathlib.Path(sys.argv[1])
    assert pathlib.Path(sslpt.__file__).resolve().is_relative_to(site), sslpt.__file__
    assert sslpt.__version__ and (site / "sslpt" / "py.typed").is_file()
    assert (site / "sslpt" / "configs" / "simclr_digits.toml").is_file()
    assert any((site / "sslpt" / "csrc").glob("*.cu")), "CUDA sources ship for the first-use build"
    torch.manual_seed(0)
    x = torch.randn(2, 6, 4, requires_grad=True)
    m = random_masking(2, 6, 0.5)
    gather_tokens(x, m.ids_keep).sum().backward()                       # masked patch gathering
    q = torch.randn(2, 2, 5, 8)
    assert attention(q, q, q, backend="reference").shape == q.shape     # attention
    loss, per_patch = patch_loss(torch.randn(2, 6, 4), torch.randn(2, 6, 4), m.mask)   # loss prediction
    a, b = torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64)
    torch.testing.assert_close(info_nce(a, b, 0.2), info_nce_ref(a, b, 0.2))           # contrastive
    print("ops ok")
''')


def run(cmd, cwd, timeout=600, env=None):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, f"{cmd}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_wheel_installs_alone_and_serves_ops_and_presets(tmp_path):
    dist = tmp_path / "dist"
    env = dict(os.environ, SSL_SKIP_CUDA_BUILD="1")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
         str(ROOT)], cwd=tmp_path, env=env)
    wheel, = dist.glob("sslpt-*.whl")
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"sslpt"}, tops   # nothing else at the top

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                    cwd=tmp_path).strip())
    # torch, numpy, scikit-learn come from this environment (no download); its editable install of sslpt
    # is not seen: a plain path entry does not process that folder's .pth files
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path)

    # another distribution's top-level `kernels` package, and a user's own engine.py in the working directory
    (site / "kernels").mkdir()
    (site / "kernels" / "__init__.py").write_text('OWNER = "someone else"\n')
    work = tmp_path / "user_project"
    work.mkdir()
    (work / "engine.py").write_text('OWNER = "the user"\n')
    (work / "use_ops.py").write_text(USE_OPS)
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KERNELS_BACKEND")}
    clean["TRITON_INTERPRET"] = "1"
    assert "ops ok" in run([str(python), "use_ops.py", str(site)], cwd=work, env=clean)

    out = run([str(python), "-m", "sslpt", "pretrain", "simclr_digits", "--quiet", "--run-dir", str(work / "run"),
               "--set", "train.epochs=1", "--set", "train.probe=false"], cwd=work, env=clean)
    assert "final training loss" in out
    assert (work / "run" / "config.toml").is_file() and (site / "kernels" / "__init__.py").is_file()
    presets = run([str(python), "-m", "sslpt", "presets"], cwd=work, env=clean)
    assert "hpm_digits" in presets and "simclr_digits" in presets

"""make aot-check: Triton launches compiled for sm_90a without a GPU, and failing on a config that cannot run.

Runs benchmarks/aot_check.py in a subprocess without TRITON_INTERPRET (under the interpreter, which the test suite
uses, kernels cannot be compiled). Compiles a few kernels: seconds with a warm Triton cache, ~30 s cold.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("triton")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO, TRITON_DEFAULT_FP_FUSION="1")
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.aot_check", *args, "--json", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.fixture(scope="module")
def oversized(tmp_path_factory):
    from triton import knobs

    if not (shutil.which("ptxas") or os.path.exists(knobs.nvidia.ptxas.path)):
        pytest.skip("no ptxas")
    return _run(tmp_path_factory.mktemp("aot"), "--cases", "patch_loss", "--oversized")


def test_fails_on_a_deliberately_oversized_config(oversized):
    proc, data = oversized
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    bad = [x for x in data["launches"] if x["problems"]]
    assert [x["case"] for x in bad] == ["oversized"] and not data["errors"]
    assert bad[0]["shared"] > 227 * 1024 and "shared memory" in bad[0]["problems"][0]
    assert "FAIL oversized / _info_nce_fwd_kernel" in proc.stdout and "FAILED" in proc.stdout


def test_reports_every_launch_of_a_case(oversized):
    proc, data = oversized
    ours = [x for x in data["launches"] if x["case"] == "patch_loss"]
    kernels = {x["kernel"] for x in ours}
    assert {"_patch_loss_fwd_kernel", "_patch_loss_bwd_kernel", "_relative_loss_fwd_kernel"} <= kernels
    for x in ours:  # compiled for sm_90a: registers and spills from ptxas, shared memory from the metadata
        assert x["registers"] > 0 and x["spill_stores"] == 0 and x["shared"] <= 227 * 1024 and not x["problems"]
    assert data["arch"] == 90 and "| patch_loss | _patch_loss_fwd_kernel |" in proc.stdout


def test_judge_rules():
    from benchmarks import aot_check

    ok = aot_check.Launch("c", "k", {}, shared=100 * 1024, spill_stores=0, dot="wgmma")
    assert aot_check.judge(ok, 90) == []
    bad = aot_check.Launch("c", "k", {}, shared=300 * 1024, spill_stores=8, dot="mma.sync")
    assert len(aot_check.judge(bad, 90)) == 3
    assert aot_check.parse_ptxas("    0 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
                                 "ptxas info    : Used 255 registers") == {
        "registers": 255, "stack": 0, "spill_stores": 12, "spill_loads": 8}


def test_the_whole_check_knows_every_kernel_of_the_ops():
    """With every case, a Triton kernel that no case launches fails the check (coverage); the list it checks
    against is every ``*_kernel`` JIT function of sslpt.kernels, device helpers excluded."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=REPO)
    code = "from benchmarks.aot_check import launched_kernels; print(' '.join(sorted(launched_kernels())))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = set(proc.stdout.split())
    assert {"_dense_match_kernel", "_info_nce_bwd_kernel", "_sparse_attention_bwd_dq_kernel",
            "_teacher_pass_kernel", "_embed_visible_patches_gather_kernel"} <= names
    assert not names & {"_softplus", "_row_stats", "_load_tile"}   # @triton.jit device functions

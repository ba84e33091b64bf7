"""Objectives are self-contained units: each declares its name, config section, presets and encoders; the
engine knows none of their fields; a plugin objective trains with the stock CLI; imports have no cycle."""
import ast
import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sslpt.engine import registry
from sslpt.engine.cli import main
from sslpt.engine.config import CONFIG_DIR, ConfigError, ObjectiveSettings, is_resnet, load_config, to_toml
from sslpt.engine.models.vit import Attention
from sslpt.engine.objectives import Objective, build_objective

ROOT = Path(__file__).resolve().parent.parent
PLUGIN_PRESET = Path(__file__).resolve().parent / "plugins" / "rotation_digits.toml"
STOCK = registry.names()   # every objective of the package (the plugin is added where it applies)


def test_every_objective_declares_what_it_is():
    assert {"hpm", "mae", "mocov3", "simclr"} <= set(STOCK)
    declared = {}
    for name in registry.names():
        cls = registry.get(name)
        assert issubclass(cls, Objective) and cls.name == name
        assert issubclass(cls.Settings, ObjectiveSettings) and cls.Settings.objective == name
        for preset in cls.presets:
            declared[preset] = name
    # every preset file belongs to the objective that lists it, and every listed preset exists
    files = {p.stem: load_config(p).objective.name for p in CONFIG_DIR.glob("*.toml")}
    assert files == declared


def test_config_module_knows_no_objective_field():
    assert [f.name for f in dataclasses.fields(ObjectiveSettings)] == []
    source = (ROOT / "engine" / "config.py").read_text()
    for name in STOCK:
        for field in dataclasses.fields(registry.get(name).Settings):
            # whole names only: optim.sgd_momentum is no objective's `momentum`
            assert not re.search(rf"\b{field.name}:", source) and f'"{field.name}"' not in source, field.name


@pytest.mark.parametrize("override, message", [
    ("objective.hpm.temperature=0.1", "unknown config key objective.hpm.temperature"),
    ("objective.simclr.temperature=0.1", "[objective.simclr] configures objective 'simclr', but objective.name = "
                                         "'hpm'"),
    ("objective.mask_ratio=0.5", "objective settings live in their objective's section, objective.hpm.mask_ratio"),
    ("objective.hmp.alpha_T=0.5", "did you mean objective.hpm?"),
    ("objective.name=hmp", "objective.name must be one of"),
    ("objective.hpm=3", "objective.hpm is a section"),
    ("plugins=[\"no_such_file.py\"]", "plugins: cannot import 'no_such_file.py'"),
])
def test_objective_section_errors_name_the_section(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("hpm_digits", [override])
    assert message in str(err.value)


def test_choice_fields_are_checked_by_the_loader():
    with pytest.raises(ConfigError, match=r"objective\.simclr\.pooling must be one of 'cls', 'mean'; got 'max'"):
        load_config("simclr_digits", ['objective.simclr.pooling="max"'])
    with pytest.raises(ConfigError, match=r"train\.parallel must be one of 'none', 'ddp', 'fsdp'; got 'zero'"):
        load_config("hpm_digits", ["train.parallel=zero"])


@pytest.mark.parametrize("name", ["simclr", "mocov3"])
def test_two_view_objectives_refuse_a_data_crop(name):
    with pytest.raises(ConfigError, match=rf"{name} makes its own two views.*data\.crop_scale = \[1\.0, 1\.0\]"):
        load_config(f"{name}_digits", ["data.crop_scale=[0.5, 1.0]"])


def test_hpm_run_has_no_contrastive_settings():
    cfg = load_config("hpm_digits")
    assert not hasattr(cfg.objective, "temperature") and not hasattr(cfg.objective, "view_hflip")
    text = to_toml(cfg)
    assert "[objective.hpm]" in text and "temperature" not in text


TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "model.decoder_dim=16", "model.decoder_depth=1",
        "model.decoder_heads=2"]


@pytest.mark.parametrize("name", STOCK + ["rotation"])
def test_attn_backend_reaches_every_encoder(name):
    preset = PLUGIN_PRESET if name == "rotation" else f"{name}_digits"
    cfg = load_config(preset, TINY + ["model.attn_backend=reference"])
    objective = build_objective(cfg)
    cls = type(objective)
    random_encoder = cls.random_encoder(cfg.objective, cfg.model)
    for module in (objective, random_encoder):
        backends = {m.backend for m in module.modules() if isinstance(m, Attention)}
        # a ResNet preset may have no attention at all; whatever attention there is takes the setting
        ok = backends <= {"reference"} if is_resnet(cfg.model) else backends == {"reference"}
        assert ok, (name, backends)
    # the probe's baseline has the shape of the trained encoder
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items()}  # noqa: E731
    assert shapes(random_encoder) == shapes(objective.encoder)


FAST = ["train.probe=false", "train.eval_every=0", "data.name=synthetic", "data.synthetic_size=96",
        "train.batch_size=32", "train.log_every=100"]


@pytest.mark.slow
@pytest.mark.parametrize("name", STOCK + ["rotation"])
def test_two_epochs_resume_two_equals_four(tmp_path, name):
    from sslpt.engine.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
    from sslpt.engine.train import pretrain

    preset = PLUGIN_PRESET if name == "rotation" else f"{name}_digits"
    cfg = load_config(preset, TINY + FAST + ["train.epochs=4", "train.save_every=2"])
    straight = pretrain(cfg, run_dir=tmp_path / "a", show_progress=False)
    pretrain(cfg, run_dir=tmp_path / "b", show_progress=False)
    newest = list_checkpoints(tmp_path / "b")[-1]
    shutil.rmtree(newest)   # a crash after epoch 2: the epoch-4 checkpoint never existed
    resumed = pretrain(cfg, run_dir=tmp_path / "b", resume=True, show_progress=False)
    states = []
    for run in (straight, resumed):
        objective = build_objective(cfg)
        load_checkpoint(latest_checkpoint(run.run_dir), objective)
        states.append(objective.state_dict())
    a, b = states
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_plugin_objective_trains_with_the_stock_cli(tmp_path, capsys):
    run_dir = tmp_path / "rotation"
    args = ["pretrain", str(PLUGIN_PRESET), "--quiet", "--run-dir", str(run_dir), "--set", "train.epochs=1",
            "--set", "train.probe_max_images=400", "--set", "train.probe_shots=0"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "linear probe, cls token" in out and "final training loss" in out
    saved = (run_dir / "config.toml").read_text()
    assert "[objective.rotation]" in saved and str(PLUGIN_PRESET.parent / "rotation.py") in saved
    # the saved config names the plugin by absolute path: resume finds it from any directory
    assert main(["resume", str(run_dir), "--quiet", "--set", "train.epochs=2", "--set", "train.probe=false"]) == 0
    assert (run_dir / "checkpoints").is_dir()


def test_docs_walk_through_the_plugin_that_the_tests_build():
    doc = (ROOT / "docs" / "adding_an_objective.md").read_text()
    for path in (PLUGIN_PRESET.parent / "rotation.py", PLUGIN_PRESET):
        assert path.read_text().strip() in doc, f"docs/adding_an_objective.md must show {path.name} as it is"


# ------------------------------------------------------------------------------------------------ imports
def _modules(folder: str, package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every sslpt module ``name`` imports, at module level or inside functions."""
    found = set()
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_cycles_and_kernels_never_import_the_engine():
    modules = {**_modules("engine", "sslpt.engine"), **_modules("kernels", "sslpt.kernels")}
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    for name, deps in graph.items():
        if name.startswith("sslpt.kernels"):
            assert not any(d.startswith("sslpt.engine") for d in deps), (name, deps)
    # a package importing its own submodules is not a cycle; anything else that leads back is
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for dep in graph[node]:
            if node.startswith(dep + "."):
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                if not all(a.startswith(b + ".") or b.startswith(a + ".") for a, b in zip(cycle, cycle[1:])):
                    pytest.fail("import cycle: " + " -> ".join(cycle))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_every_module_imports_in_a_fresh_interpreter():
    modules = [m for m in (*_modules("engine", "sslpt.engine"), *_modules("kernels", "sslpt.kernels"))
               if not m.endswith("__main__")]   # that one runs the CLI
    code = ("import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'engine'))\n"
            "assert not bad, f'imported under a bare name: {bad}'\n")
    # two interpreters, the modules in opposite orders: an order-dependent (partially initialised) import fails
    for order in (modules, modules[::-1]):
        result = subprocess.run([sys.executable, "-c", code, *order], capture_output=True, text=True, cwd=ROOT,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]


def test_every_document_a_file_names_is_in_the_repository():
    """A reader of the repository can follow every `*.md` a comment, docstring or doc names: it exists here, or the
    line says which outside repository it belongs to (an official code base named by its github.com address)."""
    import re

    present = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    names = {Path(p).name for p in present} | {"gpu_check.md"}   # the GPU check writes that report
    missing = []
    for folder in ("engine", "kernels", "csrc", "configs", "benchmarks", "tests", "docs", "scripts", "sslpt"):
        for path in (ROOT / folder).rglob("*"):
            if not path.is_file() or path.suffix not in (".py", ".md", ".toml", ".cu", ".cuh", ".cpp", ".h", ".sh"):
                continue
            for number, line in enumerate(path.read_text(errors="ignore").splitlines(), 1):
                if "github.com" in line:
                    continue
                for doc in re.findall(r"[\w./-]*\w\.md\b", line):
                    if doc not in present and Path(doc).name not in names:
                        missing.append(f"{path.relative_to(ROOT)}:{number}: {doc}")
    assert not missing, missing

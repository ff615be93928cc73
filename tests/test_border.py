"""The core's border, across every built-in plugin: what plugins may read of the trainer and the
config, and that blocking any of them leaves a run directory that the core's API opens.

- Plugins read only what `engine.TrainerView` lists (checked on their source), annotate their
  hooks' ``trainer`` with it, and read no other plugin's settings.
- A run with any built-in plugin blocked is refused up front in one line, or its directory works
  with `engine.load`, ``--resume``, ``evaluate`` and ``runs``.
"""

from __future__ import annotations

import ast
import inspect
import re
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from engine.cli import main

REPO = Path(__file__).resolve().parents[1]
PLUGIN_FILES = sorted((REPO / "plugins").rglob("*.py"))
# The core's own settings, which every plugin may read: its sections and top-level keys.
CORE_SECTIONS = {"log", "inferred", *inspect.signature(engine.config.CoreSettings).parameters}


def trainer_surface() -> set[str]:
    view = engine.TrainerView
    methods = {name for name, _ in inspect.getmembers(view, inspect.isfunction) if not name.startswith("_")}
    return set(view.__annotations__) | methods


def reads_of(tree: ast.AST, owner: str) -> list[tuple[int, str]]:
    """(line, attribute) of every ``owner.X`` and ``self.owner.X`` in `tree`."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        value = node.value
        if (isinstance(value, ast.Name) and value.id == owner) or (
            isinstance(value, ast.Attribute) and value.attr == owner and isinstance(value.value, ast.Name)
        ):
            found.append((node.lineno, node.attr))
    return found


@pytest.mark.parametrize("path", PLUGIN_FILES, ids=lambda path: str(path.relative_to(REPO)))
def test_plugins_read_only_what_the_trainer_view_lists(path: Path) -> None:
    surface = trainer_surface()
    tree = ast.parse(path.read_text())
    unlisted = [f"line {line}: trainer.{name}" for line, name in reads_of(tree, "trainer") if name not in surface]
    assert not unlisted, f"{path.name} reads what engine.TrainerView does not list: {unlisted}"
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("hookimpl" in ast.unparse(d) for d in node.decorator_list):
            for argument in node.args.args:
                if argument.arg == "trainer":
                    annotation = ast.unparse(argument.annotation) if argument.annotation else "nothing"
                    assert annotation == "engine.TrainerView", (
                        f"{path.name}:{node.lineno}: {node.name}'s trainer is annotated {annotation}, "
                        "not engine.TrainerView"
                    )


def test_the_trainer_has_everything_its_view_lists() -> None:
    trainer = engine.setup({"epochs": 2})
    trainer.run_dir = Path("unused")
    missing = [name for name in trainer_surface() if not hasattr(trainer, name)]
    assert not missing, f"engine.Trainer lacks what engine.TrainerView lists: {missing}"


def declared_sections(plugin: object) -> set[str]:
    """The config sections `plugin` declares settings in, and the component kinds it provides."""
    sections: set[str] = set()
    for hook in ("register_settings", "register_components"):
        implementation = getattr(plugin, hook, None)
        if implementation is not None and hasattr(implementation, "engine_impl"):
            sections |= set(implementation() or {}) - {"default"}
    return sections


@pytest.mark.parametrize(
    "ep", sorted(entry_points(group=engine.ENTRY_POINT_GROUP), key=lambda ep: ep.name), ids=lambda ep: ep.name
)
def test_plugins_read_no_other_plugins_settings(ep) -> None:
    """Every ``config["section"]`` a built-in plugin reads is its own, the core's, or a component
    kind's ``name`` (which the core resolves)."""
    loaded = ep.load()
    plugin = loaded() if inspect.isclass(loaded) else loaded
    own = declared_sections(plugin) | CORE_SECTIONS
    module = inspect.getmodule(loaded)
    files = [Path(module.__file__)]
    if Path(module.__file__).name == "__init__.py":
        files = sorted(Path(module.__file__).parent.glob("*.py"))
    kinds = set(engine.components.CORE_KINDS)
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            section = config_section(node)
            if section is None or section in own:
                continue
            # A core kind's section: only its component's `name` (the core resolves it), and the
            # keys the core adds to it (`[model] output`, `targets`: how the model is called).
            outer = node.slice.value if isinstance(node.slice, ast.Constant) else None
            if section in kinds and (outer in (None, "name") or outer in core_keys(section)):
                continue
            pytest.fail(f"{path.name}:{node.lineno}: plugin {ep.name!r} reads config[{section!r}][{outer!r}]")


def core_keys(section: str) -> set[str]:
    """The keys the core declares in a component kind's section."""
    declared = engine.config.CORE_SECTIONS.get(section)
    return set(inspect.signature(declared).parameters) if declared is not None else set()


def config_section(node: ast.AST) -> str | None:
    """``"x"`` when `node` is ``config["x"][...]`` (or ``something.config["x"][...]``): the
    section whose key it reads; for ``config["x"]`` alone, the outer subscript is None."""
    if not (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant)):
        return None
    inner = node.value
    if isinstance(inner, ast.Subscript) and isinstance(inner.slice, ast.Constant) and reads_config(inner.value):
        return inner.slice.value if isinstance(inner.slice.value, str) else None
    return None


def reads_config(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "config") or (
        isinstance(node, ast.Name) and node.id == "config"
    )


# --- blocking each built-in plugin --------------------------------------------------------------

BUILT_INS = sorted(
    ep.name for ep in entry_points(group=engine.ENTRY_POINT_GROUP) if ep.value.startswith("engine_plugins")
)
ESSENTIAL = {ep.name for ep in entry_points(group="engine.essential")}
# In the default run: the essential one, the two that were load-bearing, one whose component the
# job needs; the others run with the slow tests.
QUICK = {"batching", "checkpoint", "metrics_file", "losses"}


@pytest.fixture(scope="module")
def tutorial_file(tmp_path_factory) -> Path:
    """The tutorial's data as an npz file, for evaluate."""
    rng = np.random.RandomState(42)
    x = rng.randn(100, 1).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "tutorial.npz"
    np.savez(path, x=x, y=(2 * x + 3).astype(np.float32))
    return path


@pytest.mark.parametrize(
    "blocked", [name if name in QUICK else pytest.param(name, marks=pytest.mark.slow) for name in BUILT_INS]
)
def test_a_run_with_any_plugin_blocked_is_refused_up_front_or_its_directory_works(
    blocked: str, tutorial_file: Path, capsys
) -> None:
    code = main(["run", "--set", "epochs=3", "--set", "run_name=r", "--block", blocked, "--quiet"])
    err = capsys.readouterr().err
    if code:
        assert code == 2 and len(err.strip().splitlines()) == 1, err  # refused up front, in one line
        assert not Path("runs/r").exists()
        if blocked in ESSENTIAL:
            assert (
                err
                == f"error: plugin {blocked!r} is essential and cannot be blocked (the engine cannot run without it)\n"
            )
        else:  # it provides the component a kind of the job needs
            # (or the default, where other plugins provide components of the kind: then they are named)
            why = r"(and no plugin provides one|no plugin sets a default \(choose one of: .*\))"
            message = rf"error: \w+\.name: required, {why}.*\n"
            assert re.fullmatch(message, err), err
        return
    run_dir = Path("runs/r")
    assert tuple(engine.load(run_dir)(torch.ones(2, 1)).shape) == (2, 1)
    assert main(["evaluate", str(run_dir), "--data", str(tutorial_file), "--backend", "eager"]) == 0
    assert main(["runs"]) == 0 and " r " in capsys.readouterr().out.replace("\n", " ")
    # With the plugin blocked again: without it, a component kind it left unchosen would get its
    # default, which a resume refuses as another course (accelerate.name None -> 'eager').
    resumed = main(["run", "--resume", str(run_dir), "--set", "epochs=4", "--block", blocked, "--quiet"])
    err = capsys.readouterr().err
    if blocked == "checkpoint":  # a run that wrote no checkpoints has none to continue from
        assert resumed == 2 and "no plugin implements find_checkpoint" in err, err
    else:
        assert resumed == 0, err
        assert engine.runs.read_summary(run_dir)["steps"] == 4

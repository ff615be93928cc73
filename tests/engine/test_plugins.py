"""engine/plugins.py: discovery through entry points, the essential plugins, origins, the component
table with its defaults and their clashes, plugin modules by name or file, hooks bound one by one.
Also: the core names no built-in (it has no list of them), and plugins reach it only through its
public API."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import engine
import engine.plugins as discovery
from engine.cli import main
from engine.plugins import is_plugin_file, plugin_target
from tests.conftest import REPO
from tests.helpers import LossOnly, job

FOCAL = """
import torch

import engine


def focal(gamma: float = 2.0):
    def loss(output, target):
        log_p = torch.log_softmax(output, dim=1).gather(1, target[:, None]).squeeze(1)
        return (-((1 - log_p.exp()) ** gamma) * log_p).mean()

    return loss


@engine.hookimpl
def register_components():
    return {"loss": {"focal": focal}}
"""


def built_in_entry_points(group: str = engine.ENTRY_POINT_GROUP) -> dict[str, str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    return project["project"]["entry-points"][group]


def plugin_sources() -> list[Path]:
    """Every module of plugins/, its packages' included."""
    return sorted((REPO / "plugins").rglob("*.py"))


def test_every_built_in_is_registered_through_the_entry_point_group(monkeypatch):
    monkeypatch.delenv("ENGINE_BLOCK", raising=False)
    declared = built_in_entry_points()
    plugins = engine.make_plugins()
    assert set(plugins.names()) == set(declared)
    assert all(plugins.sources[name] == "built-in" for name in declared)
    modules = {path.stem for path in (REPO / "plugins").glob("*.py")} - {"__init__"}
    packages = {path.parent.name for path in (REPO / "plugins").glob("*/__init__.py")}
    assert modules | packages == {value.split(":")[0].split(".")[1] for value in declared.values()}


# --- the essential plugins -----------------------------------------------------------------------


def test_the_essential_plugins_are_declared_beside_the_built_ins_and_cannot_be_blocked(monkeypatch, capsys):
    essential = built_in_entry_points(discovery.ESSENTIAL_GROUP)
    assert set(essential) == {"batching"} and essential.items() <= built_in_entry_points().items()
    assert engine.make_plugins().essential == {"batching"}
    message = "plugin 'batching' is essential and cannot be blocked (the engine cannot run without it)"
    with pytest.raises(engine.ConfigError, match=rf"^{re.escape(message)}$"):
        engine.make_plugins(blocked=["batching"])
    assert main(["run", "--block", "batching"]) == 2
    assert capsys.readouterr() == ("", f"error: {message}\n")
    assert not Path("runs").exists()
    monkeypatch.setenv("ENGINE_BLOCK", "progress, batching")  # nor for every run of an environment
    with pytest.raises(engine.ConfigError, match=re.escape(message)):
        engine.make_plugins()


def test_the_plugins_command_prints_the_essential_set(capsys):
    assert main(["plugins"]) == 0
    assert "\nessential (cannot be blocked): batching\n" in capsys.readouterr().out


def also_declared(*extra: object):
    """`entry_points` as importlib.metadata answers it, with `extra` entry points in the plugins' group."""
    real = discovery.entry_points
    return lambda group: [*real(group=group), *(extra if group == engine.ENTRY_POINT_GROUP else ())]


def test_plugins_are_listed_in_registration_order(monkeypatch):
    monkeypatch.delenv("ENGINE_BLOCK", raising=False)
    plugins = engine.make_plugins([LossOnly], blocked=["losses"])
    assert plugins.names() == [*sorted(set(built_in_entry_points()) - {"losses"}), "LossOnly"]
    assert plugins.sources["LossOnly"] == "passed to engine.run"


def test_blocked_plugins_are_not_loaded():
    plugins = engine.make_plugins(blocked=["losses", "console"])
    assert "losses" not in plugins.names() and "console" not in plugins.names()
    assert "loss" not in plugins.components


# --- third-party plugins -------------------------------------------------------------------------


class FakeEntryPoint:
    """An entry point of an installed package, as importlib.metadata reports it."""

    def __init__(self, name: str, module: str, dist: str) -> None:
        self.name, self.value, self.group = name, module, engine.ENTRY_POINT_GROUP
        self.dist = SimpleNamespace(name=dist)

    def load(self):
        return __import__(self.value)


@pytest.fixture
def installed(monkeypatch, write_plugin):
    """Pretend a package `my-losses` is installed that declares `my_losses` in the engine's group."""
    write_plugin("my_losses", FOCAL)
    monkeypatch.setattr(discovery, "entry_points", also_declared(FakeEntryPoint("my_losses", "my_losses", "my-losses")))


def test_an_installed_package_provides_a_loss_through_its_entry_point(installed):
    plugins = engine.make_plugins()
    assert plugins.sources["my_losses"] == "entry point of package my-losses"
    assert plugins.component("loss", "focal").plugin == "my_losses"
    result = engine.run(
        job(epochs=2, data={"name": "classification", "n_samples": 64}, model={"name": "mlp", "hidden": [8]}),
        overrides=["loss.name=focal", "loss.gamma=1.5"],
    )
    assert set(result.metrics) >= {"loss", "focal"}
    assert result.config["loss"]["gamma"] == 1.5


def test_plugins_command_shows_the_installed_package(installed, capsys):

    assert main(["plugins"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entry = lines.index("  my_losses  [entry point of package my-losses]")
    assert lines[entry + 1 : entry + 3] == ["      hooks: register_components", "      provides: loss focal"]


def test_an_entry_point_that_cannot_load_is_a_config_error(monkeypatch):
    broken = FakeEntryPoint("broken", "no_such_module_xyz", "broken-pkg")
    monkeypatch.setattr(discovery, "entry_points", lambda group: [broken] if group == engine.ENTRY_POINT_GROUP else [])
    with pytest.raises(engine.ConfigError, match=r"plugin 'broken' \(entry point no_such_module_xyz\): cannot load"):
        engine.make_plugins()


def test_a_plugin_module_by_dotted_name_and_by_file_path(write_plugin, tmp_path, fresh_modules):
    write_plugin("focal_by_name", FOCAL)
    by_name = engine.make_plugins(["focal_by_name"])
    assert by_name.sources["focal_by_name"] == "--plugin focal_by_name"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "focal_file.py").write_text(FOCAL)
    fresh_modules("focal_file")
    by_path = engine.make_plugins(["sub/focal_file.py"])
    assert by_path.sources["focal_file"] == "--plugin sub/focal_file.py"
    assert by_path.component("loss", "focal").plugin == "focal_file"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_plugin_xyz", "plugin module 'no_such_plugin_xyz' cannot be imported: ModuleNotFoundError"),
        ("missing/file.py", "plugin file 'missing/file.py' does not exist"),
        ("broken_plugin.py", "plugin file 'broken_plugin.py' failed to import: ZeroDivisionError: division by zero"),
    ],
)
def test_a_plugin_that_cannot_be_imported_is_a_config_error(spec, message, tmp_path, fresh_modules):
    (tmp_path / "broken_plugin.py").write_text("1 / 0\n")
    fresh_modules("broken_plugin")
    with pytest.raises(engine.ConfigError) as raised:
        engine.make_plugins([spec])
    assert str(raised.value).startswith(message)
    assert "broken_plugin" not in sys.modules


# --- the component table -------------------------------------------------------------------------


class AnotherMse:
    @engine.hookimpl
    def register_components(self):
        return {"loss": {"mse": lambda: None}}


def test_two_plugins_providing_one_component_name_is_an_error_naming_both():
    with pytest.raises(engine.ConfigError) as raised:
        engine.make_plugins([AnotherMse])
    message = str(raised.value)
    assert message.startswith("loss 'mse' is provided by both plugin")
    assert "'losses'" in message and "'AnotherMse'" in message


@dataclass(frozen=True)
class Progress:
    progress: bool = False


class AnotherLogProgress:
    @engine.hookimpl
    def register_settings(self):
        return {"log": Progress}


def test_two_plugins_declaring_one_setting_is_an_error_naming_both():
    with pytest.raises(engine.ConfigError, match=r"setting log.progress is declared by both plugin") as raised:
        engine.make_plugins([AnotherLogProgress])
    assert "'progress'" in str(raised.value) and "'AnotherLogProgress'" in str(raised.value)


@dataclass(frozen=True)
class Epochs:
    epochs: int = 5


class ClaimsEpochs:
    @engine.hookimpl
    def register_settings(self):
        return {"": Epochs}


def test_a_plugin_cannot_declare_a_core_setting():
    with pytest.raises(engine.ConfigError, match="plugin 'ClaimsEpochs' declares setting epochs, which the core owns"):
        engine.run({"epochs": 1}, plugins=[ClaimsEpochs])


def test_a_plugin_name_can_only_be_taken_once(write_plugin):
    write_plugin("losses_clone", FOCAL)

    class Named:
        __name__ = "metrics_file"

    with pytest.raises(engine.ConfigError, match="plugin name 'metrics_file' is taken by built-in"):
        engine.make_plugins([Named()])


def test_components_have_a_kind_a_name_and_an_owner():
    plugins = engine.make_plugins()
    assert {kind: sorted(table) for kind, table in plugins.components.items()} == {
        "accelerate": ["auto", "compile", "cudagraph", "eager"],
        "data": ["classification", "csv", "images", "linear_regression", "npy", "npz", "tokens"],
        "distributed": ["ddp"],
        "export": ["aoti", "exported", "onnx", "tensorrt"],
        "input_transform": ["standardize", "standardize_channels"],
        "predictions": ["csv", "npz"],
        "precision": ["16-mixed", "32", "bf16-mixed"],
        "scheduler": ["cosine", "none", "onecycle", "step", "warmup_cosine"],
        "loss": ["bce_with_logits", "cross_entropy", "huber", "l1", "model", "mse", "nll", "smooth_l1"],
        "model": ["cnn", "gpt", "linear", "mlp"],
        "optimizer": ["adam", "adamw", "sgd"],
    }
    assert plugins.component("optimizer", "sgd").plugin == "optimizers"
    with pytest.raises(engine.ConfigError, match=r"optimizer.name: unknown optimizer 'sdg' \(did you mean 'sgd'\?\)"):
        plugins.component("optimizer", "sdg")
    with pytest.raises(engine.ConfigError, match=r"unknown optimizer 'zzz' \(choose one of: adam, adamw, sgd\)"):
        plugins.component("optimizer", "zzz")


# --- the default of a kind, declared where its components are registered --------------------------


def registering(name: str, provided: dict) -> type:
    """A plugin class `name` whose register_components returns `provided`."""

    def register_components(self):
        return provided

    return type(name, (), {"register_components": engine.hookimpl(register_components)})


def squared(output, target):
    return ((output - target) ** 2).mean()


def test_a_plugin_declares_the_default_of_a_kind_beside_its_components():
    sampler = registering("Sampling", {"default": {"sampler": "plain"}, "sampler": {"plain": lambda: None}})
    config, plugins = engine.load_config(plugins=[sampler])
    assert config["sampler"]["name"] == "plain" and plugins.default("sampler") == "plain"
    assert plugins.default("loss") == "mse" and plugins.defaults["loss"].plugin == "losses"
    # A kind whose section names no component, and no plugin's default: none is chosen.
    unchosen = registering("Unchosen", {"sampler": {"plain": lambda: None}})
    assert engine.load_config(plugins=[unchosen])[0]["sampler"]["name"] is None
    # Blocked, the built-in's default goes with it: another plugin may declare its own.
    own = registering("OwnLoss", {"default": {"loss": "sq"}, "loss": {"sq": lambda: squared}})
    config, _ = engine.load_config(plugins=[own], blocked=["losses"])
    assert config["loss"]["name"] == "sq"


@pytest.mark.parametrize(
    ("provided", "message"),
    [
        (  # pluggy calls the plugin registered last first
            {"default": {"loss": "sq"}, "loss": {"sq": lambda: squared}},
            "the default loss is declared by both plugin 'Declaring' and plugin 'losses'",
        ),
        (
            {"default": {"model": "nope"}},
            "the default model is declared by both plugin 'Declaring' and plugin 'models'",
        ),
        (  # a kind no plugin provides
            {"default": {"sampler": "plain"}},
            "plugin 'Declaring': the default sampler 'plain' is not a sampler component",
        ),
        (  # a name the kind does not have
            {"default": {"sampler": "plian"}, "sampler": {"plain": lambda: None}},
            "plugin 'Declaring': the default sampler 'plian' is not a sampler component",
        ),
        ({"default": {"loss": 5}}, "plugin 'Declaring': the default loss must be a component's name, got 5"),
        ({"default": ["loss"]}, "plugin 'Declaring': register_components must return a dict keyed by default name"),
    ],
)
def test_a_default_is_declared_once_and_names_a_component(provided, message):
    with pytest.raises(engine.ConfigError) as raised:
        engine.make_plugins([registering("Declaring", provided)])
    assert str(raised.value).startswith(message)


# --- plugin specs, and hooks bound one by one ------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "target", "attribute", "is_file"),
    [
        ("pkg.module", "pkg.module", "", False),
        ("pkg.module:Class", "pkg.module", "Class", False),
        ("path/file.py", "path/file.py", "", True),
        ("file.py:Class", "file.py", "Class", True),
        ("sub/file.py:make_plugin", "sub/file.py", "make_plugin", True),
        ("C:\\plugins\\file.py", "C:\\plugins\\file.py", "", True),  # a drive's colon names no attribute
        ("pkg.module:", "pkg.module:", "", False),
        (":Class", ":Class", "", False),
        ("file.py:not-a-name", "file.py:not-a-name", "", False),
    ],
)
def test_a_plugin_spec_names_a_module_and_maybe_an_attribute(spec, target, attribute, is_file):
    assert plugin_target(spec) == (target, attribute)
    assert is_plugin_file(spec) == is_file


def test_bound_hooks_receive_their_constants_and_only_the_arguments_they_declare():
    seen = []

    class Some:
        @engine.hookimpl
        def after_step(self, window):
            seen.append(("Some", window))

    class Every:
        @engine.hookimpl
        def after_step(self, state, loss, terms, window, trainer):
            seen.append(("Every", state, loss, terms, window, trainer))

    plugins = engine.make_plugins([Some, Every], blocked=["progress", "ema", "checkpoint", "distributed"])
    bound = plugins.bind_by_plugin("after_step", trainer="T", state="S")
    assert [name for name, _ in bound] == ["Every", "Some"]  # in call order: the last registered first
    for _, call in bound:
        call(loss=1, terms={}, window="W")
    assert seen == [("Every", "S", 1, {}, "W", "T"), ("Some", "W")]
    assert len(plugins.bind("after_step", without={"Some"}, trainer="T", state="S")) == 1


class BadRegistration:
    @engine.hookimpl
    def register_components(self):
        raise KeyError("oops")


def test_an_exception_in_a_registration_hook_names_the_plugin():
    with pytest.raises(
        engine.ConfigError, match="plugin 'BadRegistration' failed in hook register_components: KeyError: 'oops'"
    ):
        engine.make_plugins([BadRegistration])


# --- the core names no built-in ------------------------------------------------------------------


def core_words() -> set[str]:
    """Identifiers and string literals of engine/*.py, without docstrings, comments and help texts."""
    words: set[str] = set()
    for path in (REPO / "engine").glob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        docs |= {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.keyword) and node.arg == "help"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
                words |= set(re.findall(r"[A-Za-z_]+", node.value.lower()))
            elif isinstance(node, ast.Name):
                words.add(node.id.lower())
            elif isinstance(node, ast.Attribute):
                words.add(node.attr.lower())
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                words.add(node.name.lower())
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                words |= {part for alias in node.names for part in alias.name.lower().split(".")}
                words |= set((getattr(node, "module", None) or "").lower().split("."))
    return words


def test_the_core_names_no_particular_loss_optimizer_model_dataset_logger_or_export_format(monkeypatch):
    monkeypatch.delenv("ENGINE_BLOCK", raising=False)
    plugins = engine.make_plugins()
    kinds = ("loss", "optimizer", "model", "data", "export", "predictions", "input_transform")
    named = {name for kind in kinds for name in plugins.components[kind]}
    # The plugins by name, but those named after a word of the core's own (a component kind, a
    # checkpoint, the state's losses and metrics).
    named |= set(plugins.names()) - {"accelerate", "checkpoint", "distributed", "losses", "metrics", "precision"}
    named |= {"tqdm", "crossentropy", "mseloss", "adamw", "evaluate", "predict", "plot", "nproc"}
    # "classification" and "regression" are tasks (DataInfo.task), the core's words; the dataset
    # plugin happens to name a component after one. The loss "model" is the model's own loss
    # (engine.ModelLoss), named after the core's component kind.
    named -= {"classification", "model"}
    assert named & core_words() == set()


def test_the_core_never_imports_the_plugins_package():
    for path in (REPO / "engine").glob("*.py"):
        assert not re.search(r"^\s*(from|import)\s+(engine_)?plugins\b", path.read_text(), re.M), path.name


def test_the_core_runs_with_the_loss_plugin_blocked(tmp_path):
    result = engine.run(job(loss={"name": "sq"}), plugins=[LossOnly], blocked=["losses"])
    assert result.metrics["loss"] > 0
    assert (Path(result.run_dir) / "summary.json").is_file()


def test_plugins_import_only_the_engines_public_api():
    public = set(engine.__all__)
    for path in plugin_sources():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # a relative import: its own package only
                assert node.level == 1 and path.parent != REPO / "plugins", f"{path.name}: {node.module}"
            elif isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("engine.", "plugins", "engine_plugins")), (
                    f"{path.name}: {node.module}"
                )
                if node.module == "engine":
                    assert {alias.name for alias in node.names} <= public, path.name
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("engine.", "plugins", "engine_plugins")), path.name
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "engine":
                assert node.attr in public, f"{path.name}: engine.{node.attr} is not in engine.__all__"


def test_plugins_talk_only_through_hooks_and_documented_attributes():
    """No plugin looks another up (`pm.get_plugin(`), sets Trainer attributes, or replaces an
    optimizer's methods: what one plugin hands another goes through the setup chain."""
    for path in plugin_sources():
        source = path.read_text()
        assert "get_plugin(" not in source, path.name
        for node in ast.walk(ast.parse(source)):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    owner = target.value
                    assert not (isinstance(owner, ast.Name) and owner.id == "trainer"), (
                        f"{path.name}: trainer.{target.attr} ="
                    )
                    assert target.attr not in ("step", "zero_grad", "accumulation_window"), (
                        f"{path.name}: .{target.attr} ="
                    )


@pytest.mark.slow
def test_a_blocked_plugin_is_not_imported_unless_a_job_sets_its_settings_which_stay_valid():
    import subprocess
    import sys

    probe = (
        "import sys, engine; engine.make_plugins(blocked=['tensorboard']); "
        "print('engine_plugins.tensorboard' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
    # A job (a run's config.toml) that sets the blocked plugin's settings stays valid; they go unused.
    config, plugins = engine.load_config({"tensorboard": {"enabled": True}}, blocked=["tensorboard"])
    assert config["tensorboard"]["enabled"] is True and plugins.pm.get_plugin("tensorboard") is None
    with pytest.raises(engine.ConfigError, match=r"^tensorboard.enabld: unknown key in \[tensorboard\]"):
        engine.load_config({"tensorboard": {"enabld": True}}, blocked=["tensorboard"])

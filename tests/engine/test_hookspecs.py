"""engine/hookspecs.py: every hook documented and typed, its order declared, the per-step contract,
and pluggy's wrappers: taken by every hook pluggy dispatches, refused at registration by the ones
the core calls one implementation at a time."""

from __future__ import annotations

import inspect
import math
import types

import pytest

import engine
from engine import hookspecs
from engine.cli import main, parser
from tests.helpers import job

MARKER = f"{hookspecs.PROJECT}_spec"
HOOKS = sorted(name for name, obj in vars(hookspecs).items() if hasattr(obj, MARKER))
# The hooks pluggy dispatches (they take its wrappers); every other hook is called one by one.
DISPATCHED = {
    "register_commands",
    "build_loaders",
    "load_plugin_state",
    "on_run_start",
    "after_validation",
    "on_log",
    "save_plugin_state",
    "find_checkpoint",
    "read_checkpoint",
}


def specs(module: types.ModuleType) -> dict[str, types.FunctionType]:
    return {name: obj for name, obj in vars(module).items() if inspect.isfunction(obj) and hasattr(obj, MARKER)}


def undocumented(module: types.ModuleType) -> list[str]:
    """Hookspecs whose docstring is missing or too short to be a contract."""
    return [name for name, spec in specs(module).items() if len(inspect.getdoc(spec) or "") < 40]


def test_the_check_catches_a_hookspec_without_a_docstring():
    fake = types.ModuleType("fake_specs")

    @engine.hookspec
    def documented() -> None:
        """Called once per run, before anything else; its arguments: none; its return is ignored."""

    @engine.hookspec
    def bare() -> None:
        pass

    fake.documented, fake.bare = documented, bare
    assert undocumented(fake) == ["bare"]


def test_every_hookspec_has_a_docstring_contract():
    assert specs(hookspecs), "no hookspecs found"
    assert undocumented(hookspecs) == []


def test_every_hookspec_is_typed():
    for name, spec in specs(hookspecs).items():
        signature = inspect.signature(spec)
        assert signature.return_annotation is not inspect.Signature.empty, name
        for parameter in signature.parameters.values():
            assert parameter.annotation is not inspect.Parameter.empty, f"{name}({parameter.name})"


def test_the_module_docstring_writes_out_every_hook_in_call_order():
    overview = hookspecs.__doc__
    names = list(specs(hookspecs))
    assert all(name in overview for name in names), [n for n in names if n not in overview]
    # The specs are declared in the order the overview lists them.
    positions = [overview.index(f" {name} ") if f" {name} " in overview else overview.index(name) for name in names]
    assert positions == sorted(positions)


def test_the_tutorial_hook_names_are_kept():
    assert {"before_forward", "compute_loss", "after_step"} <= set(specs(hookspecs))


def test_firstresult_is_declared_where_one_answer_wins():
    firstresult = {name for name, spec in specs(hookspecs).items() if getattr(spec, MARKER)["firstresult"]}
    assert firstresult == {"build_loaders", "find_checkpoint", "read_checkpoint"}
    for name in firstresult:
        assert "first non-None result wins" in " ".join(inspect.getdoc(getattr(hookspecs, name)).split()), name


def test_hook_order_of_the_built_ins_is_declared():
    plugins = engine.make_plugins()

    def opts(hook: str, plugin: str) -> dict:
        impl = next(i for i in getattr(plugins.hook, hook).get_hookimpls() if i.plugin_name == plugin)
        return {"tryfirst": impl.tryfirst, "trylast": impl.trylast}

    assert opts("on_run_end", "checkpoint")["tryfirst"]  # the weights first: a later failure must not cost them
    assert opts("build_loaders", "batching")["trylast"]  # a plugin may batch data its own way


class LateRunEnd:
    @engine.hookimpl
    def on_run_end(self):
        pass


def test_call_order_does_not_depend_on_install_order(monkeypatch):
    import engine.plugins as discovery

    def call_order(plugins: engine.Plugins) -> dict[str, list[str]]:
        order = {}
        for name in dir(plugins.hook):
            caller = getattr(plugins.hook, name)
            if hasattr(caller, "get_hookimpls"):
                order[name] = [impl.plugin_name for impl in caller.get_hookimpls()]
        return order

    normal = call_order(engine.make_plugins([LateRunEnd]))
    real = discovery.entry_points
    monkeypatch.setattr(discovery, "entry_points", lambda group: list(reversed(list(real(group=group)))))
    assert call_order(engine.make_plugins([LateRunEnd])) == normal
    # The tryfirst checkpoint plugin runs before a plugin registered after every built-in.
    assert normal["on_run_end"][-1] == "checkpoint"  # pluggy lists the last-called first
    assert normal["on_run_end"][-2] == "LateRunEnd"


class PerStepWrapper:
    @engine.hookimpl(wrapper=True)
    def before_forward(self):
        return (yield)


def test_per_step_hooks_refuse_wrappers():
    with pytest.raises(engine.ConfigError, match=r"plugin 'PerStepWrapper': hook before_forward .*no wrapper"):
        engine.setup({"epochs": 1}, plugins=[PerStepWrapper])


class Misspelled:
    @engine.hookimpl
    def after_steps(self):
        pass


def test_an_implementation_of_an_unknown_hook_is_rejected():
    with pytest.raises(
        engine.ConfigError,
        match=r"plugin 'Misspelled': after_steps is not a hook of the engine \(did you mean 'after_step'\?\)",
    ):
        engine.make_plugins([Misspelled])


# --- pluggy's wrappers on every hook ----------------------------------------------------------


def test_every_hook_is_either_dispatched_by_pluggy_or_called_one_by_one():
    assert set(HOOKS) == hookspecs.ONE_BY_ONE | DISPATCHED
    assert not DISPATCHED & hookspecs.ONE_BY_ONE
    assert hookspecs.PER_STEP | hookspecs.CHAINED <= hookspecs.ONE_BY_ONE


def wrapper_plugin(hook: str, style: str) -> type:
    """A plugin class whose only implementation is a wrapper (new or old style) of `hook`."""
    log: list[str] = []

    if style == "wrapper":

        def implementation(self):
            log.append(hook)
            return (yield)

        marker = engine.hookimpl(wrapper=True)
    else:

        def implementation(self):
            log.append(hook)
            yield

        marker = engine.hookimpl(hookwrapper=True)
    return type(f"Wraps_{hook}", (), {hook: marker(implementation), "log": log})


def call_every_dispatched_hook(plugin: type) -> None:
    """A run with validation data, its resume (find_checkpoint, load_plugin_state), and the
    command line's parser (register_commands)."""
    data = {"val_fraction": 0.2}
    result = engine.run(job(epochs=2, data=data), plugins=[plugin])
    assert math.isfinite(result.metrics["loss"])
    resumed = engine.run(job(epochs=3, data=data), plugins=[plugin], resume=result.run_dir)
    assert resumed.state.step == 3  # the wrapped find_checkpoint found the checkpoint
    parser(engine.make_plugins([plugin]))


@pytest.mark.parametrize("style", ["wrapper", "hookwrapper"])
@pytest.mark.parametrize("hook", HOOKS)
def test_a_wrapper_on_any_hook_works_or_is_refused_at_registration(hook, style):
    plugin = wrapper_plugin(hook, style)
    if hook in hookspecs.ONE_BY_ONE:
        with pytest.raises(engine.ConfigError) as raised:
            engine.make_plugins([plugin])
        assert str(raised.value).startswith(f"plugin 'Wraps_{hook}': hook {hook} is called ")
        assert str(raised.value).endswith("by the engine and takes no wrapper")
        return
    call_every_dispatched_hook(plugin)
    assert plugin.log and set(plugin.log) == {hook}


def test_a_refused_wrapper_is_exit_2_with_one_line_from_the_command(capsys, tmp_path):
    (tmp_path / "wraps_step.py").write_text(
        "import engine\n\n@engine.hookimpl(wrapper=True)\ndef wrap_step():\n    return (yield)\n"
    )
    assert main(["run", "--plugin", "wraps_step.py"]) == 2
    assert capsys.readouterr() == (
        "",
        "error: plugin 'wraps_step': hook wrap_step is called one implementation at a time by the engine "
        "and takes no wrapper\n",
    )
    assert not (tmp_path / "runs").exists()

"""engine/hookspecs.py: every hook documented and typed, its order declared, the per-step contract."""

from __future__ import annotations

import inspect
import types

import pytest

import engine
from engine import hookspecs

MARKER = f"{hookspecs.PROJECT}_spec"


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
    assert firstresult == {"build_loaders"}
    assert "firstresult" in inspect.getdoc(hookspecs.build_loaders) or "first non-None" in inspect.getdoc(
        hookspecs.build_loaders
    )


def test_hook_order_of_the_built_ins_is_declared():
    plugins = engine.make_plugins()

    def opts(hook: str, plugin: str) -> dict:
        impl = next(i for i in getattr(plugins.hook, hook).get_hookimpls() if i.plugin_name == plugin)
        return {"tryfirst": impl.tryfirst, "trylast": impl.trylast}

    assert opts("on_run_end", "run_files")["trylast"]  # the summary after every other plugin reported
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
    found = list(discovery.entry_points(group=engine.ENTRY_POINT_GROUP))
    monkeypatch.setattr(discovery, "entry_points", lambda group: list(reversed(found)))
    assert call_order(engine.make_plugins([LateRunEnd])) == normal
    # A plugin's own hook runs before the trylast run_files plugin, whatever its position.
    assert normal["on_run_end"][0] == "run_files"  # pluggy lists the last-called first


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

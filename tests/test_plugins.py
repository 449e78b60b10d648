"""The plugin layer: one test per hook, name clashes, broken plugins, the environment variables that choose
the plugins, and the rule that the core never names a built-in plugin.

Every hookspec must have a docstring and a test here named test_hook_<hook> (datasette's rule: a hook
nobody documents or tests is a hook nobody can rely on).
"""

from __future__ import annotations

import ast
import importlib
import logging
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import qtoolkit
from qtoolkit import hookspecs, plugins
from qtoolkit.errors import QtoolkitError
from qtoolkit.hookspecs import hookimpl
from qtoolkit.models.loading import load_diffusion_model
from qtoolkit.plugins import DISABLE_AUTOLOAD_ENV, ENTRY_POINT_GROUP, LOAD_ENV, OWN_DISTRIBUTION, PluginInfo
from qtoolkit.quant import MinMaxObserver, QuantConfig, make_activation_observer, make_weight_observer
from qtoolkit.quant.timestep_groups import BoundaryRequest
from qtoolkit.registry import (KINDS, Backend, CalibrationStrategy, ModelLoader, Observer, PluginConflict,
                               RoundingMethod, TimestepBoundaries)

CORE = Path(qtoolkit.__file__).parent
BUILTIN_PACKAGE = "qtoolkit_plugins"


@pytest.fixture(autouse=True)
def fresh_plugins(monkeypatch):
    """Each test starts from the environment's default plugin set and leaves no plugin state behind."""
    monkeypatch.delenv(LOAD_ENV, raising=False)
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reload()
    yield
    plugins.reload()


@pytest.fixture
def no_plugins(monkeypatch):
    """A loaded state with no plugin at all, for plugins added by hand with add_plugin."""
    monkeypatch.setenv(LOAD_ENV, "")
    plugins.reload()
    assert plugins.plugin_infos() == []


@pytest.fixture
def install(tmp_path, monkeypatch):
    """install(distribution, {entry point: module}, {module: source}): what an installer leaves in
    site-packages (the modules, and a dist-info folder with METADATA and entry_points.txt), in a folder put on
    sys.path for this test."""
    site = tmp_path / "site-packages"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    written = []

    def install_distribution(distribution: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        for module, source in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
            written.append(module)
        dist_info = site / f"{distribution.replace('-', '_')}-1.0.dist-info"
        dist_info.mkdir()
        (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 1.0\n")
        (dist_info / "entry_points.txt").write_text(
            f"[{ENTRY_POINT_GROUP}]\n" + "".join(f"{name} = {module}\n" for name, module in entry_points.items()))
        importlib.invalidate_caches()
        plugins.reload()

    yield install_distribution
    for module in written:
        sys.modules.pop(module, None)


def strategy_plugin(*names: str) -> str:
    """The source of a plugin module that registers calibration strategies `names`."""
    return f"""
        from qtoolkit import hookimpl
        from qtoolkit.registry import CalibrationStrategy

        @hookimpl
        def register_calibration_strategies(register):
            for name in {list(names)!r}:
                register(CalibrationStrategy(name=name, run=lambda request: None))
        """


def info(name: str) -> PluginInfo:
    return PluginInfo(name=name, version="1.0", distribution=f"dist-{name}", module=f"tests.{name}")


def strategies_of(plugin_name: str) -> list[str]:
    found = [p for p in plugins.plugin_infos() if p.name == plugin_name]
    assert found, f"plugin {plugin_name!r} is not loaded: {[p.name for p in plugins.plugin_infos()]}"
    return found[0].registered["register_calibration_strategies"]


# One test per hook: a plugin registers a record through it, and the core's lookup finds that very record.

def test_hook_register_calibration_strategies(no_plugins):
    def run(request, *, level: int = 1):
        raise AssertionError("not called")

    class Plugin:
        @hookimpl
        def register_calibration_strategies(self, register):
            register(CalibrationStrategy(name="fake-strategy", run=run, uses_sampler=False))

    plugins.add_plugin(Plugin(), info("fake"))
    record = plugins.calibration_strategy("fake-strategy")
    assert record.run is run and record.uses_sampler is False
    assert plugins.names("register_calibration_strategies") == ["fake-strategy"]
    assert plugins.plugin_infos()[0].as_dict()["calibration_strategies"] == ["fake-strategy"]


def test_hook_register_rounding_methods(no_plugins):
    def settings(params):
        return params

    def apply(qmodel, fp_model, inputs, settings, progress):
        return {}

    class Plugin:
        @hookimpl
        def register_rounding_methods(self, register):
            register(RoundingMethod(name="fake-rounding", settings=settings, apply=apply))

    plugins.add_plugin(Plugin(), info("fake"))
    record = plugins.rounding_method("fake-rounding")
    assert record.settings is settings and record.apply is apply
    assert plugins.plugin_infos()[0].as_dict()["rounding_methods"] == ["fake-rounding"]


def test_hook_register_backends(no_plugins):
    def load(exported, threads, float_precision):
        raise AssertionError("not called")

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register(Backend(name="fake-backend", load=load, float_precisions=lambda: ("fp32",)))

    plugins.add_plugin(Plugin(), info("fake"))
    record = plugins.backend("fake-backend")
    assert record.load is load and record.float_precisions() == ("fp32",)
    assert plugins.plugin_infos()[0].as_dict()["backends"] == ["fake-backend"]


def test_hook_register_model_loaders(no_plugins, tiny_model):
    class Plugin:
        @hookimpl
        def register_model_loaders(self, register):
            register(ModelLoader(name="fake-loader", claims=lambda source: source.startswith("fake:"),
                                 load=lambda source: tiny_model))

    plugins.add_plugin(Plugin(), info("fake"))
    assert load_diffusion_model("fake:tiny") is tiny_model
    with pytest.raises(QtoolkitError, match="cannot load model 'elsewhere'"):
        load_diffusion_model("elsewhere")
    assert plugins.plugin_infos()[0].as_dict()["model_loaders"] == ["fake-loader"]


def test_hook_register_observers(no_plugins):
    made = []

    def factory(role, axis, config):
        made.append((role, axis))
        return MinMaxObserver(axis)

    class Plugin:
        @hookimpl
        def register_observers(self, register):
            register(Observer(name="fake-observer", kind="both", factory=factory, default_for=("activation", "weight")))
            register(Observer(name="fake-weights", kind="weight", factory=factory))

    plugins.add_plugin(Plugin(), info("fake"))
    config = QuantConfig()  # names none: the plugin's default for both roles
    assert (config.weight_observer, config.activation_observer) == ("fake-observer", "fake-observer")
    assert isinstance(make_weight_observer(config, 0), MinMaxObserver)
    assert isinstance(make_activation_observer(config), MinMaxObserver)
    assert made == [("weight", 0), ("activation", None)]
    assert QuantConfig(weight_observer="fake-weights").weight_observer == "fake-weights"
    with pytest.raises(QtoolkitError, match="^activation_observer = 'fake-weights' observes weight tensors only: "
                                            "choose one of fake-observer$"):
        QuantConfig(activation_observer="fake-weights")
    assert plugins.plugin_infos()[0].as_dict()["observers"] == ["fake-observer", "fake-weights"]


def test_hook_register_timestep_boundaries(no_plugins):
    class Plugin:
        @hookimpl
        def register_timestep_boundaries(self, register):
            register(TimestepBoundaries(name="fake-halves", choose=lambda request: [request.num_timesteps // 2],
                                        default=True))

    class Observers:  # what any QuantConfig needs
        @hookimpl
        def register_observers(self, register):
            register(Observer(name="fake-observer", kind="both", factory=lambda role, axis, config: MinMaxObserver(axis),
                              default_for=("activation", "weight")))

    plugins.add_plugin(Observers(), info("observers"))
    assert QuantConfig().timestep_boundaries is None  # one group: no rule needed, none installed
    plugins.add_plugin(Plugin(), info("fake"))
    config = QuantConfig(timestep_groups=2)  # names none: the plugin's default
    assert config.timestep_boundaries == "fake-halves"
    assert plugins.timestep_boundaries(config.timestep_boundaries).choose(BoundaryRequest(2, 1000, None)) == [500]
    with pytest.raises(QtoolkitError, match="unknown timestep boundary rule 'even': choose one of: fake-halves"):
        QuantConfig(timestep_groups=2, timestep_boundaries="even")
    assert plugins.plugin_infos()[1].as_dict()["timestep_boundaries"] == ["fake-halves"]


def test_every_hookspec_is_documented_and_tested():
    specs = {name: spec for name, spec in vars(hookspecs).items() if hasattr(spec, f"{ENTRY_POINT_GROUP}_spec")}
    assert specs, "no hookspecs found in qtoolkit.hookspecs"
    undocumented = [name for name, spec in specs.items() if len((spec.__doc__ or "").strip()) < 40]
    untested = [name for name in specs if f"test_hook_{name}" not in globals()]
    assert not undocumented, f"hookspecs without a docstring that says what to register: {undocumented}"
    assert not untested, f"hookspecs without a test_hook_<name> in {__file__}: {untested}"
    assert set(specs) == set(KINDS), "every hook needs its record type in qtoolkit.registry.KINDS and vice versa"


# Name clashes.

def test_two_plugins_registering_one_name_is_an_error_naming_both(no_plugins):
    class First:
        @hookimpl
        def register_calibration_strategies(self, register):
            register(CalibrationStrategy(name="clash", run=lambda request: None))

    class Second:
        @hookimpl
        def register_rounding_methods(self, register):
            register(RoundingMethod(name="innocent", settings=dict, apply=lambda *args: {}))

        @hookimpl
        def register_calibration_strategies(self, register):
            register(CalibrationStrategy(name="clash", run=lambda request: None))

    plugins.add_plugin(First(), info("first"))
    with pytest.raises(PluginConflict, match=r"'clash' is registered twice, by plugin 'first' and by plugin 'second'"):
        plugins.add_plugin(Second(), info("second"))
    # All or nothing: the second plugin left no record behind, the first kept its own.
    assert plugins.names("register_rounding_methods") == []
    assert [p.name for p in plugins.plugin_infos()] == ["first"]
    assert plugins.calibration_strategy("clash") is not None


def test_one_plugin_registering_a_name_twice_is_an_error(no_plugins):
    class Twice:
        @hookimpl
        def register_backends(self, register):
            for _ in range(2):
                register(Backend(name="twin", load=lambda *args: None, float_precisions=tuple))

    with pytest.raises(PluginConflict, match=r"'twin' is registered twice, by plugin 'twice' and by plugin 'twice'"):
        plugins.add_plugin(Twice(), info("twice"))


def test_installed_plugins_with_one_name_stop_loading_with_both_named(install):
    install("dist-one", {"one": "qtoolkit_fake_one"}, {"qtoolkit_fake_one": strategy_plugin("same-name")})
    install("dist-two", {"two": "qtoolkit_fake_two"}, {"qtoolkit_fake_two": strategy_plugin("same-name")})
    with pytest.raises(PluginConflict) as raised:
        plugins.registry()
    message = str(raised.value)
    assert "'same-name'" in message and "'one'" in message and "'two'" in message and "\n" not in message
    assert isinstance(raised.value, QtoolkitError)  # the command line prints it as one line, exit code 2


# Broken plugins.

@pytest.mark.parametrize("source, error", [
    ("raise ImportError('needs libfoo, which is not installed')", "ImportError: needs libfoo"),
    ("""
     from qtoolkit import hookimpl

     @hookimpl
     def register_backends(register):
         raise RuntimeError('no device found')
     """, "RuntimeError: no device found"),
], ids=["import fails", "hook fails"])
def test_a_broken_plugin_is_one_warning_line_and_the_rest_still_loads(install, caplog, source, error):
    install("dist-good", {"good": "qtoolkit_fake_good"}, {"qtoolkit_fake_good": strategy_plugin("good-strategy")})
    install("dist-broken", {"broken": "qtoolkit_fake_broken"}, {"qtoolkit_fake_broken": source})
    with caplog.at_level(logging.WARNING, logger=plugins.__name__):
        assert plugins.calibration_strategy("good-strategy") is not None
    about_broken = [r.getMessage() for r in caplog.records if "broken" in r.getMessage()]
    assert len(about_broken) == 1, about_broken
    line = about_broken[0]
    assert "\n" not in line and "'broken'" in line and f"{ENTRY_POINT_GROUP} = qtoolkit_fake_broken" in line
    assert error in line
    assert "broken" not in [p.name for p in plugins.plugin_infos()]
    assert "good" in [p.name for p in plugins.plugin_infos()]


# Which plugins load.

@pytest.fixture
def three_plugins(install):
    for name in ("a", "b", "c"):
        module = f"qtoolkit_fake_{name}"
        install(f"dist-{name}", {name: module}, {module: strategy_plugin(f"{name}-strategy")})


def test_all_installed_plugins_load_by_default(three_plugins):
    loaded = {p.name for p in plugins.plugin_infos()}
    assert {"a", "b", "c"} <= loaded


@pytest.mark.parametrize("chosen", ["a,b", " a , b ,", "dist-a,b"])
def test_load_plugins_env_loads_only_those(three_plugins, monkeypatch, chosen):
    monkeypatch.setenv(LOAD_ENV, chosen)
    plugins.reload()
    assert {p.name for p in plugins.plugin_infos()} == {"a", "b"}
    assert plugins.names("register_calibration_strategies") == ["a-strategy", "b-strategy"]
    assert "qtoolkit_fake_c" not in sys.modules  # not even imported


def test_load_plugins_env_naming_a_plugin_not_installed_is_a_clear_error(three_plugins, monkeypatch):
    monkeypatch.setenv(LOAD_ENV, "a,nope")
    plugins.reload()
    expected = rf"^{LOAD_ENV} names 'nope', which is not installed: installed plugins are "
    with pytest.raises(QtoolkitError, match=expected) as raised:
        plugins.registry()
    assert {"a", "b", "c"} <= set(str(raised.value).split("installed plugins are ")[1].split(", "))


@pytest.mark.parametrize("value, third_party_loads", [("1", False), ("true", False), ("0", True), ("", True)])
def test_disable_autoload_env_loads_only_qtoolkits_own(three_plugins, monkeypatch, value, third_party_loads):
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    plugins.reload()
    infos = plugins.plugin_infos()
    assert ("a" in {p.name for p in infos}) == third_party_loads
    if not third_party_loads:
        assert all(p.distribution == OWN_DISTRIBUTION for p in infos)
        assert "qtoolkit_fake_a" not in sys.modules


def own_entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.distribution(OWN_DISTRIBUTION).entry_points.select(group=ENTRY_POINT_GROUP))


def test_every_builtin_plugin_loads_and_registers_something(caplog):
    with caplog.at_level(logging.WARNING, logger=plugins.__name__):
        infos = {p.name: p for p in plugins.plugin_infos()}
    assert not caplog.records, "\n".join(r.getMessage() for r in caplog.records)
    for ep in own_entry_points():
        assert ep.name in infos and infos[ep.name].distribution == OWN_DISTRIBUTION
        assert any(infos[ep.name].registered.values()), f"built-in plugin {ep.name!r} registers nothing"


# Unknown names.

@pytest.mark.parametrize("lookup, kind", [(plugins.calibration_strategy, "calibration strategy"),
                                          (plugins.rounding_method, "rounding method"),
                                          (plugins.backend, "backend")])
def test_an_unknown_name_is_an_error_listing_the_installed_ones(no_plugins, lookup, kind):
    class Plugin:
        @hookimpl
        def register_calibration_strategies(self, register):
            for name in ("beta", "alpha"):
                register(CalibrationStrategy(name=name, run=lambda request: None))

        @hookimpl
        def register_rounding_methods(self, register):
            for name in ("beta", "alpha"):
                register(RoundingMethod(name=name, settings=dict, apply=lambda *args: {}))

        @hookimpl
        def register_backends(self, register):
            for name in ("beta", "alpha"):
                register(Backend(name=name, load=lambda *args: None, float_precisions=tuple))

    plugins.add_plugin(Plugin(), info("greek"))
    with pytest.raises(QtoolkitError, match=rf"^unknown {kind} 'gamma': choose one of: alpha, beta$"):
        lookup("gamma")


# The core never names a built-in plugin: it asks the registry. (That it never imports one is import-linter's
# forbidden contract in pyproject.toml, checked by tests/test_layers.py.)

def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


# Calls whose first argument is a Python module's name: some built-in plugins are named after the library they
# wrap (openvino, onnxruntime, diffusers), and the core may import or version a library by its name.
MODULE_NAME_CALLS = {"import_module", "import_optional", "find_spec", "version", "backend_for_runtime"}


def _module_names(tree: ast.AST) -> set[int]:
    """ids of the string constants that name a Python module: the first argument of a MODULE_NAME_CALLS call,
    and a dict key whose value is that very module's __version__ ({"torch": torch.__version__})."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if callee in MODULE_NAME_CALLS:
                found.add(id(node.args[0]))
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and isinstance(value, ast.Attribute) and value.attr == "__version__" \
                        and isinstance(value.value, ast.Name) and value.value.id == key.value:
                    found.add(id(key))
    return found


def _code_strings(tree: ast.AST):
    """String constants of a module that are not docstrings (f-string parts included) nor module names."""
    skipped = _module_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                skipped.add(id(first.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skipped:
            yield node


def builtin_names() -> set[str]:
    """The built-ins' entry-point names and every name their records register (as far as they load)."""
    names = {ep.name for ep in own_entry_points()}
    for plugin in plugins.plugin_infos():
        if plugin.distribution == OWN_DISTRIBUTION:
            names.update(name for registered in plugin.registered.values() for name in registered)
    return names


# Words a built-in registers as a name that core files also use in their everyday sense, file by file: the
# per-step error's "mse" (mean squared error, a report.json key, not the observer) and the conditioning source
# "random" (random encoder states, not the calibration strategy).
HOMONYMS = {"step_error.py": {"mse"}, "recipe.py": {"random"}}


def test_no_core_code_names_a_builtin_plugin():
    names = builtin_names()
    assert {"ndtc", "nearest", "openvino", "mse"} <= names  # the check below checks something
    found = []
    for path in _core_files():
        homonyms = HOMONYMS.get(str(path.relative_to(CORE)), set())
        for node in _code_strings(ast.parse(path.read_text(), str(path))):
            if (node.value in names and node.value not in homonyms) or node.value.startswith(BUILTIN_PACKAGE):
                found.append(f"{path.relative_to(CORE.parent)}:{node.lineno}: {node.value!r}")
    assert not found, ("core code names built-in plugins (look them up in the registry, or move the code into "
                       "the plugin):\n" + "\n".join(found))

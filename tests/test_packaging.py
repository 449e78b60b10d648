"""What a wheel of qtoolkit carries: pyproject.toml lists the packages by hand (plugins/ is imported as
qtoolkit_plugins through a package-dir mapping, which package discovery cannot follow), so a new sub-package
that is not listed would work in this editable checkout and be missing from every installed copy."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_package_folder_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {name: Path(folder) for name, folder in setuptools.get("package-dir", {}).items()}
    listed = set(setuptools["packages"])
    found = set()
    for top in ("qtoolkit", "qtoolkit_plugins"):
        base = ROOT / folders.get(top, Path(top))
        for init in base.rglob("__init__.py"):
            found.add(".".join([top, *init.parent.relative_to(base).parts]))
    data_only = {name for name in setuptools.get("package-data", {})
                 if not (ROOT / Path(*name.split(".")) / "__init__.py").exists()}  # e.g. the bundled models' files
    found |= data_only
    assert found == listed, f"packages on disk but not in pyproject: {sorted(found - listed)}; " \
                            f"listed but missing: {sorted(listed - found)}"


def test_every_builtin_plugin_module_is_declared_as_an_entry_point():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {value.split(":")[0] for value in project["entry-points"]["qtoolkit"].values()}
    with_hooks = {f"qtoolkit_plugins.{path.stem}" for path in (ROOT / "plugins").glob("*.py")
                  if "@hookimpl" in path.read_text()}
    assert with_hooks == declared

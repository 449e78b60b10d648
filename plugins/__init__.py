"""qtoolkit's built-in plugins, one module per plugin, each registered through the hooks of
`qtoolkit.hookspecs` and declared as an entry point in the group "qtoolkit" of qtoolkit's pyproject.toml,
exactly as a third-party package declares its own (see docs/plugins.md)."""

"""Built-in stage types, one module each. Nothing is imported here: stage types are found
through the ``mmflow.stages`` entry points (see mmflow.plugins and pyproject.toml)."""

"""An example of a stage type in a package of its own: installing the package is all it takes."""

"""Small example models that piperc compiles: each module exposes `make(**overrides)`."""

if __name__ != "piperc.examples":  # one folder, one import name (docs/architecture.md, "Folders")
    raise ImportError(f"the examples/ folder is the package piperc.examples; import it under that name, not {__name__}")


"""piperc's xDSL dialects: `torch` (the model), `par` (parallelism), `exec` (per-device programs)."""

if __name__ != "piperc.dialects":  # one folder, one import name (docs/architecture.md, "Folders")
    raise ImportError(f"the dialects/ folder is the package piperc.dialects; import it under that name, not {__name__}")


"""piperc's xDSL dialects: `torch` (the model), `par` (parallelism), `exec` (per-device programs)."""

"""piperc: a compiler for distributed training of PyTorch models.

The compiler's entry points are loaded on first use, so `piperc.annotate`
and `piperc.nn` (used in model code) and `piperc.runtime` (used on training machines) import
torch alone, never xDSL or torch-mlir.
"""

from __future__ import annotations

import importlib

from piperc.annotate import annotate

_LAZY = {
    "compile": "piperc.compiler",
    "launch": "piperc.compiler",
    "Compiled": "piperc.compiler",
    "Mesh": "piperc.strategy",
    "pipeline": "piperc.strategy",
    "data_parallel": "piperc.strategy",
    "tensor_parallel": "piperc.strategy",
    "expert_parallel": "piperc.strategy",
    "sequence_parallel": "piperc.strategy",
    "optim": "piperc.strategy",
    "Directive": "piperc.strategy",
    "Fragment": "piperc.strategy",
    "StrategyContext": "piperc.strategy",
    "Shard": "piperc.passes.tensor_parallel",
    "Replicate": "piperc.passes.tensor_parallel",
    "Partial": "piperc.passes.tensor_parallel",
    "verify": "piperc.reference",
    "profile": "piperc.simulator",
    "Verification": "piperc.reference",
    "capture": "piperc.frontend",
    "Captured": "piperc.frontend",
    "Captures": "piperc.frontend",
    "run_pipeline": "piperc.passmanager",
    "parse_pipeline": "piperc.passmanager",
    "PipelineOptions": "piperc.passmanager",
    "register_pass": "piperc.passes",
    "PipercError": "piperc.errors",
    "CaptureError": "piperc.errors",
    "StrategyError": "piperc.errors",
    "PassError": "piperc.errors",
}

__all__ = ["annotate", *_LAZY]


_SUBPACKAGES = ("runtime", "dialects", "passes", "examples", "checkpoint", "nn", "asynchronous", "analysis")
"""Sub-packages reachable as attributes: `import piperc; piperc.runtime.load(...)`."""


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"piperc.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'piperc' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

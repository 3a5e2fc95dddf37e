"""The piperc runtime: runs compiled per-rank programs with torch.distributed.

It imports torch and the standard library only, never the compiler, so a
compiled model directory runs on a machine without xDSL or torch-mlir:

    executor = piperc.runtime.load("out/model")     # under torchrun, one per rank
    loss = executor.step((tokens, targets))

or, from one process on one machine:

    result = piperc.runtime.launch_dir("out/model", batches)
"""

if __name__ != "piperc.runtime":  # one folder, one import name (docs/architecture.md, "Folders")
    raise ImportError(f"the runtime/ folder is the package piperc.runtime; import it under that name, not {__name__}")


from .comm import Runtime, Work
from .executor import Executor, load
from .launch import LaunchError, LaunchResult, launch_dir, progress_bar
from .manifest import Manifest, ManifestError, read_manifest, shard

__all__ = [
    "Executor",
    "LaunchError",
    "LaunchResult",
    "Manifest",
    "ManifestError",
    "Runtime",
    "Work",
    "launch_dir",
    "load",
    "progress_bar",
    "read_manifest",
    "shard",
]

"""Checkpoints of compiled programs: `piperc.checkpoint.to_state_dict(dir)` and friends.

The implementation is `piperc.runtime.checkpoint` (torch only, so training machines
without the compiler read and write checkpoints too); this module names it for users.
"""

from piperc.runtime.checkpoint import CheckpointError, latest, read_info, step_dir, to_state_dict

__all__ = ["CheckpointError", "latest", "read_info", "step_dir", "to_state_dict"]

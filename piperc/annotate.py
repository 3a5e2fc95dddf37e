"""`piperc.annotate`: mark a region of model code for later passes.

Imports torch only, so model files can use it without the compiler.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch.fx.traceback as fx_traceback

REGION_KEY = "piperc_region"
INDEX_KEY = "piperc_region_index"


@contextlib.contextmanager
def annotate(name: str, index: int | None = None) -> Iterator[None]:
    """Marks every op traced inside the `with` block as belonging to region `name`.

    `index` numbers repeated regions (`annotate("stage", 1)`). The marks reach
    the captured IR as the `region` of each op's `#par.origin`, on forward ops
    and on the backward ops that differentiate them. Outside capture the
    context manager does nothing, so models run unchanged in eager mode.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"piperc.annotate: the region name must be a non-empty str, got {name!r}")
    if index is not None and (not isinstance(index, int) or index < 0):
        raise ValueError(f"piperc.annotate({name!r}): index must be an int >= 0, got {index!r}")
    marks = {REGION_KEY: name}
    if index is not None:
        marks[INDEX_KEY] = index
    with fx_traceback.annotate(marks):
        yield

"""The strategy vocabulary users write: a mesh, directives and an optimizer.

    mesh=piperc.Mesh(pp=2, dp=2)
    strategy=[piperc.pipeline(axis="pp", stages=2, microbatches=4, schedule="1f1b"),
              piperc.data_parallel(axis="dp")]
    optimizer=piperc.optim.AdamW(lr=1e-3, weight_decay=0.1)

Each directive becomes one or more passes (`Directive.passes`); its `str()`
is how errors quote it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from piperc.errors import StrategyError


class Mesh:
    """A device mesh with named axes: `Mesh(pp=2, dp=2)` is 4 ranks, pp slowest."""

    def __init__(self, **axes: int):
        if not axes:
            raise StrategyError("Mesh() needs at least one axis, e.g. Mesh(dp=2)")
        for name, size in axes.items():
            if not isinstance(size, int) or size < 1:
                raise StrategyError(f"Mesh: axis '{name}' must have an int size >= 1, got {size!r}")
        self.axes: dict[str, int] = dict(axes)

    @property
    def size(self) -> int:
        """The number of ranks."""
        n = 1
        for s in self.axes.values():
            n *= s
        return n

    def __repr__(self) -> str:
        return "Mesh(" + ", ".join(f"{a}={s}" for a, s in self.axes.items()) + ")"


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Pipeline parallelism: `stages` stages along `axis`, `microbatches` per step."""

    axis: str
    stages: int
    microbatches: int
    schedule: str | Sequence[Sequence[str]] = "1f1b"
    split_at: tuple[str, ...] = ()
    region: str = ""

    def __str__(self) -> str:
        extra = f", split_at={list(self.split_at)}" if self.split_at else ""
        extra += f", region={self.region!r}" if self.region else ""
        schedule = self.schedule if isinstance(self.schedule, str) else "<table>"
        return (f"pipeline(axis={self.axis!r}, stages={self.stages}, "
                f"microbatches={self.microbatches}, schedule={schedule!r}{extra})")

    def schedule_options(self) -> dict[str, str]:
        """The schedule pass's options for this directive."""
        if isinstance(self.schedule, str):
            if "\n" not in self.schedule and " " not in self.schedule.strip():
                return {"kind": self.schedule}
            rows = [r.split(":", 1)[-1] for r in self.schedule.strip().splitlines() if r.strip()]
            return {"kind": "user", "table": ";".join(" ".join(r.replace(",", " ").split()) for r in rows)}
        return {"kind": "user", "table": ";".join(" ".join(str(a) for a in row) for row in self.schedule)}


@dataclasses.dataclass(frozen=True)
class DataParallel:
    """Data parallelism: replicate along `axis`, all-reduce gradients in buckets."""

    axis: str = "dp"
    bucket_mb: float = 25.0

    def __str__(self) -> str:
        return f"data_parallel(axis={self.axis!r})"


def pipeline(axis: str = "pp", stages: int = 2, microbatches: int = 1,
             schedule: str | Sequence[Sequence[str]] = "1f1b",
             split_at: Sequence[str] = (), region: str = "") -> Pipeline:
    """Pipeline directive.

    Stages come from `split_at` (module paths where stages 1..N-1 begin), from
    `piperc.annotate(region, i)` regions, or, with `stages` alone, from
    balancing the blocks by cost. `schedule` is "gpipe", "1f1b", or a user
    schedule: one row of actions per device (`[["0F0", "0B0"], ["1F0", "1B0"]]`
    or the same as text, one row per line).
    """
    return Pipeline(axis, stages, microbatches, schedule, tuple(split_at), region)


def data_parallel(axis: str = "dp", bucket_mb: float = 25.0) -> DataParallel:
    """Data-parallel directive: each replica along `axis` takes an equal slice of the batch."""
    return DataParallel(axis, bucket_mb)


@dataclasses.dataclass(frozen=True)
class SGD:
    """torch.optim.SGD's update (momentum, weight decay), written as IR."""

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0

    def pass_options(self) -> dict:
        """The optimizer pass's options."""
        return {"kind": "sgd", "lr": self.lr, "momentum": self.momentum, "weight_decay": self.weight_decay}


@dataclasses.dataclass(frozen=True)
class AdamW:
    """torch.optim.AdamW's update, written as IR."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def pass_options(self) -> dict:
        """The optimizer pass's options."""
        return {"kind": "adamw", "lr": self.lr, "beta1": self.betas[0], "beta2": self.betas[1],
                "eps": self.eps, "weight_decay": self.weight_decay}


class optim:  # noqa: N801 - a namespace, spelled like torch.optim
    """Optimizers: `piperc.optim.SGD(lr, momentum)` and `piperc.optim.AdamW(lr, weight_decay)`."""

    SGD = SGD
    AdamW = AdamW

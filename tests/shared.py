"""What the suite's real runs share, so that each (model, shape) is captured once.

Most end-to-end tests train a built-in example (`n_layers` blocks) for three steps on the
batches of seeds 100, 101, 102 and compare with one device. `setup(example, layers)` makes
that model, its example inputs, its batches and a `piperc.Captures` once per process;
`compile_(...)` compiles through those captures, so every strategy whose microbatch has the
same shape reuses one capture (a copy of its module). `eager(...)` trains the one-device
reference once per (example, layers, optimizer, slices), and `bounds(...)` is the exactness
bound of the brief: 1e-5, or twice the error of one device accumulating each batch over the
same slices where AdamW makes that larger.

Nothing here changes a model: compile reads it, `train_eager` trains a copy.
"""

from __future__ import annotations

import dataclasses
import functools
from types import ModuleType

import pytest
import torch

import piperc
from piperc.reference import compare, train_eager

STEPS = 3


@dataclasses.dataclass(frozen=True)
class Setup:
    """One built-in example's model, example inputs, training batches and captures."""

    model: torch.nn.Module
    inputs: tuple[torch.Tensor, ...]
    batches: list
    captures: piperc.Captures


@functools.cache
def setup(example: ModuleType, layers: int) -> Setup:
    """`example.make(n_layers=layers)`, its STEPS batches (seeds 100...) and its captures."""
    model, inputs = example.make(n_layers=layers)
    batches = [example.make(n_layers=layers, seed=100 + s)[1] for s in range(STEPS)]
    return Setup(model, inputs, batches, piperc.Captures(model))


def variant(example: ModuleType, name: str, **options) -> ModuleType:
    """`example` whose `make` takes `options` too, as an example module `setup` caches by
    `name` (e.g. `variant(moe, "moe_top1", top_k=1)`)."""
    made = ModuleType(name)
    made.make = functools.partial(example.make, **options)
    return made


def compile_(example: ModuleType, layers: int, **kwargs) -> piperc.Compiled:
    """`piperc.compile` of the shared model and inputs (`keep_ir=False` unless given)."""
    s = setup(example, layers)
    kwargs.setdefault("keep_ir", False)
    return piperc.compile(s.model, s.inputs, captures=s.captures, **kwargs)


@functools.cache
def eager(example: ModuleType, layers: int, optimizer, slices: int = 1, pieces: int = 1) -> tuple[list[float], dict]:
    """The one-device losses and final state of the shared model on its batches, each batch
    accumulated over `slices` row slices, each of those over `pieces` sequence pieces."""
    s = setup(example, layers)
    batches = s.batches if pieces == 1 else [sequence_pieces(b, slices, pieces) for b in s.batches]
    return train_eager(s.model, batches, optimizer, slices=slices * pieces)


def sequence_pieces(batch, slices: int, pieces: int) -> tuple[torch.Tensor, ...]:
    """`batch` (tokens, targets, ...) as `slices x pieces` row slices for `train_eager`: each of
    its `slices` row slices once per sequence piece, the targets outside that piece -100
    (ignored by the examples' mean cross-entropy). Each such slice's loss is its piece's mean,
    so scaled by 1/(slices x pieces) they sum to the batch's loss: one device accumulating
    each sequence's gradient piece by piece, as sequence parallelism cuts it, each forward
    over the whole sequence."""
    tokens, targets, *rest = batch
    length = targets.shape[1]
    if length % pieces:
        raise ValueError(f"a sequence of {length} tokens does not split into {pieces} pieces")
    rows = []
    for part in zip(*(x.tensor_split(slices) for x in batch), strict=True):
        for piece in range(pieces):
            kept = torch.full_like(part[1], -100)
            span = slice(piece * length // pieces, (piece + 1) * length // pieces)
            kept[:, span] = part[1][:, span]
            rows.append((part[0], kept, *part[2:]))
    return tuple(torch.cat(column) for column in zip(*rows, strict=True))


def errors(example: ModuleType, layers: int, optimizer, result) -> tuple[float, float]:
    """The (loss, parameter) relative errors of a run's `result` against one device."""
    return compare(result.losses, result.state_dict, *eager(example, layers, optimizer))


def bounds(example: ModuleType, layers: int, optimizer, slices: int, pieces: int = 1) -> list[float]:
    """Per error, 1e-5 or twice one device's error when it accumulates each batch over
    `slices` row slices (llama at pp=4 x 8 microbatches under AdamW: 9.7e-6 on the
    parameters, which the compiled run matches), each over `pieces` sequence pieces (the
    slices sequence parallelism cuts; `sequence_pieces`)."""
    floor = compare(*eager(example, layers, optimizer, slices, pieces), *eager(example, layers, optimizer))
    return [max(1e-5, 2 * f) for f in floor]


def check_exact(example: ModuleType, layers: int, optimizer, result, slices: int) -> None:
    """Asserts that `result` trains as one device, within `bounds`."""
    errs, limits = errors(example, layers, optimizer, result), bounds(example, layers, optimizer, slices)
    assert all(e <= b for e, b in zip(errs, limits, strict=True)), (errs, limits)


def device_param(name: str, size: int, device: str):
    """The case `name` on `device` as a pytest param, skipped on CUDA without a GPU per rank."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip = pytest.mark.skipif(device == "cuda" and gpus < size, reason=f"needs {size} CUDA devices for NCCL, found {gpus}")
    return pytest.param(name, device, id=f"{name}-{device}", marks=skip)

"""Zigzag (head-tail) pieces: how sequence parallelism balances causal attention.

Under a zigzag layout a dimension split over a group of W ranks is cut into 2W equal chunks,
and the rank at position r holds chunks r and 2W-1-r, in that order: under a causal mask each
rank then holds one early and one late chunk, so every rank has the same attention work. The
compiler chooses the layout per mesh axis and sequence length (`par.zigzag` on the mesh);
the runtime's collectives over that axis, its input cut and ring attention keep to it.

A whole tensor is in natural order; the pieces of the ranks, concatenated in rank order, are
in "rank order" (`order(W)`: chunk 0, chunk 2W-1, chunk 1, chunk 2W-2, ...). `to_ranks` and
`from_ranks` move a dimension between the two.

Standard library and torch only, like the rest of the runtime.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def order(parts: int) -> list[int]:
    """The chunks of a dimension cut into 2 x `parts`, as the ranks hold them, rank by rank."""
    return [c for r in range(parts) for c in (r, 2 * parts - 1 - r)]


def chunks_of(parts: int, index: int) -> tuple[int, int]:
    """The two chunks (of 2 x `parts`) that the rank at position `index` holds, in order."""
    return index, 2 * parts - 1 - index


def piece(tensor: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """The zigzag piece of `tensor` along `dim` that the rank at position `index` of `parts` holds."""
    if tensor.shape[dim] % (2 * parts):
        raise ValueError(f"dim {dim} of size {tensor.shape[dim]} does not split into {2 * parts} equal chunks "
                         f"(zigzag over {parts} ranks)")
    chunks = tensor.chunk(2 * parts, dim)
    return torch.cat([chunks[c] for c in chunks_of(parts, index)], dim)


def to_ranks(tensor: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """`tensor` (natural order along `dim`) with its chunks in rank order: cut contiguously into
    `parts` slices, slice r is rank r's zigzag piece."""
    chunks = tensor.chunk(2 * parts, dim)
    return torch.cat([chunks[c] for c in order(parts)], dim)


def from_ranks(tensor: torch.Tensor, dim: int, parts: int) -> torch.Tensor:
    """The inverse of `to_ranks`: the ranks' pieces, concatenated in rank order, in natural order."""
    chunks = tensor.chunk(2 * parts, dim)
    at = {c: i for i, c in enumerate(order(parts))}
    return torch.cat([chunks[at[c]] for c in range(2 * parts)], dim)


def applies(lengths: Mapping[str, int], axis: str, size: int) -> bool:
    """Whether a cut over `axis` of a dimension now of `size` elements is zigzag: the mesh
    declares `axis` zigzag for that length (`lengths`: axis -> sequence length)."""
    return lengths.get(axis) == size


def cut(tensor: torch.Tensor, dim: int, axes: Sequence[str], mesh: Mapping[str, int], coords: Mapping[str, int],
        lengths: Mapping[str, int]) -> torch.Tensor:
    """`tensor`'s part along `dim` cut over `axes` (outermost first) at `coords`: each axis in
    turn keeps the rank's slice, zigzag where `applies`, contiguous elsewhere."""
    for axis in axes:
        size, parts, index = tensor.shape[dim], mesh[axis], coords[axis]
        if size % parts:
            raise ValueError(f"dim {dim} of size {size} does not split into {parts} equal slices over mesh axis "
                             f"'{axis}'")
        if applies(lengths, axis, size):
            tensor = piece(tensor, dim, parts, index)
        else:
            tensor = tensor.narrow(dim, index * (size // parts), size // parts)
    return tensor

"""Lossless coding of a video's code indices: bit-packing at the codebook's bit width, or range coding
(``constriction``'s range coder) under a prior that encoder and decoder rebuild identically, frame by frame.

Priors, per level (``PRIORS``; measured in BENCHMARKS.md):

* ``adaptive``: the histogram of every earlier frame's codes, plus one per code (Laplace), so the first
  frame is coded at the uniform rate and nothing has to be stored;
* ``temporal``: that histogram mixed with the code at the same position in the previous frame,
  ``(1 - m) * histogram + m * onehot(previous)``, with ``m`` the share of positions that kept their code
  so far (Laplace-smoothed): a still camera keeps most codes, a pan few.

The probabilities are computed from integer counts with IEEE-exact float64 operations only (no
reductions whose order could differ between CPUs), so decoding is exact on any machine.
"""
from __future__ import annotations

import math

import numpy as np

PRIORS = ("temporal", "adaptive")
CODINGS = (*PRIORS, "packed")


def bit_width(codebook_size: int) -> int:
    return max(1, math.ceil(math.log2(codebook_size)))


def pack(indices: np.ndarray, codebook_size: int) -> np.ndarray:
    """Indices at ``bit_width`` bits each, most significant bit first, as bytes (zero-padded at the end)."""
    width = bit_width(codebook_size)
    bits = (indices.reshape(-1, 1).astype(np.uint64) >> np.arange(width - 1, -1, -1, dtype=np.uint64)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1))


def unpack(data: np.ndarray, codebook_size: int, count: int) -> np.ndarray:
    width = bit_width(codebook_size)
    bits = np.unpackbits(data)[:count * width].reshape(count, width).astype(np.int64)
    return bits @ (1 << np.arange(width - 1, -1, -1, dtype=np.int64))


def _frame_probabilities(prior: str, counts: np.ndarray, previous: np.ndarray | None, kept: int,
                         seen: int) -> np.ndarray:
    """(positions, K) or (K,) probabilities of one frame's codes under ``prior``, from the earlier frames'
    code counts (Laplace: +1), the previous frame's codes, and how many of ``seen`` positions kept theirs."""
    histogram = (counts + 1.0) / float(counts.sum() + counts.size)  # integer sum: exact
    if prior == "adaptive" or previous is None:
        return histogram
    share = (kept + 1.0) / (seen + 2.0)
    probabilities = np.tile((1.0 - share) * histogram, (previous.size, 1))
    probabilities[np.arange(previous.size), previous] += share
    return probabilities


def encode(indices: np.ndarray, codebook_size: int, coding: str) -> np.ndarray:
    """(frames, h, w) indices -> compressed words (uint32 for the range coder, uint8 when packed)."""
    if coding == "packed":
        return pack(indices, codebook_size)
    import constriction

    coder = constriction.stream.queue.RangeEncoder()
    Categorical = constriction.stream.model.Categorical
    for symbols, probabilities in _frames_with_priors(indices, codebook_size, coding):
        if probabilities.ndim == 1:  # one model for the whole frame
            coder.encode(symbols.astype(np.int32), Categorical(probabilities, perfect=False))
        else:  # one model per position
            coder.encode(symbols.astype(np.int32), Categorical(perfect=False), probabilities)
    return coder.get_compressed()


def decode(data: np.ndarray, shape: tuple[int, int, int], codebook_size: int, coding: str) -> np.ndarray:
    """Inverse of :func:`encode`: the (frames, h, w) int64 indices, exactly."""
    count = int(np.prod(shape))
    if coding == "packed":
        return unpack(data, codebook_size, count).reshape(shape)
    import constriction

    coder = constriction.stream.queue.RangeDecoder(np.ascontiguousarray(data, dtype=np.uint32))
    frames, positions = shape[0], shape[1] * shape[2]
    out = np.zeros((frames, positions), dtype=np.int64)
    state = _PriorState(codebook_size, coding)
    Categorical = constriction.stream.model.Categorical
    for t in range(frames):
        probabilities = state.probabilities()
        if probabilities.ndim == 1:
            out[t] = coder.decode(Categorical(probabilities, perfect=False), positions)
        else:
            out[t] = coder.decode(Categorical(perfect=False), probabilities)
        state.update(out[t])
    return out.reshape(shape)


class _PriorState:
    """What a prior knows before each frame: code counts so far, the previous frame, how many codes it kept."""

    def __init__(self, codebook_size: int, prior: str):
        if prior not in PRIORS:
            raise ValueError(f"unknown prior {prior!r}; choose one of {PRIORS}")
        self.prior = prior
        self.counts = np.zeros(codebook_size, dtype=np.int64)
        self.previous: np.ndarray | None = None
        self.kept = self.seen = 0

    def probabilities(self) -> np.ndarray:
        return _frame_probabilities(self.prior, self.counts, self.previous, self.kept, self.seen)

    def update(self, symbols: np.ndarray) -> None:
        self.counts += np.bincount(symbols, minlength=self.counts.size)
        if self.previous is not None:
            self.kept += int((symbols == self.previous).sum())
            self.seen += symbols.size
        self.previous = symbols


def _frames_with_priors(indices: np.ndarray, codebook_size: int, prior: str):
    state = _PriorState(codebook_size, prior)
    for frame in indices.reshape(len(indices), -1).astype(np.int64):
        yield frame, state.probabilities()
        state.update(frame)

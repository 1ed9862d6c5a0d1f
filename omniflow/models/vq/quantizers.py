"""Vector quantizers shared by every VQ family.

All quantizers take encoder features ``z`` of shape (B, C, H, W) and return a
:class:`QuantizerOutput`. Conventions that hold for every variant:

* the math runs in fp32 with autocast switched off (distances in bf16 pick wrong codes);
  the quantized tensor is returned in the input dtype;
* the VQ loss is ``||sg(z) - e||^2 + beta * ||z - sg(e)||^2``: ``beta`` weights the
  commitment term that pulls the *encoder output* towards its code (the EMA variant has
  no codebook term, its codebook moves by moving averages);
* codebook statistics (EMA sums, Sinkhorn marginals, usage counts, dead-code restarts)
  are summed over ranks when torch.distributed is initialised, so every rank keeps an
  identical codebook. This only happens in training mode: evaluation may see uneven
  batches per rank and must not block on collectives;
* optional L2-normalised codes (cosine similarity) and factorised low-dimensional codes
  (project ``input_dim`` -> ``code_dim`` before the lookup and back afterwards).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from .base import VQConfigError


@dataclass
class QuantizerOutput:
    quantized: torch.Tensor  # (B, C, H, W), straight-through w.r.t. z, input dtype
    loss: torch.Tensor  # scalar, fp32
    indices: torch.Tensor  # (B, H, W) int64
    perplexity: torch.Tensor  # scalar, exp(entropy of code usage in this batch)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op without an initialised process group)."""
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def _broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def perplexity_from_counts(counts: torch.Tensor) -> torch.Tensor:
    probs = counts / counts.sum().clamp_min(1e-12)
    return torch.exp(-(probs * torch.log(probs + 1e-10)).sum())


class VectorQuantizer(nn.Module):
    """Nearest-neighbour VQ with a codebook learnt by gradient (VQ-VAE / VQGAN).

    Args:
        num_codes: codebook size K.
        input_dim: channels of the encoder features.
        beta: commitment weight on ``||z - sg(e)||^2``.
        code_dim: if set and different from ``input_dim``, codes live in this lower
            dimension (factorised codes, linear projections in and out).
        l2_normalize: compare and store unit-norm vectors (cosine-similarity codes).
        dead_code_steps: restart a code after it went unused for this many consecutive
            training steps (summed over ranks); 0 disables restarts.
        init_from_data: on the first training step, set every code to a random encoder
            output of that batch; codes far from the data would otherwise never be picked.
        restart_pool: restart dead codes from the last ``restart_pool`` encoder outputs of
            training (rank 0's, kept in a ring buffer that checkpoints hold) instead of the
            current batch only: a small batch of a few hundred vectors would otherwise fill
            thousands of codes with copies of itself. 0: the current batch.
        legacy_beta: put ``beta`` on the codebook term instead, ``beta * ||sg(z) - e||^2 +
            ||z - sg(e)||^2``, as taming's ``VectorQuantizer2`` does by default (``legacy=True``),
            so that a ported taming config trains the same.
    """

    def __init__(
        self,
        num_codes: int,
        input_dim: int,
        beta: float = 0.25,
        code_dim: int | None = None,
        l2_normalize: bool = False,
        dead_code_steps: int = 0,
        init_from_data: bool = True,
        restart_pool: int = 0,
        legacy_beta: bool = False,
    ) -> None:
        super().__init__()
        if num_codes < 1 or input_dim < 1:
            raise VQConfigError(f"quantizer needs num_codes >= 1 and input_dim >= 1, got {num_codes}, {input_dim}")
        self.num_codes = num_codes
        self.input_dim = input_dim
        self.code_dim = code_dim or input_dim
        self.beta = beta
        self.legacy_beta = legacy_beta
        self.l2_normalize = l2_normalize
        self.dead_code_steps = dead_code_steps
        factorised = self.code_dim != input_dim
        self.in_proj = nn.Linear(input_dim, self.code_dim) if factorised else nn.Identity()
        self.out_proj = nn.Linear(self.code_dim, input_dim) if factorised else nn.Identity()
        if dead_code_steps > 0:
            self.register_buffer("unused_steps", torch.zeros(num_codes, dtype=torch.long))
        if restart_pool < 0:
            raise VQConfigError(f"restart_pool must be >= 0, got {restart_pool}")
        if restart_pool:  # ring buffer: rows written so far (up to the size), and where the next one goes
            self.register_buffer("pool", torch.zeros(restart_pool, self.code_dim))
            self.register_buffer("pool_filled", torch.zeros((), dtype=torch.long))
            self.register_buffer("pool_next", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.tensor(not init_from_data))
        self._forget_host_copies()
        self._init_codebook()

    def _forget_host_copies(self) -> None:
        # Host copies of buffers read every training step, so that a step does not wait for the GPU to
        # read them; None: read the buffer once (after construction or a state-dict load).
        self._initialized_on_host: bool | None = None
        self._pool_rows_on_host: int | None = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # Weights saved without the flag (e.g. taming checkpoints) hold a trained codebook.
        state_dict.setdefault(prefix + "initialized", torch.tensor(True))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._forget_host_copies()

    # -- codebook storage: overridden by the EMA variant, which keeps it in buffers --
    def _init_codebook(self) -> None:
        self.embedding = nn.Embedding(self.num_codes, self.code_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / self.num_codes, 1.0 / self.num_codes)

    def codebook(self) -> torch.Tensor:
        """(K, code_dim) fp32 codes as used for lookup (normalised when ``l2_normalize``)."""
        return self._normalize(self.embedding.weight.float())

    def _replace_codes(self, dead: torch.Tensor, new_codes: torch.Tensor) -> None:
        self.embedding.weight.data[dead] = new_codes.to(self.embedding.weight.dtype)

    # -- assignment: overridden by the Sinkhorn variant --
    def _assign(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return torch.cdist(flat, codes).argmin(dim=1)

    def _loss(self, flat: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        codebook_term = F.mse_loss(quantized, flat.detach())
        commitment_term = F.mse_loss(flat, quantized.detach())
        if self.legacy_beta:
            return self.beta * codebook_term + commitment_term
        return codebook_term + self.beta * commitment_term

    def _update_codebook(self, flat: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor) -> None:
        """Hook for statistics-based codebook updates (EMA); gradient codebooks do nothing."""

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1, eps=1e-6) if self.l2_normalize else x

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        if z.ndim != 4 or z.shape[1] != self.input_dim:
            raise ValueError(f"quantizer expects (B, {self.input_dim}, H, W) features, got {tuple(z.shape)}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            out = self._quantize(z)
        return out

    def _quantize(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        flat_in = z.float().permute(0, 2, 3, 1).reshape(-1, self.input_dim)
        flat = self._normalize(self.in_proj(flat_in))
        if self.training and not self._initialized_on_host:
            if not bool(self.initialized):
                self._set_codes(torch.ones(self.num_codes, dtype=torch.bool, device=flat.device), flat.detach(),
                                self.num_codes)
                self.initialized.fill_(True)
            self._initialized_on_host = True
        codes = self.codebook()
        with torch.no_grad():  # the assignment is discrete; gradients flow through the loss
            indices = self._assign(flat.detach(), codes)
        quantized = codes[indices]
        loss = self._loss(flat, quantized)

        with torch.no_grad():
            counts = torch.bincount(indices, minlength=self.num_codes).float()
            if self.training:
                all_reduce_sum(counts)
                self._update_codebook(flat.detach(), counts, indices)
                source = self._remember(flat.detach()) if hasattr(self, "pool") else flat.detach()
                if self.dead_code_steps > 0:
                    self._restart_dead_codes(source, counts)
            perplexity = perplexity_from_counts(counts)

        quantized = flat + (quantized - flat).detach()  # straight-through estimator
        out = self.out_proj(quantized).reshape(b, h, w, self.input_dim).permute(0, 3, 1, 2)
        return QuantizerOutput(out.contiguous().to(z.dtype), loss, indices.reshape(b, h, w), perplexity)

    @torch.no_grad()
    def _remember(self, flat: torch.Tensor) -> torch.Tensor:
        """Write ``flat`` into the pool (the newest rows if it holds more); returns the filled part."""
        size = self.pool.shape[0]
        rows = flat[-size:].to(self.pool.dtype)
        slots = (self.pool_next + torch.arange(rows.shape[0], device=rows.device)) % size
        self.pool[slots] = rows
        self.pool_next.copy_((self.pool_next + rows.shape[0]) % size)
        if self._pool_rows_on_host is None:
            self._pool_rows_on_host = int(self.pool_filled)
        self.pool_filled.clamp_(max=size - rows.shape[0]).add_(rows.shape[0])
        self._pool_rows_on_host = min(size, self._pool_rows_on_host + rows.shape[0])
        return self.pool[:self._pool_rows_on_host]

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor, global_counts: torch.Tensor) -> None:
        self.unused_steps.add_(1).masked_fill_(global_counts > 0, 0)
        dead = self.unused_steps >= self.dead_code_steps
        count = int(dead.sum())  # the one host read of a restarting quantizer's step
        if count:
            self._set_codes(dead, flat, count)
            self.unused_steps.masked_fill_(dead, 0)

    @torch.no_grad()
    def _set_codes(self, mask: torch.Tensor, flat: torch.Tensor, count: int) -> None:
        """Replace the ``count`` masked codes by random rows of ``flat``, identical on every rank."""
        picks = torch.randint(0, flat.shape[0], (count,), device=flat.device)
        # Rank 0 picks the replacement encoder outputs so all ranks install the same codes.
        self._replace_codes(mask, _broadcast_from_rank0(flat[picks].contiguous()))

    @torch.no_grad()
    def embed(self, indices: torch.Tensor) -> torch.Tensor:
        """Codes (B, H, W) -> quantized features (B, input_dim, H, W), as in ``forward``."""
        if indices.min() < 0 or indices.max() >= self.num_codes:
            raise ValueError(f"code indices must lie in [0, {self.num_codes}), got range "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        with torch.autocast(device_type=indices.device.type, enabled=False):
            vectors = self.out_proj(self.codebook()[indices])
        return vectors.permute(0, 3, 1, 2).contiguous()


class EMAVectorQuantizer(VectorQuantizer):
    """VQ whose codebook follows exponential moving averages of its assigned encoder outputs.

    Per step, with global (all-rank) counts n_k and sums s_k of assigned vectors:
    ``N_k <- d N_k + (1-d) n_k``, ``m_k <- d m_k + (1-d) s_k`` and
    ``e_k = m_k / N~_k`` with Laplace smoothing ``N~_k = (N_k + eps) / (N + K eps) * N``.
    The loss is only the commitment term ``beta * ||z - sg(e)||^2``.
    """

    def __init__(self, num_codes: int, input_dim: int, beta: float = 0.25, decay: float = 0.99,
                 eps: float = 1e-5, **kwargs) -> None:
        if not 0.0 < decay < 1.0:
            raise VQConfigError(f"EMA decay must lie in (0, 1), got {decay}")
        self.decay = decay
        self.eps = eps
        super().__init__(num_codes, input_dim, beta=beta, **kwargs)

    def _init_codebook(self) -> None:
        codes = torch.randn(self.num_codes, self.code_dim)
        self.register_buffer("embedding_weight", codes)
        # Starting counts at one keeps an unused code where it is instead of dividing by ~eps.
        self.register_buffer("cluster_size", torch.ones(self.num_codes))
        self.register_buffer("embed_avg", codes.clone())

    def codebook(self) -> torch.Tensor:
        return self._normalize(self.embedding_weight.float())

    def _loss(self, flat: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
        return self.beta * F.mse_loss(flat, quantized.detach())

    def _update_codebook(self, flat: torch.Tensor, counts: torch.Tensor, indices: torch.Tensor) -> None:
        sums = torch.zeros(self.num_codes, self.code_dim, device=flat.device)
        sums.index_add_(0, indices, flat)
        all_reduce_sum(sums)
        decay = self.decay
        cluster_size = decay * self.cluster_size.float() + (1 - decay) * counts
        embed_avg = decay * self.embed_avg.float() + (1 - decay) * sums
        total = cluster_size.sum()
        smoothed = (cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.cluster_size.copy_(cluster_size)
        self.embed_avg.copy_(embed_avg)
        self.embedding_weight.copy_(embed_avg / smoothed.unsqueeze(1))

    def _replace_codes(self, dead: torch.Tensor, new_codes: torch.Tensor) -> None:
        self.embedding_weight[dead] = new_codes.to(self.embedding_weight.dtype)
        self.embed_avg[dead] = new_codes.to(self.embed_avg.dtype)
        self.cluster_size[dead] = 1.0


@torch.no_grad()
def sinkhorn(cost: torch.Tensor, epsilon: float, n_iters: int) -> torch.Tensor:
    """Entropic optimal-transport plan between samples (rows) and codes (columns).

    Returns Q (B, K) with every row summing to 1 (a soft assignment per sample) and
    columns pushed towards the uniform marginal B_total / K (balanced code usage).
    B_total and the column sums are taken over all ranks.
    """
    # Rescaling a row of exp(-eps * cost) is absorbed by Sinkhorn's row scaling, so shifting
    # each row by its minimum changes nothing but keeps every row away from underflow.
    logits = -epsilon * (cost - cost.min(dim=1, keepdim=True).values)
    q = torch.exp(logits)
    num_codes = q.shape[1]
    total_samples = all_reduce_sum(torch.tensor(float(q.shape[0]), device=q.device))
    for _ in range(n_iters):
        col = all_reduce_sum(q.sum(dim=0, keepdim=True))
        q = q / col.clamp_min(1e-30) * (total_samples / num_codes)
        q = q / q.sum(dim=1, keepdim=True).clamp_min(1e-30)
    return q


class SinkhornVectorQuantizer(VectorQuantizer):
    """OptVQ-style quantizer: training assignments come from a Sinkhorn transport plan.

    The plan spreads samples over all codes, which prevents codebook collapse. The cost
    matrix is the Euclidean distance, normalised by ``normalize_mode``:
    ``"all"`` standardises it with the global (all-rank) mean and std and shifts it to be
    non-negative, ``"dim"`` divides by sqrt(code_dim), ``None``/"null" leaves it as is.
    Outside training the assignment is the nearest code, so an image's codes never depend
    on which other images share its batch (the compression tool relies on that).
    """

    def __init__(self, num_codes: int, input_dim: int, beta: float = 0.25, epsilon: float = 10.0,
                 n_iters: int = 5, normalize_mode: str | None = "all", **kwargs) -> None:
        if normalize_mode == "null":
            normalize_mode = None
        if normalize_mode not in ("all", "dim", None):
            raise VQConfigError(f"normalize_mode must be 'all', 'dim' or null, got {normalize_mode!r}")
        if epsilon <= 0 or n_iters < 1:
            raise VQConfigError(f"Sinkhorn needs epsilon > 0 and n_iters >= 1, got {epsilon}, {n_iters}")
        self.epsilon = epsilon
        self.n_iters = n_iters
        self.normalize_mode = normalize_mode
        super().__init__(num_codes, input_dim, beta=beta, **kwargs)

    def normalized_cost(self, distances: torch.Tensor) -> torch.Tensor:
        if self.normalize_mode == "dim":
            return distances / math.sqrt(self.code_dim)
        if self.normalize_mode is None:
            return distances
        stats = torch.stack([distances.sum(), distances.pow(2).sum(),
                             torch.tensor(float(distances.numel()), device=distances.device)])
        total, total_sq, count = all_reduce_sum(stats)
        mean = total / count
        std = (total_sq / count - mean**2).clamp_min(0).sqrt()
        standardized = (distances - mean) / (std + 1e-6)
        return standardized - _all_reduce_min(standardized.min().reshape(1))

    def _assign(self, flat: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(flat, codes)
        if not self.training:
            return distances.argmin(dim=1)
        plan = sinkhorn(self.normalized_cost(distances), self.epsilon, self.n_iters)
        return plan.argmax(dim=1)


def build_quantizer(kind: str, num_codes: int, input_dim: int, **kwargs) -> VectorQuantizer:
    """``kind``: ``"vq"`` (gradient codebook), ``"ema"`` or ``"sinkhorn"``."""
    classes = {"vq": VectorQuantizer, "ema": EMAVectorQuantizer, "sinkhorn": SinkhornVectorQuantizer}
    if kind not in classes:
        raise VQConfigError(f"unknown quantizer kind {kind!r}; choose one of {sorted(classes)}")
    return classes[kind](num_codes, input_dim, **kwargs)

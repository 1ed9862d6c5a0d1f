"""Spawned-worker code for the metrics tests, kept apart so workers import only what they need."""

import numpy as np
import torch
import torch.distributed as dist

from omniflow.metrics.image import CodebookUsage, GaussianStats, frechet_distance


def distributed_stats_worker(rank: int, world: int, init_file: str, feats: np.ndarray, codes: np.ndarray, out: str):
    """Each rank holds a strided share of the features and codes; rank 0 saves the reduced results."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)

    def all_gather(t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    real, fake = GaussianStats(feats.shape[2]), GaussianStats(feats.shape[2])
    real.add(torch.from_numpy(feats[0][rank::world]))
    fake.add(torch.from_numpy(feats[1][rank::world]))
    mu_r, cov_r, _ = real.mean_cov(all_gather)
    mu_f, cov_f, _ = fake.mean_cov(all_gather)
    usage = CodebookUsage(16)
    usage.update(torch.from_numpy(codes[rank::world]))
    result = usage.compute(all_reduce)
    if rank == 0:
        np.save(out, np.array([frechet_distance(mu_r, cov_r, mu_f, cov_f), result["perplexity"], result["used_codes"]]))
    dist.destroy_process_group()

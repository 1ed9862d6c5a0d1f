"""Worker for the two-rank VQ head test (module-level so torch.multiprocessing can spawn it)."""
from pathlib import Path

import torch


def codes_near_each_rank() -> torch.Tensor:
    """8 codes in 4-d: code 0 at the origin, code 1 at (5, 0, 0, 0), the rest far from all data."""
    codes = torch.full((8, 4), 100.0)
    codes[0] = 0.0
    codes[1] = torch.tensor([5.0, 0.0, 0.0, 0.0])
    return codes


def rank_batch(rank: int) -> torch.Tensor:
    """Rank r's head outputs [2, 3, 4]: all near code r."""
    noise = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(rank)) * 0.1
    return noise + codes_near_each_rank()[rank]


def vq_head_worker(rank: int, world_size: int, out_dir: str) -> None:
    from omniflow.models.text_heads import VQCodebookHead

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                                         world_size=world_size)
    try:
        torch.manual_seed(100 + rank)  # different random streams: restarts must still agree
        vq = VQCodebookHead(4, num_codes=8, dead_code_steps=1).train()
        with torch.no_grad():
            vq.quantizer.embedding.weight.copy_(codes_near_each_rank())
        vq.quantizer.initialized.fill_(True)
        out = vq(rank_batch(rank))
        torch.save({"usage": out.usage, "perplexity": out.perplexity, "codes": vq.quantizer.embedding.weight.detach()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()

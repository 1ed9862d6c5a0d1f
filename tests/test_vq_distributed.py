"""Codebook statistics are summed over ranks: 2 gloo processes must match one process on the whole batch."""

import socket

import torch
import torch.multiprocessing as mp

from omniflow.models.vq.quantizers import EMAVectorQuantizer, SinkhornVectorQuantizer, sinkhorn
from vq_helpers import distributed_quantizer_worker, shared_features


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_ranks_match_one_process_on_the_full_batch(tmp_path):
    mp.spawn(distributed_quantizer_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    full = shared_features()

    torch.manual_seed(1)
    ema = EMAVectorQuantizer(8, 3, decay=0.8, init_from_data=False).train()
    perplexity = ema(full).perplexity
    for result in ranks:
        for key, value in ema.state_dict().items():
            torch.testing.assert_close(result["ema"][key], value, msg=f"EMA buffer {key} differs from 1 process")
        torch.testing.assert_close(result["perplexity"], perplexity)

    sink = SinkhornVectorQuantizer(8, 3, normalize_mode="all", init_from_data=False)
    distances = torch.cdist(full.permute(0, 2, 3, 1).reshape(-1, 3), sink.codebook())
    plan = sinkhorn(sink.normalized_cost(distances), epsilon=3.0, n_iters=5)
    torch.testing.assert_close(torch.cat([r["plan"] for r in ranks]), plan)

    torch.testing.assert_close(ranks[0]["restarted"], ranks[1]["restarted"])
    rank0_rows = full.chunk(2)[0].permute(0, 2, 3, 1).reshape(-1, 3)
    assert all((rank0_rows == code).all(dim=1).any() for code in ranks[0]["restarted"])

import pytest
import torch
import torch.nn.functional as F

from omniflow.models.vq.base import VQConfigError
from omniflow.models.vq.quantizers import (EMAVectorQuantizer, SinkhornVectorQuantizer, VectorQuantizer,
                                           build_quantizer, sinkhorn)


def _features(b=2, c=4, h=3, w=3, seed=0):
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


def _flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_straight_through_passes_gradient_unchanged():
    quantizer = VectorQuantizer(8, 4, init_from_data=False).train()
    z = _features().requires_grad_()
    out = quantizer(z)
    codes = quantizer.codebook()[out.indices]  # (B, H, W, C)
    torch.testing.assert_close(out.quantized, codes.permute(0, 3, 1, 2))
    upstream = torch.randn_like(z)
    (out.quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream)


@pytest.mark.parametrize("kind", ["vq", "ema", "legacy"])
def test_beta_weights_the_commitment_term_or_with_legacy_beta_the_codebook_term(kind):
    """Ours: ||sg(z) - e||^2 + beta ||z - sg(e)||^2 (EMA: no codebook term); taming's VectorQuantizer2 default
    (legacy=True, our legacy_beta): beta ||sg(z) - e||^2 + ||z - sg(e)||^2."""
    beta = 0.3
    if kind == "ema":
        quantizer = EMAVectorQuantizer(6, 4, beta=beta, decay=0.9, init_from_data=False)
    else:
        quantizer = VectorQuantizer(6, 4, beta=beta, init_from_data=False, legacy_beta=kind == "legacy")
    quantizer.eval()  # keep the EMA codebook fixed so the expected values are easy to write
    z = _features().requires_grad_()
    out = quantizer(z)
    flat = _flat(z.detach())
    e = quantizer.codebook()[out.indices.reshape(-1)]
    n = flat.numel()
    encoder_weight, codebook_weight = (1.0, beta) if kind == "legacy" else (beta, 1.0)
    # d/dz of w * mean((z - sg(e))^2) = w * 2 (z - e) / n ; the codebook term sends no gradient to z
    out.loss.backward()
    torch.testing.assert_close(_flat(z.grad), encoder_weight * 2 * (flat - e) / n)
    if kind == "ema":
        torch.testing.assert_close(out.loss, beta * F.mse_loss(flat, e))
    else:
        expected = torch.zeros_like(quantizer.embedding.weight)
        expected.index_add_(0, out.indices.reshape(-1), codebook_weight * 2 * (e - flat) / n)
        torch.testing.assert_close(quantizer.embedding.weight.grad, expected)
        torch.testing.assert_close(out.loss, (1 + beta) * F.mse_loss(flat, e))


def test_ema_update_follows_the_documented_formula():
    decay, eps, k = 0.9, 1e-5, 6
    quantizer = EMAVectorQuantizer(k, 3, decay=decay, eps=eps, init_from_data=False).train()
    codes0 = quantizer.embedding_weight.clone()
    z = _features(2, 3, 2, 2)
    out = quantizer(z)
    flat, idx = _flat(z), out.indices.reshape(-1)
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, 3).index_add_(0, idx, flat)
    cluster = decay * 1.0 + (1 - decay) * counts  # counts start at one
    avg = decay * codes0 + (1 - decay) * sums
    total = cluster.sum()
    smoothed = (cluster + eps) / (total + k * eps) * total
    torch.testing.assert_close(quantizer.cluster_size, cluster)
    torch.testing.assert_close(quantizer.embed_avg, avg)
    torch.testing.assert_close(quantizer.embedding_weight, avg / smoothed[:, None])
    unused = counts == 0
    assert unused.any()  # with these seeds some codes get no vector; they must stay put
    torch.testing.assert_close(quantizer.embedding_weight[unused], codes0[unused], rtol=1e-4, atol=1e-5)

    before = quantizer.embedding_weight.clone()
    quantizer.eval()(z)
    torch.testing.assert_close(quantizer.embedding_weight, before)  # evaluation never moves the codebook


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_dead_codes_are_restarted_from_batch_vectors_after_patience(cls):
    quantizer = cls(8, 2, dead_code_steps=2, init_from_data=False).train()
    near = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    far = torch.full((4, 2), 100.0)
    if cls is VectorQuantizer:
        quantizer.embedding.weight.data.copy_(torch.cat([near, far]))
    else:
        quantizer.embedding_weight.copy_(torch.cat([near, far]))
        quantizer.embed_avg.copy_(torch.cat([near, far]))
    z = (near.repeat(4, 1) + 0.01 * torch.randn(16, 2)).reshape(4, 2, 2, 2).permute(0, 3, 1, 2)

    quantizer(z)
    torch.testing.assert_close(quantizer.codebook()[4:], far)  # one unused step is below the patience
    quantizer(z)
    flat = _flat(z)
    restarted = quantizer.codebook()[4:]
    assert all((flat == code).all(dim=1).any() for code in restarted), "restarted codes must be batch vectors"
    assert quantizer.unused_steps.tolist() == [0] * 8
    if cls is EMAVectorQuantizer:
        torch.testing.assert_close(quantizer.embed_avg[4:], restarted)
        assert quantizer.cluster_size[4:].tolist() == [1.0] * 4


def test_codebook_initialised_from_first_training_batch_only():
    z = _features(2, 4, 4, 4)
    quantizer = VectorQuantizer(5, 4).eval()
    before = quantizer.codebook().clone()
    quantizer(z)
    torch.testing.assert_close(quantizer.codebook(), before)
    quantizer.train()(z)
    flat = _flat(z)
    assert all((flat == code).all(dim=1).any() for code in quantizer.codebook())
    assert bool(quantizer.initialized)

    state = {k: v for k, v in quantizer.state_dict().items() if k != "initialized"}  # e.g. a taming checkpoint
    fresh = VectorQuantizer(5, 4)
    fresh.load_state_dict(state)
    assert bool(fresh.initialized)


def test_quantizer_runs_in_fp32_under_bf16_autocast():
    # Factorised codes: the input projection is a Linear, which autocast would run in bf16.
    quantizer = VectorQuantizer(2, 2, code_dim=1, init_from_data=False).eval()
    with torch.no_grad():
        quantizer.in_proj.weight.copy_(torch.tensor([[1.0, 0.0]]))
        quantizer.in_proj.bias.zero_()
        quantizer.embedding.weight.copy_(torch.tensor([[1.0], [1.0025]]))
    z = torch.tensor([1.0015, 0.0]).reshape(1, 2, 1, 1)  # 0.0010 from code 1, 0.0015 from code 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
        out_bf16 = quantizer(z.bfloat16())
    assert out.indices.item() == 1  # in bf16, 1.0015 rounds to 1.0 and code 0 would win
    assert out.loss.dtype == torch.float32
    assert out_bf16.quantized.dtype == torch.bfloat16  # returned in the caller's dtype


def test_l2_normalised_codes_are_unit_vectors_and_embed_matches_forward():
    quantizer = VectorQuantizer(16, 8, code_dim=4, l2_normalize=True).train()
    z = _features(2, 8, 3, 3)
    quantizer(z)
    torch.testing.assert_close(quantizer.codebook().norm(dim=1), torch.ones(16))
    quantizer.eval()
    out = quantizer(z)
    torch.testing.assert_close(quantizer.embed(out.indices), out.quantized)
    with pytest.raises(ValueError, match=r"code indices must lie in \[0, 16\)"):
        quantizer.embed(torch.full((1, 2, 2), 16))


def test_sinkhorn_plan_marginals():
    cost = torch.rand(12, 4, generator=torch.Generator().manual_seed(1)) * 3
    plan = sinkhorn(cost, epsilon=2.0, n_iters=200)
    torch.testing.assert_close(plan.sum(dim=1), torch.ones(12))
    torch.testing.assert_close(plan.sum(dim=0), torch.full((4,), 3.0), rtol=1e-3, atol=1e-3)
    assert (plan >= 0).all()


def test_sinkhorn_spreads_samples_that_all_prefer_one_code():
    quantizer = SinkhornVectorQuantizer(4, 2, epsilon=10.0, n_iters=50, init_from_data=False)
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [-3.0, -3.0]]))
    # every sample lies closest to code 0, at varying angles so the transport plan has a preference
    angles = torch.linspace(0, 6.0, 16)
    z = (0.5 * torch.stack([angles.cos(), angles.sin()], dim=1)).reshape(1, 4, 4, 2).permute(0, 3, 1, 2)
    nearest = quantizer.eval()(z).indices
    balanced = quantizer.train()(z).indices
    assert nearest.unique().tolist() == [0]
    assert balanced.unique().numel() == 4


@pytest.mark.parametrize("mode", ["all", "dim", None, "null"])
def test_sinkhorn_cost_normalisation(mode):
    quantizer = SinkhornVectorQuantizer(4, 9, normalize_mode=mode)
    distances = torch.rand(10, 4) * 5 + 1
    cost = quantizer.normalized_cost(distances)
    if mode == "all":
        assert cost.min().item() == pytest.approx(0.0, abs=1e-6)
        assert cost.std(unbiased=False).item() == pytest.approx(1.0, rel=1e-3)
    elif mode == "dim":
        torch.testing.assert_close(cost, distances / 3.0)
    else:
        torch.testing.assert_close(cost, distances)


def test_bad_quantizer_settings_fail_clearly():
    with pytest.raises(VQConfigError, match="normalize_mode"):
        SinkhornVectorQuantizer(4, 2, normalize_mode="rows")
    with pytest.raises(VQConfigError, match="decay"):
        EMAVectorQuantizer(4, 2, decay=1.0)
    with pytest.raises(VQConfigError, match="unknown quantizer kind 'gumbel'"):
        build_quantizer("gumbel", 4, 2)
    with pytest.raises(ValueError, match=r"expects \(B, 4, H, W\)"):
        VectorQuantizer(4, 4)(torch.zeros(1, 3, 2, 2))

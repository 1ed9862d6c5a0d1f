"""Text decoder heads: the experiment grid, VQ codebook, refiner, decoder loss, export round trip."""
import json
import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from omniflow.models.text_heads import (
    LatentRefiner,
    TextDecoderHead,
    TextHeadOptions,
    TextHeadStack,
    VQCodebookHead,
    load_text_head_stack,
    next_token_logits,
    text_decoder_loss,
)
from omniflow.runtime.errors import CheckpointError, ConfigError
from omniflow.runtime.export import export_weights
from omniflow.runtime.options import parse_options
from text_heads_helpers import codes_near_each_rank, rank_batch, vq_head_worker

IN, LAT, LM, TOKENS = 48, 8, 32, 6  # tiny stand-ins for 4096, 64, 2048 and 32 tokens

GRID = {
    "baseline": dict(use_text_decoder_head=True),
    "refiner": dict(use_text_decoder_head=True, use_latent_refiner=True),
    "vq": dict(use_text_decoder_head=True, use_vq_codebook=True),
    "vq_refiner": dict(use_text_decoder_head=True, use_vq_codebook=True, use_latent_refiner=True),
}


def tiny_options(**overrides) -> TextHeadOptions:
    values = dict(text_decoder_head_hidden_dim=64, vq_codebook_size=32, vq_dead_code_steps=5,
                  latent_refiner_hidden_dim=16)
    values.update(overrides)
    return TextHeadOptions(**values)


def released_layers(seed: int = 0) -> tuple[nn.Linear, nn.Linear]:
    """Stand-ins for the released text_output Linear(IN->LAT) and the decoder's Linear(LAT->LM)."""
    torch.manual_seed(seed)
    return nn.Linear(IN, LAT), nn.Linear(LAT, LM)


def build_stack(variant: str, dim: int, **overrides) -> tuple[TextHeadStack, nn.Linear]:
    text_output, prefix_proj = released_layers()
    options = tiny_options(text_decoder_head_dim=dim, **GRID[variant], **overrides)
    return TextHeadStack(options, IN, LAT, LM, text_output=text_output, prefix_proj=prefix_proj), prefix_proj


# ---- the experiment grid ----

@pytest.mark.parametrize("dim", [LAT, LM], ids=["latent", "prefix"])
@pytest.mark.parametrize("variant", list(GRID))
def test_grid_shapes_and_losses(variant, dim):
    stack, prefix_proj = build_stack(variant, dim)
    out = stack(torch.randn(2, TOKENS, IN))
    assert out.latents_or_prefix.shape == (2, TOKENS, dim)
    assert out.kind == ("latent" if dim == LAT else "prefix")
    assert out.vq_loss.shape == () and out.vq_loss.dtype == torch.float32
    has_vq = GRID[variant].get("use_vq_codebook", False)
    assert set(out.stats) == ({"vq_perplexity", "vq_usage"} if has_vq else set())
    losses = stack.auxiliary_losses(out, torch.randn(2, TOKENS, LAT), prefix_proj)
    assert set(losses) == {"latent_mse", "vq_loss", "aux_loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    losses["aux_loss"].backward()
    assert stack.head.linear.weight.grad.abs().sum() > 0


def test_frozen_baseline_is_the_released_text_output():
    text_output, _ = released_layers()
    stack = TextHeadStack(tiny_options(), IN, LAT, LM, text_output=text_output)
    features = torch.randn(2, TOKENS, IN)
    assert torch.equal(stack(features).latents_or_prefix, text_output(features))
    assert [p for p in stack.parameters() if p.requires_grad] == []
    with_refiner = TextHeadStack(tiny_options(use_latent_refiner=True), IN, LAT, LM, text_output=text_output)
    assert {n.split(".")[0] for n, p in with_refiner.named_parameters() if p.requires_grad} == {"refiner"}
    with pytest.raises(ConfigError, match="pass it"):
        TextHeadStack(tiny_options(), IN, LAT, LM)


def test_head_dim_must_be_latent_or_lm_hidden():
    with pytest.raises(ConfigError, match=f"use {LAT} .* or {LM} "):
        TextDecoderHead(IN, 100, LAT, LM)
    with pytest.raises(ConfigError, match="text_decoder_head_dim 100"):
        build_stack("baseline", 100)


def test_options_parse_and_validate():
    options = parse_options(TextHeadOptions, args=[
        "--use_text_decoder_head", "--text_decoder_head_dim", "2048", "--use_vq_codebook",
        "--use_latent_refiner", "--latent_refiner_hidden_dim", "256", "--latent_refiner_layers", "2"])
    assert options.text_decoder_head_dim == 2048 and options.use_vq_codebook and options.vq_codebook_size == 8192
    with pytest.raises(ConfigError, match="add --use_text_decoder_head"):
        parse_options(TextHeadOptions, args=["--use_vq_codebook"])
    with pytest.raises(ConfigError, match="--latent_refiner_layers must be >= 1, got 0"):
        TextHeadOptions(latent_refiner_layers=0).validate()
    with pytest.raises(ConfigError, match="--vq_commitment_beta must be >= 0"):
        TextHeadOptions(vq_commitment_beta=-1.0).validate()


# ---- initialisation from the released weights ----

def test_latent_head_reproduces_text_output_at_init():
    text_output, _ = released_layers()
    head = TextDecoderHead(IN, LAT, LAT, LM, hidden_dim=64)
    head.init_from_text_output(text_output)
    features = torch.randn(3, TOKENS, IN)
    assert torch.equal(head(features), text_output(features))


def test_prefix_head_reproduces_prefix_projection_of_text_output_at_init():
    text_output, prefix_proj = released_layers()
    head = TextDecoderHead(IN, LM, LAT, LM, hidden_dim=64)
    head.init_from_text_output(text_output, prefix_proj, latent_scale=2.0)
    features = torch.randn(3, TOKENS, IN)
    torch.testing.assert_close(head(features), prefix_proj(text_output(features) / 2.0), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="prefix projection"):
        TextDecoderHead(IN, LM, LAT, LM).init_from_text_output(text_output)
    with pytest.raises(CheckpointError, match=r"\(8, 47\)"):
        TextDecoderHead(IN, LAT, LAT, LM).init_from_text_output(nn.Linear(IN - 1, LAT))


# ---- refiner ----

def test_refiner_starts_as_identity_and_learns():
    refiner = LatentRefiner(LAT, hidden_dim=16, layers=2)
    latents = torch.randn(2, TOKENS, LAT)
    assert torch.equal(refiner(latents), latents)
    refiner(latents).pow(2).sum().backward()
    assert refiner.mlp[-1].weight.grad.abs().sum() > 0
    assert sum(isinstance(m, nn.Linear) for m in refiner.mlp) == 3  # 2 hidden layers + output


def test_refiner_output_is_what_the_decoder_receives():
    stack, _ = build_stack("refiner", LAT)
    nn.init.normal_(stack.refiner.mlp[-1].weight)  # a trained refiner, no longer the identity
    features = torch.randn(2, TOKENS, IN)
    head_latents = stack.head(features)
    out = stack(features).latents_or_prefix
    assert torch.equal(out, stack.refiner(head_latents))
    assert not torch.allclose(out, head_latents)


# ---- VQ codebook head ----

def vq_with_codes(codes: torch.Tensor, beta: float = 0.25, dead_code_steps: int = 0,
                  restart_pool: int = 0) -> VQCodebookHead:
    vq = VQCodebookHead(codes.shape[1], num_codes=codes.shape[0], beta=beta, dead_code_steps=dead_code_steps,
                        restart_pool=restart_pool)
    with torch.no_grad():
        vq.quantizer.embedding.weight.copy_(codes)
    vq.quantizer.initialized.fill_(True)
    return vq


def test_vq_straight_through_and_commitment_side():
    codes = torch.randn(16, 4)
    vq = vq_with_codes(codes, beta=0.25).eval()
    z = torch.randn(2, 5, 4, requires_grad=True)
    out = vq(z)
    chosen = codes[out.indices]
    torch.testing.assert_close(out.quantized, chosen)  # z + (e - z): equal up to rounding
    upstream = torch.randn_like(z)
    (grad_z,) = torch.autograd.grad(out.quantized, z, upstream, retain_graph=True)
    assert torch.equal(grad_z, upstream)  # straight-through: the decoder's gradient reaches the head as is

    out.loss.backward()
    n = z.numel()
    # commitment beta*||z - sg(e)||^2 moves the head output; the codebook term ||sg(z) - e||^2 moves the codes
    torch.testing.assert_close(z.grad, 0.25 * 2 * (z - chosen).detach() / n)
    per_token = 2 * (chosen - z).detach().reshape(-1, 4) / n
    expected_code_grad = torch.zeros_like(codes).index_add_(0, out.indices.flatten(), per_token)
    torch.testing.assert_close(vq.quantizer.embedding.weight.grad, expected_code_grad)
    torch.testing.assert_close(out.loss, F.mse_loss(chosen, z.detach()) * 1.25)


def test_vq_distances_in_fp32_under_bf16_autocast():
    codes = torch.zeros(4, 4)
    codes[0, 0], codes[1, 0], codes[2, 0], codes[3, 0] = 1.0035, 0.997, 5.0, -5.0
    z = torch.zeros(1, 1, 4, dtype=torch.bfloat16)
    z[0, 0, 0] = 1.0  # nearest code in exact arithmetic: 1 (|1 - 0.997| < |1 - 1.0035|)
    bf16_distances = (z.reshape(1, 4) - codes.bfloat16()).pow(2).sum(-1)
    assert bf16_distances.argmin().item() == 0  # bf16 rounds both codes and picks the wrong one
    vq = vq_with_codes(codes).eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = vq(z)
    assert out.indices.item() == 1
    assert out.quantized.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_vq_restarts_dead_codes_from_recent_head_outputs():
    codes = torch.full((8, 4), 100.0)
    codes[0] = 0.0
    vq = vq_with_codes(codes, dead_code_steps=2, restart_pool=0).train()
    torch.manual_seed(0)
    first, second = torch.randn(2, 2, 5, 4) * 0.1
    vq(first)
    assert torch.equal(vq.quantizer.embedding.weight[1:], codes[1:])  # unused for one step only
    vq(second)
    weight = vq.quantizer.embedding.weight.detach()
    assert torch.equal(weight[0], codes[0])  # a used code stays
    rows = second.reshape(-1, 4)
    for code in weight[1:]:
        assert (rows == code).all(dim=1).any(), "without a pool, a dead code is re-seeded from the current batch"
    assert vq.quantizer.unused_steps.tolist() == [0] * 8


def test_vq_restart_pool_keeps_the_latest_head_outputs_across_steps():
    """The pool is a ring buffer of the last N token vectors: restarts draw from earlier batches too (a batch
    has far fewer vectors than the codebook has codes), never from outputs older than N, and it is model
    state, so that a resumed run restarts codes from the same vectors."""
    codes = torch.full((64, 4), 100.0)
    codes[0] = 0.0
    vq = vq_with_codes(codes, dead_code_steps=1, restart_pool=12).train()
    batches = [torch.randn(1, 5, 4, generator=torch.Generator().manual_seed(i)) * 0.1 for i in range(3)]
    for batch in batches:
        used_last = set(vq(batch).indices.flatten().tolist())  # codes the last step kept
    quantizer = vq.quantizer
    latest = torch.cat([b.reshape(-1, 4) for b in batches])[-12:]  # the first batch's first 3 rows fell out
    assert int(quantizer.pool_filled) == 12
    assert sorted(map(tuple, quantizer.pool.tolist())) == sorted(map(tuple, latest.tolist()))
    restarted = [code for i, code in enumerate(quantizer.embedding.weight.detach()) if i not in used_last]
    assert all((latest == code).all(dim=1).any() for code in restarted)
    from_earlier = [code for code in restarted if not (batches[-1].reshape(-1, 4) == code).all(dim=1).any()]
    assert from_earlier, "restarts must also draw on earlier batches' outputs"
    state = vq.state_dict()
    assert {"quantizer.pool", "quantizer.pool_filled", "quantizer.pool_next"} <= set(state)


def test_vq_perplexity_and_usage():
    codes = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    vq = vq_with_codes(codes).eval()
    z = torch.tensor([[[0.1, 0.0], [0.0, -0.1], [9.9, 0.2], [0.3, 9.8]]])  # codes used 2, 1, 1, 0 times
    out = vq(z)
    assert out.indices.tolist() == [[0, 0, 1, 2]]
    assert out.usage.item() == 0.75
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert out.perplexity.item() == pytest.approx(math.exp(entropy), rel=1e-5)  # 2 ** 1.5


def test_vq_initialises_codes_from_the_first_training_batch():
    vq = VQCodebookHead(4, num_codes=8).train()
    z = torch.randn(2, 5, 4) * 3
    vq(z)
    rows = z.reshape(-1, 4)
    assert all((rows == code).all(dim=1).any() for code in vq.quantizer.embedding.weight.detach())


# ---- decoder loss ----

def test_loss_against_hand_computed_values_with_padding():
    pad = 0
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]],
                           [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]]])
    targets = torch.tensor([[1, 1, 2], [1, 2, pad]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = text_decoder_loss(logits, targets, mask, pad_token_id=pad)
    lse = lambda *xs: math.log(sum(math.exp(x) for x in xs))  # noqa: E731
    ces = [lse(2, 0, 0) - 0, lse(0, 1, 0) - 1, lse(0, 0, 3) - 3, lse(1, 1, 0) - 1, lse(0, 0, 0) - 0]
    expected = sum(ces) / 5  # the padded position is not scored
    assert out.num_tokens.item() == 5
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.perplexity.item() == pytest.approx(math.exp(expected), rel=1e-6)
    # argmax per scored position: 0, 1, 2, 0 (tie 1 vs 0 -> first), 0; targets 1, 1, 2, 1, 2
    assert out.token_accuracy.item() == pytest.approx(2 / 5)


def test_loss_matches_manual_cross_entropy_on_scored_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, requires_grad=True)
    targets = torch.randint(1, 11, (3, 7))
    lengths = torch.tensor([7, 4, 1])
    mask = (torch.arange(7) < lengths[:, None]).long()
    targets = targets.masked_fill(mask == 0, 0)
    out = text_decoder_loss(logits, targets, mask, pad_token_id=0)
    keep = mask.bool()
    torch.testing.assert_close(out.loss, F.cross_entropy(logits[keep], targets[keep]))
    out.loss.backward()
    assert logits.grad[~keep].abs().sum() == 0  # padding contributes nothing
    by_pad_id = text_decoder_loss(logits, targets, None, pad_token_id=0)
    torch.testing.assert_close(by_pad_id.loss, out.loss)
    empty = text_decoder_loss(logits, targets, torch.zeros_like(mask))
    assert empty.loss.item() == 0.0 and empty.num_tokens.item() == 0
    with pytest.raises(ValueError, match=r"logits \(3, 7, 11\) must be \[B, L, vocab\] for target_ids \(3, 6\)"):
        text_decoder_loss(logits, targets[:, :6])


def test_next_token_logits_never_see_the_token_they_predict():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    lm = LlamaForCausalLM(config).eval()
    prefix = torch.randn(1, 3, 16)
    targets = torch.randint(0, 20, (1, 5))

    def aligned(ids):
        embeds = torch.cat([prefix, lm.get_input_embeddings()(ids)], dim=1)
        with torch.no_grad():
            return next_token_logits(lm(inputs_embeds=embeds).logits, prefix_len=3)

    base = aligned(targets)
    assert base.shape == (1, 5, 20)
    for i in range(5):
        changed = targets.clone()
        changed[0, i] = (changed[0, i] + 1) % 20
        logits = aligned(changed)
        torch.testing.assert_close(logits[:, : i + 1], base[:, : i + 1], atol=1e-6, rtol=0)
        if i + 1 < 5:
            assert not torch.allclose(logits[:, i + 1], base[:, i + 1])


# ---- learning and export ----

@pytest.mark.parametrize("dim", [LAT, LM], ids=["latent", "prefix"])
@pytest.mark.parametrize("variant", list(GRID))
def test_each_variant_learns_fixed_targets(variant, dim):
    torch.manual_seed(1)
    stack, prefix_proj = build_stack(variant, dim)
    features = torch.randn(4, TOKENS, IN)
    prototypes = torch.randn(4, LAT) * 2  # targets drawn from a few latents, reachable by a codebook
    targets = prototypes[torch.randint(0, 4, (4, TOKENS))]
    optimizer = torch.optim.Adam([p for p in stack.parameters() if p.requires_grad], lr=1e-2)
    mses = []
    for _ in range(50):
        losses = stack.auxiliary_losses(stack(features), targets, prefix_proj)
        optimizer.zero_grad()
        losses["aux_loss"].backward()
        optimizer.step()
        mses.append(losses["latent_mse"].item())
    assert mses[-1] < mses[0] / 5, f"{variant}: latent MSE {mses[0]:.4f} -> {mses[-1]:.4f}"


@pytest.mark.parametrize("variant", ["vq_refiner", "frozen"])
def test_export_round_trip(tmp_path, variant):
    if variant == "frozen":
        text_output, _ = released_layers()
        stack = TextHeadStack(tiny_options(use_latent_refiner=True), IN, LAT, LM, text_output=text_output)
    else:
        stack, _ = build_stack(variant, LM)
        stack.train()(torch.randn(2, TOKENS, IN))  # seeds the codebook and counts a step
    for p in stack.parameters():
        nn.init.normal_(p.data)
    config = json.loads(json.dumps(stack.config()))
    export_weights(stack.state_dict(), config, tmp_path / "heads")
    loaded = load_text_head_stack(tmp_path / "heads")
    assert not loaded.training and loaded.config() == stack.config()
    features = torch.randn(2, TOKENS, IN)
    expected, got = stack.eval()(features), loaded(features)
    assert torch.equal(got.latents_or_prefix, expected.latents_or_prefix) and got.kind == expected.kind
    with pytest.raises(ConfigError, match="unknown options"):
        TextHeadStack.from_config({**config, "options": {**config["options"], "use_refiner": True}})
    with pytest.raises(ConfigError, match="not a text-heads config"):
        TextHeadStack.from_config({**config, "format": "something-else"})


def test_features_of_the_wrong_width_are_refused():
    stack, _ = build_stack("baseline", LAT)
    with pytest.raises(ValueError, match=r"expect features \[B, T, 48\], got \(2, 6, 47\)"):
        stack(torch.randn(2, TOKENS, IN - 1))


def test_two_ranks_share_code_statistics_and_restarts(tmp_path):
    mp.spawn(vq_head_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for result in ranks:  # each rank uses one code; together two of eight, equally often
        assert result["usage"].item() == 0.25
        assert result["perplexity"].item() == pytest.approx(2.0, rel=1e-5)
    torch.testing.assert_close(ranks[0]["codes"], ranks[1]["codes"])
    assert torch.equal(ranks[0]["codes"][:2], codes_near_each_rank()[:2])
    rank0_rows = rank_batch(0).reshape(-1, 4)
    assert all((rank0_rows == code).all(dim=1).any() for code in ranks[0]["codes"][2:])


def test_bf16_autocast_keeps_losses_in_fp32():
    stack, prefix_proj = build_stack("vq_refiner", LM)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stack(torch.randn(2, TOKENS, IN))
        losses = stack.auxiliary_losses(out, torch.randn(2, TOKENS, LAT), prefix_proj)
    assert out.latents_or_prefix.dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 for v in losses.values())


def test_importing_the_heads_leaves_the_vq_families_and_lpips_unloaded():
    # The text scripts import the heads at start-up; the VQ families and LPIPS would add seconds to each.
    import subprocess
    import sys

    code = "import sys, omniflow.models.text_heads; print(sorted(m for m in ('lpips', 'omniflow.models.vq.registry') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"

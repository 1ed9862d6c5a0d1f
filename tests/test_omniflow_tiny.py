"""The tiny OmniFlow in the released layout: save/load round trip, the text branch and text VAE APIs in
fp32 and bf16, generation, the sampling pipeline and training support."""
from __future__ import annotations

import copy
import json
import re
import runpy

import pytest
import torch

from omniflow.runtime.hub import local_model_dir
import torch.nn.functional as F
from PIL import Image
from skimage import data

from omniflow.models.omniflow.errors import OmniFlowConfigError
from omniflow.models.omniflow.pipeline import OmniFlowPipeline, StreamInputs
from omniflow.models.omniflow.text_vae import decoder_targets
from omniflow.models.omniflow.tiny import fit_text_decoder, shakespeare_lines
from omniflow.models.omniflow.transformer import OmniFlowTransformer
from omniflow_helpers import tiny_build, tiny_loaded, tiny_saved
from runtime_helpers import REPO

TEXTS = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate.", ""]


def _inputs(transformer, batch: int, dtype: torch.dtype, seed: int = 0) -> dict:
    """Random transformer inputs: image and text noisy, audio absent (t = 1000)."""
    g = torch.Generator().manual_seed(seed)
    cfg = transformer.config
    rows = F.pad(torch.randn(batch, 32, 64, generator=g), (0, cfg.joint_attention_dim - 64))
    return dict(
        hidden_states=torch.randn(batch, cfg.in_channels, 8, 8, generator=g).to(dtype),
        encoder_hidden_states=rows.to(dtype),
        pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, generator=g).to(dtype),
        timestep=torch.tensor([0.0, 500.0][:batch]),
        timestep_text=torch.tensor([700.0, 250.0][:batch]),
        timestep_audio=torch.full((batch,), 1000.0),
        audio_hidden_states=torch.randn(batch, 8, 256, 16, generator=g).to(dtype),
    )


def test_folder_has_the_released_layout():
    paths = tiny_saved()
    root = paths.model_path
    for rel in ("transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                "transformer/ema_transformer.pt", "text_vae/config.json", "vae/config.json",
                "scheduler/scheduler_config.json", "text_encoder_2/config.json", "tokenizer_2/tokenizer.json",
                "vae_tokenizer/tokenizer.json"):
        assert (root / rel).is_file(), rel
    for hub_id in ("google/flan-t5-large", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"):
        assert (local_model_dir(hub_id, paths.models_dir) / "config.json").is_file(), hub_id
    tokenizer = tiny_loaded().vae_tokenizer
    assert tokenizer.pad_token == "[PAD]" and len(tokenizer) == tiny_loaded().text_vae.config.vocab_size


def test_loaded_model_generates_the_same_tokens_as_before_saving():
    latents = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(3))
    before = tiny_build().text_vae.generate(latents=latents, max_new_tokens=12)
    after = tiny_loaded().text_vae.generate(latents=latents, max_new_tokens=12)
    assert before.shape[0] == 2 and torch.equal(before, after)
    inputs = _inputs(tiny_build().transformer, 2, torch.float32)
    with torch.no_grad():
        assert torch.equal(tiny_build().transformer(**inputs).text_x0, tiny_loaded().transformer(**inputs).text_x0)


def test_loaded_components_are_frozen_and_in_eval():
    loaded = tiny_loaded()
    for name in ("transformer", "text_vae", "vae", "clip_vision", "clip_text", "clip_text_2"):
        module = getattr(loaded, name)
        assert not module.training, name
        assert not any(p.requires_grad for p in module.parameters()), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_branch_x0_prediction(dtype):
    transformer = tiny_loaded(dtype).transformer
    inputs = _inputs(transformer, 2, dtype)
    with torch.no_grad():
        first, second = transformer(**inputs), transformer(**inputs)
    assert first.text_x0.shape == (2, 32, 64) and first.text_x0.dtype == dtype
    assert first.text_hidden.shape == (2, 32, transformer.config.joint_attention_dim)
    assert torch.isfinite(first.text_x0.float()).all()
    assert torch.equal(first.text_x0, second.text_x0)
    # text_x0 is text_output applied to text_hidden: the contract a replacement head relies on
    torch.testing.assert_close(first.text_x0, transformer.text_output(first.text_hidden))
    # each modality's timestep matters
    with torch.no_grad():
        moved = transformer(**{**inputs, "timestep_text": torch.tensor([10.0, 990.0])})
    assert not torch.equal(moved.text_x0, first.text_x0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_text_vae_round_trip(dtype):
    text_vae = tiny_loaded(dtype).text_vae
    with torch.no_grad():
        latents = text_vae.encode(TEXTS)
        again = text_vae.encode(TEXTS)
    assert latents.shape == (3, 32, 64) and latents.dtype == dtype and torch.equal(latents, again)
    assert not torch.equal(latents[0], latents[1]) and not torch.equal(latents[0], latents[2])
    tokens = text_vae.generate(latents=latents, max_new_tokens=10)
    assert tokens.dtype == torch.long and tokens.shape[0] == 3 and tokens.shape[1] <= 10
    assert torch.equal(tokens, text_vae.generate(latents=latents, max_new_tokens=10))
    targets = decoder_targets(tiny_loaded().vae_tokenizer, TEXTS)
    with torch.no_grad():
        logits = text_vae.decode_logits(targets["input_ids"], latents=latents, attention_mask=targets["attention_mask"])
    assert logits.shape == (*targets["input_ids"].shape, text_vae.config.vocab_size) and logits.dtype == torch.float32


def test_sampled_encoding_adds_small_uniform_noise():
    text_vae = tiny_loaded().text_vae
    with torch.no_grad():
        mean = text_vae.encode(TEXTS[:2])
        noisy = text_vae.encode(TEXTS[:2], sample=True, generator=torch.Generator().manual_seed(0))
    diff = noisy - mean
    assert diff.min() >= 0 and 0 < diff.max() < 1e-3


def test_decoder_targets_and_masked_loss():
    tokenizer, text_vae = tiny_loaded().vae_tokenizer, tiny_loaded().text_vae
    targets = decoder_targets(tokenizer, TEXTS[:2])
    ids, mask, labels = targets["input_ids"], targets["attention_mask"], targets["labels"]
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    short = int(mask[1].sum())
    assert ids[1, short - 1] == tokenizer.eos_token_id and (labels[1, short:] == -100).all()
    assert (ids[1, short:] == tokenizer.pad_token_id).all()
    latents = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        padded = text_vae.decode_logits(ids, latents=latents, attention_mask=mask)
        alone = text_vae.decode_logits(ids[1:, :short], latents=latents[1:])
    torch.testing.assert_close(padded[1:, :short], alone, atol=1e-5, rtol=1e-4)  # padding does not leak
    assert decoder_targets(tokenizer, ["word " * 200], max_length=16)["input_ids"].shape == (1, 16)


def test_prefix_can_be_given_in_lm_width():
    text_vae = tiny_loaded().text_vae
    latents = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1))
    ids = torch.tensor([[1, 50, 60, 2], [1, 70, 80, 90]])
    with torch.no_grad():
        embeds = text_vae.prefix_embeds(latents)
        assert embeds.shape == (2, 32, text_vae.hidden_size)
        torch.testing.assert_close(text_vae.decode_logits(ids, prefix_embeds=embeds),
                                   text_vae.decode_logits(ids, latents=latents))
    assert torch.equal(text_vae.generate(prefix_embeds=embeds, max_new_tokens=6),
                       text_vae.generate(latents=latents, max_new_tokens=6))
    with pytest.raises(ValueError, match="vae_dim=64"):
        text_vae.decode_logits(ids, latents=embeds)
    with pytest.raises(ValueError, match="exactly one"):
        text_vae.decode_logits(ids, latents=latents, prefix_embeds=embeds)


def test_beam_search_finds_the_best_two_token_continuation():
    """With as many beams as tokens, two steps of beam search are exhaustive."""
    text_vae = tiny_loaded().text_vae
    latents = torch.randn(1, 32, 64, generator=torch.Generator().manual_seed(5))
    greedy = text_vae.generate(latents=latents, max_new_tokens=2)
    assert torch.equal(text_vae.generate(latents=latents, max_new_tokens=2, num_beams=1), greedy)
    vocab, eos = text_vae.config.vocab_size, text_vae.eos_token_id
    beam = text_vae.generate(latents=latents, max_new_tokens=2, num_beams=vocab, length_penalty=0.0)
    firsts = torch.arange(vocab)[:, None]
    with torch.no_grad():
        logp = F.log_softmax(
            text_vae.decode_logits(torch.cat([torch.ones_like(firsts), firsts], 1), latents=latents.expand(vocab, -1, -1)),
            dim=-1,
        )
    first = logp[0, 0]  # every row's first position predicts the first token from BOS
    totals = first[:, None] + logp[:, 1, :]
    totals[eos] = float("-inf")
    totals[eos, eos] = first[eos]  # a sequence that ends at once scores its EOS alone
    best = divmod(int(totals.flatten().argmax()), vocab)
    assert tuple(beam[0].tolist()) == best


def _pipeline(dtype=torch.float32) -> OmniFlowPipeline:
    return OmniFlowPipeline(tiny_loaded(dtype))


def _images():
    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())]


def test_image_to_text_is_deterministic_and_uses_the_image():
    pipe = _pipeline()
    run = lambda images, seed=0: pipe.image_to_text(images, num_inference_steps=3, max_new_tokens=8,
                                                     generator=torch.Generator().manual_seed(seed))
    first = run(_images())
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert first == run(_images())
    latents, pooled = pipe.encode_images(_images(), generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 16, 8, 8) and pooled.shape == (2, 32) and (pooled[:, 16:] == 0).all()


def test_sampler_uses_a_replacement_x0_predictor_and_prefix():
    pipe = _pipeline()
    batch = 2
    image, image_t = pipe.absent_image(batch, torch.Generator().manual_seed(0))
    audio, audio_t = pipe.absent_audio(batch, torch.Generator().manual_seed(0))
    cond = StreamInputs(image, image_t, audio, audio_t, pipe.zero_pooled(batch))
    calls = []

    def head(output):
        calls.append(output.text_hidden.shape)
        return torch.zeros_like(output.text_x0)

    sample = pipe.sample_text_latents(cond, num_inference_steps=3, x0_fn=head,
                                      generator=torch.Generator().manual_seed(0))
    assert calls == [(batch, 32, 128)] * 3
    assert sample.latents.abs().max() < 1e-5  # x0 = 0 at every step lands on 0
    assert sample.output.text_hidden.shape == (batch, 32, 128)
    default = pipe.sample_text_latents(cond, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(default.latents, default.output.text_x0.float(), atol=1e-5, rtol=1e-4)
    width = pipe.text_vae.hidden_size
    texts = pipe.image_to_text(_images(), num_inference_steps=2, max_new_tokens=5,
                               prefix_fn=lambda out: torch.zeros(*out.text_hidden.shape[:2], width))
    assert texts[0] == texts[1]  # the same all-zero LM prefix for both images


def test_classifier_free_guidance_mixes_branches():
    pipe = _pipeline()
    batch = 1
    image, image_t = pipe.absent_image(batch, torch.Generator().manual_seed(0))
    audio, audio_t = pipe.absent_audio(batch, torch.Generator().manual_seed(0))
    pooled = torch.randn(batch, 32, generator=torch.Generator().manual_seed(1))
    cond = StreamInputs(image, image_t, audio, audio_t, pooled)
    uncond = StreamInputs(image, image_t, audio, audio_t, pipe.zero_pooled(batch))
    run = lambda scale: pipe.sample_text_latents(cond, uncond, guidance_scale=scale, num_inference_steps=2,
                                                 generator=torch.Generator().manual_seed(2)).latents
    plain, guided = run(1.0), run(3.0)
    assert torch.equal(plain, pipe.sample_text_latents(cond, num_inference_steps=2,
                                                       generator=torch.Generator().manual_seed(2)).latents)
    assert not torch.allclose(plain, guided)


def test_text_to_text_and_audio_to_text():
    pipe = _pipeline()
    roundtrip = pipe.text_to_text(TEXTS[:2], strength=0.0, max_new_tokens=8)
    assert roundtrip == pipe.decode(pipe.text_vae.encode(TEXTS[:2]), max_new_tokens=8)
    rewritten = pipe.text_to_text(TEXTS[:2], strength=0.5, num_inference_steps=4, max_new_tokens=8,
                                  generator=torch.Generator().manual_seed(0))
    assert len(rewritten) == 2
    guided = pipe.text_to_text(TEXTS[:1], strength=1.0, guidance_scale=2.0, num_inference_steps=2, max_new_tokens=4)
    assert len(guided) == 1
    captions = pipe.audio_to_text(torch.randn(1, 8, 256, 16), torch.randn(1, 12), num_inference_steps=2,
                                  max_new_tokens=4, num_beams=2)
    assert len(captions) == 1


def test_text_to_text_without_clip_refuses_full_strength():
    components = copy.copy(tiny_loaded())
    components.clip_text = None
    with pytest.raises(ValueError, match="clip_text"):
        OmniFlowPipeline(components).text_to_text(TEXTS[:1], strength=1.0)


def test_bf16_pipeline_runs():
    texts = _pipeline(torch.bfloat16).image_to_text(_images()[:1], num_inference_steps=2, max_new_tokens=4)
    assert len(texts) == 1


def _train_step(transformer, checkpointing: bool):
    transformer.train().requires_grad_(True)
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()
    inputs = _inputs(transformer, 2, next(transformer.parameters()).dtype, seed=4)
    out = transformer(**inputs)
    loss = out.text_x0.float().pow(2).mean() + out.image.float().pow(2).mean() + out.audio.float().pow(2).mean()
    transformer.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_gradients():
    transformer = copy.deepcopy(tiny_build().transformer)
    loss, grads = _train_step(transformer, checkpointing=False)
    loss_ckpt, grads_ckpt = _train_step(transformer, checkpointing=True)
    assert torch.equal(loss, loss_ckpt) and grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)
    unused = {n for n, _ in transformer.named_parameters()} - grads.keys()
    assert all(".ff_context." in n for n in unused)  # the last block's text feed-forward is never used


def test_bf16_training_step():
    transformer = copy.deepcopy(tiny_build().transformer).to(torch.bfloat16)
    loss, grads = _train_step(transformer, checkpointing=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g.float()).all() for g in grads.values())
    text_vae = copy.deepcopy(tiny_build().text_vae).to(torch.bfloat16).requires_grad_(False)
    text_vae.enable_gradient_checkpointing()
    text_vae.model.train()
    assert all(layer.gradient_checkpointing for layer in text_vae.model.layers)
    head = torch.nn.Linear(128, 64).to(torch.bfloat16)
    prefix = head(torch.randn(2, 32, 128).to(torch.bfloat16))
    targets = decoder_targets(tiny_build().vae_tokenizer, shakespeare_lines(400)[:2])
    logits = text_vae.decode_logits(targets["input_ids"], latents=prefix, attention_mask=targets["attention_mask"])
    F.cross_entropy(logits[:, :-1].flatten(0, 1), targets["labels"][:, 1:].flatten(), ignore_index=-100).backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad.float()).all()



@pytest.mark.parametrize("qk_norm", ["rms_norm", None])
def test_other_qk_norms_build_and_run(qk_norm):
    config = {**tiny_build().transformer.config, "qk_norm": qk_norm}
    transformer = OmniFlowTransformer.from_transformer_config(config, 64).eval()
    names = {n for n, _ in transformer.named_parameters()}
    assert ("transformer_blocks.0.attn.norm_added_q.weight" in names) == (qk_norm == "rms_norm")
    assert ("transformer_blocks.0.attn.norm_q.weight" in names) == (qk_norm is not None)
    with torch.no_grad():
        out = transformer(**_inputs(transformer, 2, torch.float32), drop_image=True)
    assert out.image is None and out.text_x0.shape == (2, 32, 64) and out.audio.shape == (2, 8, 256, 16)


def test_unsupported_transformer_configs_are_rejected():
    config = dict(tiny_build().transformer.config)
    with pytest.raises(OmniFlowConfigError, match="use_audio_mae=True is not supported"):
        OmniFlowTransformer.from_transformer_config({**config, "use_audio_mae": True})
    with pytest.raises(OmniFlowConfigError, match="caption_projection_dim=48 must equal"):
        OmniFlowTransformer.from_transformer_config({**config, "caption_projection_dim": 48})


def test_scheduler_noise_and_training_timesteps():
    scheduler = tiny_loaded().scheduler
    x0, noise = torch.ones(2, 3), torch.zeros(2, 3)
    noised = scheduler.add_noise(x0, noise, torch.tensor([0.25, 1.0]))
    assert torch.equal(noised, torch.tensor([[0.75] * 3, [0.0] * 3]))
    draw = lambda: scheduler.sample_train_timesteps(64, torch.Generator().manual_seed(0))
    timesteps = draw()
    assert torch.equal(timesteps, draw()) and timesteps.shape == (64,)
    assert set(timesteps.tolist()) <= set(scheduler.train_table(shift=1.0)[0].tolist())


def test_tiny_qformer_gives_each_text_its_own_latent():
    # At BLIP-2's init std (0.02, the released default) the queries pass through almost unchanged and all
    # texts share one latent; the tiny config draws the Q-Former at 0.5 so that latents follow the text.
    vae = tiny_build().text_vae
    assert vae.qformer.config.initializer_range == 0.5
    with torch.no_grad():
        latents = vae.encode(TEXTS[:2])
    assert (latents[0] - latents[1]).std() > 0.3 * latents.std()
    released = copy.deepcopy(vae.config)
    released.vae_config = {k: v for k, v in released.vae_config.items() if k != "qformer_initializer_range"}
    assert type(vae)(released).qformer.config.initializer_range == 0.02


def test_fitted_decoder_reads_texts_back_from_their_latents():
    vae = copy.deepcopy(tiny_build().text_vae)
    tokenizer = tiny_build().vae_tokenizer
    texts = shakespeare_lines()[10:16]
    assert fit_text_decoder(vae, tokenizer, texts, steps=0) == 0.0  # measured only: the random decoder
    assert fit_text_decoder(vae, tokenizer, texts, steps=150) >= 0.5


def test_vae_posterior_is_narrow_as_a_trained_one():
    pipe = _pipeline()
    draws = [pipe.encode_images(_images(), generator=torch.Generator().manual_seed(seed))[0] for seed in (0, 1)]
    assert (draws[0] - draws[1]).std() < 0.05 * draws[0].std()  # a random encoder's std: about 3x the means' spread


def _caption_separation(pipe: OmniFlowPipeline, images: list, captions: list[str]) -> float:
    """How much nearer the text_output's x0 from pure noise (sigma = 1) lies to its own image's caption latent
    than to the other's, in units of the distance between the two caption latents (0: the image is ignored)."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        latents, pooled = pipe.encode_images(images, generator)
        target = pipe.text_vae.encode(captions).float()
        audio, audio_t = pipe.absent_audio(2, generator)
        x0 = pipe.transformer(
            hidden_states=latents, encoder_hidden_states=pipe.pad_text(torch.randn(target.shape, generator=generator)),
            pooled_projections=pooled, timestep=torch.zeros(2), timestep_text=torch.full((2,), 1000.0),
            timestep_audio=audio_t, audio_hidden_states=audio).text_x0
    own, other = (x0 - target).norm(dim=(1, 2)), (x0 - target.flip(0)).norm(dim=(1, 2))
    return float(((other - own) / (target[0] - target[1]).norm()).mean())


@pytest.mark.slow
def test_pretraining_makes_the_text_stream_carry_the_image(tmp_path, capsys):
    """make_tiny_omniflow.py --pretrain_on: the transformer learns OmniFlow's image->text flow objective, so that
    from pure noise its text_output tells the two photos apart (measured: random 0.01; 0.45, 0.79, 0.87 after
    60, 100, 120 steps)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    captions = ["Color image of the astronaut Eileen Collins.", "Chelsea the cat."]
    for name, image, caption in zip(("astronaut", "chelsea"), _images(), captions):
        image.resize((64, 64)).save(photos / f"{name}.png")
    (photos / "train.jsonl").write_text("".join(
        json.dumps({"id": name, "image": f"{name}.png", "references": [caption]}) + "\n"
        for name, caption in zip(("astronaut", "chelsea"), captions)))
    images = [Image.open(photos / f"{name}.png") for name in ("astronaut", "chelsea")]
    assert abs(_caption_separation(_pipeline(), images, captions)) < 0.2

    script = runpy.run_path(str(REPO / "scripts" / "make_tiny_omniflow.py"), run_name="test")
    script["main"](["--output_dir", str(tmp_path / "out"), "--pretrain_on", str(photos / "train.jsonl"),
                    "--pretrain_steps", "100"])
    first, last = map(float, re.search(r"flow loss ([\d.]+) -> ([\d.]+)", capsys.readouterr().out).groups())
    assert last < 0.5 * first
    out = tmp_path / "out"
    pipe = OmniFlowPipeline.from_pretrained(out / "OmniFlow-tiny", models_dir=out / "models", dtype=torch.float32)
    assert _caption_separation(pipe, images, captions) > 0.5

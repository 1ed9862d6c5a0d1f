"""Parity with the public reference: the tiny reference checkpoint loads strictly and our modules reproduce
every golden output: fp32 within atol 1e-5 / rtol 1e-4, except the text decoder's final hidden states and
logits, compared within their measured float32 noise (see omniflow_helpers.ATOL, parity_helpers)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from torch import nn
from transformers import LlamaConfig, T5Config, T5EncoderModel

from omniflow.models.omniflow.checkpoint import omniflow_state_dict, open_weights, weight_files
from omniflow.models.omniflow.scheduler import FlowMatchEulerScheduler
from omniflow.models.omniflow.text_vae import OmniFlowTextVAE
from omniflow.models.omniflow.transformer import OmniFlowTransformer
from omniflow_helpers import (
    FIXTURES,
    REFERENCE_DIR,
    TINY_RELEASE,
    assert_close,
    golden_meta,
    load_goldens,
    reference_models,
)
from parity_helpers import assert_within_fp32_noise

REPO = FIXTURES.parents[2]


@pytest.fixture(scope="module")
def models():
    transformer, text_vae, report = reference_models()
    return transformer, text_vae, report


@pytest.fixture(scope="module")
def models64(models):
    """Float64 copies of (transformer, text VAE)."""
    transformer, text_vae, _ = models
    return nn.ModuleList([copy.deepcopy(transformer), copy.deepcopy(text_vae)]).double()


@pytest.fixture(scope="module")
def goldens():
    return load_goldens("golden_forward")


def test_strict_load_reads_every_key(models):
    *_, report = models
    assert report.loaded == 359 and report.encoder_keys_loaded == 22 and not report.skipped_unused_keys
    _, _, without_t5 = reference_models(with_t5=False)
    assert without_t5.loaded == 337 and without_t5.skipped_encoder_keys == 22


def test_state_dict_order_and_shapes_match_release(models):
    transformer, text_vae, _ = models
    listed = [line.split("\t") for line in (FIXTURES / "keys.txt").read_text().splitlines() if not line.startswith("#")]
    ours = omniflow_state_dict(transformer, text_vae)
    assert [k for k, *_ in listed] == list(ours), "state-dict order differs (EMA files are positional)"
    assert all(json.loads(shape) == list(ours[k].shape) for k, shape, _ in listed)


def _call(model: OmniFlowTransformer, goldens: dict, case: str, spec: dict):
    args = {a: goldens[f"{case}/in/{a}"] for a in spec["tensor_args"] if not a.startswith(("decode_", "target_"))}
    flags = {k: spec[k] for k in ("use_text_output", "split_cond", "drop_audio") if k in spec}
    with torch.no_grad():
        out = model(**args, **flags)
    text = out.text_x0 if out.text_x0 is not None else out.text_stream
    return out, {"output": out.image, "model_pred_text": out.text_x0, "encoder_hidden_states": text,
                 "audio_hidden_states": out.audio}


def _decode_logits(text_vae: OmniFlowTextVAE, inputs: dict) -> dict:
    """The decode case's text stage, fed the golden text x0 (so the transformer's error does not compound)."""
    ids = inputs["decode/in/decode_target_input_ids"]
    with torch.no_grad():
        return {"decode/out/logits": text_vae.decode_logits(ids, latents=inputs["decode/out/model_pred_text"]),
                "decode/out/logits_labels": text_vae.decode_logits(
                    ids, latents=inputs["decode/in/target_prompt_embeds"][..., :64])}


@pytest.mark.parametrize("case", list(golden_meta()["transformer_cases"]))
def test_transformer_matches_golden(models, models64, goldens, case):
    spec = golden_meta()["transformer_cases"][case]
    transformer, text_vae, _ = models
    out, results = _call(models64[0] if case.endswith("_f64") else transformer, goldens, case, spec)
    for name in spec["outputs"]:
        if name in results:
            assert_close(results[name], goldens[f"{case}/out/{name}"], f"{case}/{name}")
    for name in spec["outputs_none"]:
        assert results.get(name) is None, f"{case}/{name} should be None"
    if spec.get("decode_text"):
        inputs = {k: goldens[k] for k in ("decode/in/decode_target_input_ids", "decode/out/model_pred_text",
                                          "decode/in/target_prompt_embeds")}
        logits = {k: goldens[k] for k in ("decode/out/logits", "decode/out/logits_labels")}
        assert_within_fp32_noise(_decode_logits, text_vae, models64[1], inputs, logits)


def test_transformer_intermediates_match_golden(models, goldens):
    """Every main/mid/* module output, so a divergence is located, not only detected."""
    transformer, _, _ = models
    captured = {}
    modules = dict(transformer.named_modules())
    names = {key.split("/")[-1].split("[")[0] for key in goldens if key.startswith("main/mid/")}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(n, o)) for n in names]
    try:
        _call(transformer, goldens, "main", golden_meta()["transformer_cases"]["main"])
    finally:
        for hook in hooks:
            hook.remove()
    for key, expected in goldens.items():
        if not key.startswith("main/mid/"):
            continue
        name = key.split("/")[-1]
        if "[" in name:  # block outputs: golden order (text, image, audio); ours (image, text, audio)
            block, index = name[:-3], int(name[-2])
            actual = captured[block][(1, 0, 2)[index]]
        else:
            actual = captured[name]
        assert_close(actual, expected, key)


def _teacher_forced(text_vae: OmniFlowTextVAE, inputs: dict) -> dict:
    captured = {}
    hooks = [
        text_vae.input_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("tf/mid/input_proj", o)),
        text_vae.model.norm.register_forward_hook(lambda m, i, o: captured.__setitem__("tf/mid/model.norm", o)),
    ]
    try:
        with torch.no_grad():
            logits = text_vae.decode_logits(inputs["tf/in/input_ids"], latents=inputs["tf/in/latents"])
    finally:
        for hook in hooks:
            hook.remove()
    return {"tf/out/logits": logits, **captured}


def _check_teacher_forced(g: dict, text_vae: OmniFlowTextVAE, text_vae64: OmniFlowTextVAE) -> dict:
    inputs = {k: g[k] for k in ("tf/in/input_ids", "tf/in/latents")}
    return assert_within_fp32_noise(_teacher_forced, text_vae, text_vae64, inputs,
                                    {k: g[k] for k in ("tf/out/logits", "tf/mid/model.norm")})


def test_text_vae_matches_golden(models, models64):
    _, text_vae, _ = models
    g = load_goldens("golden_text_vae")
    ours = _check_teacher_forced(g, text_vae, models64[1])
    assert_close(ours["tf/mid/input_proj"], g["tf/mid/input_proj"], "tf/mid/input_proj")
    logits = ours["tf/out/logits"]
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), g["tf/in/labels"][:, 1:].flatten(), ignore_index=-100)
    assert_close(loss, g["tf/out/loss"], "tf/loss")
    with torch.no_grad():
        logits64 = models64[1].decode_logits(g["tf/in/input_ids"], latents=g["tf_f64/in/latents"])
    assert logits64.dtype == torch.float32  # logits are returned in fp32, as released
    assert_close(logits64, g["tf_f64/out/logits"], "tf_f64/logits")


def _scale_attention_output(text_vae):
    with torch.no_grad():
        text_vae.model.layers[0].self_attn.o_proj.weight.mul_(1.01)


def _final_norm_eps_x10(text_vae):
    text_vae.model.norm.variance_epsilon *= 10


TEXT_VAE_DEFECTS = {"layer 0 attention output weight x1.01": _scale_attention_output,
                    "final RMSNorm eps x10": _final_norm_eps_x10}


@pytest.mark.parametrize("defect", TEXT_VAE_DEFECTS.values(), ids=TEXT_VAE_DEFECTS)
def test_text_vae_check_rejects_a_small_defect(models, defect):
    """Negative control: the float32-noise check fails on a slightly wrong text decoder."""
    broken = copy.deepcopy(models[1])
    defect(broken)
    with pytest.raises(AssertionError, match="tf/out/logits: golden vs our float64"):
        _check_teacher_forced(load_goldens("golden_text_vae"), broken, copy.deepcopy(broken).double())


def test_text_vae_encoder_matches_golden(models):
    _, text_vae, _ = models
    g = load_goldens("golden_text_vae")
    prompts = golden_meta()["text_vae_cases"]["enc"]["prompts"]
    captured = {}
    hooks = [
        text_vae.encoder.register_forward_hook(lambda m, i, o: captured.__setitem__("encoder", o.last_hidden_state)),
        text_vae.qformer.register_forward_hook(
            lambda m, a, k, o: captured.update(qformer=o.last_hidden_state, qin=k["encoder_hidden_states"]),
            with_kwargs=True,
        ),
        text_vae.q_norm.register_forward_hook(lambda m, i, o: captured.__setitem__("q_norm", o)),
        text_vae.vae_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("vae_proj", o)),
    ]
    with torch.no_grad():
        latents = text_vae.encode(prompts, t5_input_ids=g["enc/in/t5_input_ids"])
    for hook in hooks:
        hook.remove()
    assert_close(latents, g["enc/out/latents_mean"], "enc/latents_mean")
    assert_close(captured["encoder"], g["enc/mid/encoder.last_hidden_state"], "enc/mid/encoder")
    assert_close(captured["qin"], g["enc/mid/qformer_encoder_hidden_states"], "enc/mid/qformer input")
    assert_close(captured["qformer"], g["enc/mid/qformer.last_hidden_state"], "enc/mid/qformer")
    assert_close(captured["q_norm"], g["enc/mid/q_norm"], "enc/mid/q_norm")
    assert_close(captured["vae_proj"], g["enc/mid/vae_proj"], "enc/mid/vae_proj")


def test_greedy_generation_matches_golden(models):
    _, text_vae, _ = models
    g = load_goldens("golden_text_vae")
    tokens = text_vae.generate(latents=g["gen/in/latents"], max_new_tokens=8)
    assert torch.equal(tokens, g["gen/out/new_tokens"])
    assert torch.equal(g["gen/out/sequences"][:, 33:], tokens)  # the reference prepends 33 placeholder ids


def test_scheduler_matches_golden(goldens):
    scheduler = FlowMatchEulerScheduler.from_pretrained(TINY_RELEASE, subfolder="scheduler")
    timesteps, sigmas = scheduler.train_table()
    assert_close(timesteps, goldens["sched_train_shift3/timesteps"], "train timesteps")
    assert_close(sigmas, goldens["sched_train_shift3/sigmas"], "train sigmas")
    assert_close(scheduler.train_table(shift=1.0)[1][:5], goldens["sched_train_shift1/sigmas_first5"], "shift 1")
    scheduler.set_timesteps(4)
    assert_close(scheduler.timesteps, goldens["sched_infer4/timesteps"], "infer timesteps")
    assert_close(scheduler.sigmas, goldens["sched_infer4/sigmas"], "infer sigmas")
    sample, x0 = goldens["sched_step/in/sample"], goldens["sched_step/in/x0"]
    assert scheduler.timesteps[0] == goldens["sched_step/in/t"]
    velocity = scheduler.velocity_from_x0(sample, x0, scheduler.sigmas[0])
    assert_close(velocity, goldens["sched_step/out/get_eps"], "get_eps")
    assert_close(scheduler.step(velocity, 0, sample), goldens["sched_step/out/prev_sample"], "step")


def test_pickle_checkpoint_loads_like_safetensors(tmp_path, models):
    """The released format (a torch pickle) goes through the same strict loader, read weights-only."""
    transformer, text_vae, _ = models
    folder = tmp_path / "transformer"
    folder.mkdir()
    (folder / "config.json").write_text((TINY_RELEASE / "transformer" / "config.json").read_text())
    torch.save(omniflow_state_dict(transformer, text_vae), folder / "diffusion_pytorch_model.bin")
    transformer_2, text_vae_2, report = reference_models(folder=folder)
    assert report.files[0].endswith(".bin") and report.loaded == 359
    for key, value in omniflow_state_dict(transformer_2, text_vae_2).items():
        assert torch.equal(value, omniflow_state_dict(transformer, text_vae)[key]), key


@pytest.mark.skipif(not (REFERENCE_DIR / "tiny_release").is_dir(), reason="shared reference folder not present")
def test_original_reference_bin_loads_and_equals_fixture(models):
    transformer, text_vae, _ = models
    ours = omniflow_state_dict(transformer, text_vae)
    _, _, report = reference_models(folder=REFERENCE_DIR / "tiny_release" / "transformer")
    assert report.loaded == 359
    with open_weights(weight_files(REFERENCE_DIR / "tiny_release" / "transformer")[0]) as lazy:
        assert list(lazy) == list(ours)
        assert all(torch.equal(lazy[k].load(), ours[k]) for k in ours)


def test_full_size_key_list_matches_assumed_release():
    """The release-sized model (built on the meta device) has the reference's key names and shapes."""
    configs = REPO / "configs" / "omniflow_v05"
    with init_empty_weights():
        transformer = OmniFlowTransformer.from_transformer_config(
            OmniFlowTransformer.load_config(configs / "transformer.json"), 64
        )
        text_vae = OmniFlowTextVAE(LlamaConfig.from_json_file(configs / "text_vae.json"))
        text_vae.attach_encoder(T5EncoderModel(T5Config.from_json_file(configs / "flan_t5_large_encoder.json")))
    listed = [line.split("\t") for line in (FIXTURES / "release_keys_assumed.txt").read_text().splitlines()
              if not line.startswith("#")]
    ours = {k: list(v.shape) for k, v in omniflow_state_dict(transformer, text_vae).items()}
    assert {k: json.loads(shape) for k, shape, _ in listed} == ours

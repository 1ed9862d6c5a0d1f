"""FLOAT modules: configuration, released key names, exports, attention window and the fixes
to the public code (emotion labels for a batch, kept batch axis, any dim_w / input size)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Wav2Vec2Model

from float_helpers import AUDIO_DIR, RELEASE_KEYS, TINY_CHECKPOINT, tiny_config
from omniflow.flow import ConditionDropout, GuidanceScales, RectifiedFlow
from omniflow.models.float import (FLOAT, AudioEncoder, AudioFeatureError, CheckpointMismatchError, EmotionEncoder,
                                   FloatConfig, FloatConfigError, FlowMatchingTransformer, FMTShapeError,
                                   MotionAutoEncoder, release_backbone_configs)

SEED_FIELDS = {"input_size": 512, "dim_w": 512, "dim_h": 1024, "dim_a": 512, "dim_e": 7, "dim_m": 20,
               "fmt_depth": 8, "num_heads": 8, "mlp_ratio": 4.0, "num_prev_frames": 10, "sampling_rate": 16000,
               "wav2vec_sec": 2.0, "audio_marcing": 2, "attention_window": 2, "fps": 25.0, "nfe": 10,
               "torchdiffeq_ode_method": "euler", "ode_atol": 1e-5, "ode_rtol": 1e-5, "a_cfg_scale": 2.0,
               "e_cfg_scale": 1.0, "r_cfg_scale": 1.0}


@pytest.fixture(scope="module")
def tiny():
    return FLOAT.from_release(TINY_CHECKPOINT, tiny_config()).eval()


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-zero weights everywhere (the FMT's own init zeroes its gates and output layer)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _fmt_inputs(cfg: FloatConfig, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, p = cfg.window, cfg.num_prev_frames
    r = lambda *shape: torch.randn(*shape, generator=g)
    return dict(t=torch.rand(batch, generator=g), x=r(batch, n, cfg.dim_w), wa=r(batch, n, cfg.dim_a),
                wr=r(batch, cfg.dim_w), we=torch.softmax(r(batch, 1, cfg.dim_e), -1), prev_x=r(batch, p, cfg.dim_w),
                prev_wa=r(batch, p, cfg.dim_a))


# ---- configuration ----------------------------------------------------------------------------

def test_config_has_seed_fields_defaults_and_help():
    config, fields = FloatConfig(), {f.name: f for f in dataclasses.fields(FloatConfig)}
    for name, default in SEED_FIELDS.items():
        assert getattr(config, name) == default, name
    assert all(f.metadata.get("help") for f in fields.values())
    assert config.window == 50 and config.seq_len == 60
    assert config.motion_channel_table() == {4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32}


def test_presets_and_validation():
    tiny = FloatConfig.preset("tiny")
    assert (tiny.window, tiny.seq_len) == (12, 17)
    assert tiny.motion_channel_table() == {4: 64, 8: 64, 16: 64, 32: 64, 64: 32, 128: 16}
    assert FloatConfig.preset("small", fmt_depth=2).fmt_depth == 2
    with torch.device("meta"):
        FLOAT.build(FloatConfig.preset("small"), *release_backbone_configs())
    with pytest.raises(FloatConfigError, match="unknown FLOAT preset"):
        FloatConfig.preset("huge")
    with pytest.raises(FloatConfigError, match="not divisible by num_heads"):
        FloatConfig(dim_h=100).validate()
    with pytest.raises(FloatConfigError, match="unknown FLOAT option"):
        FloatConfig.from_dict({"dim_q": 3})


def test_full_size_model_has_the_released_parameter_names_and_shapes():
    released = {}
    for line in RELEASE_KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, _ = line.split("\t")
            released[name] = tuple(int(s) for s in shape.strip("[]").split(",") if s.strip())
    with torch.device("meta"):
        model = FLOAT.build(FloatConfig(), *release_backbone_configs())
    ours = {k: tuple(v.shape) for k, v in model.release_state_dict().items()}
    assert list(ours) == list(released)
    assert ours == released
    assert round(sum(v.numel() for v in model.parameters()) / 1e6, 1) == 617.5


# ---- exports and partial loading --------------------------------------------------------------

def test_submodules_load_from_release_and_round_trip(tiny, tmp_path):
    cfg = tiny_config()
    parts = {"fmt": FlowMatchingTransformer.from_release(TINY_CHECKPOINT, cfg),
             "motion_autoencoder": MotionAutoEncoder.from_release(TINY_CHECKPOINT, cfg),
             "audio_encoder": AudioEncoder.from_release(TINY_CHECKPOINT, cfg),
             "emotion_encoder": EmotionEncoder.from_release(TINY_CHECKPOINT, cfg)}
    for name, part in parts.items():
        expected = getattr(tiny, name).state_dict()
        folder = part.save_pretrained(tmp_path / name)
        reloaded = type(part).from_pretrained(folder)
        for state in (part.state_dict(), reloaded.state_dict()):
            assert list(state) == list(expected)
            assert all(torch.equal(state[k], expected[k]) for k in expected), name
    with pytest.raises(CheckpointMismatchError, match="model_type 'float_fmt'"):
        MotionAutoEncoder.from_pretrained(tmp_path / "fmt")


def test_full_model_export_round_trip(tiny, tmp_path):
    folder = tiny.save_pretrained(tmp_path / "float")
    reloaded = FLOAT.from_pretrained(folder).eval()
    assert reloaded.config == tiny.config
    for key, value in tiny.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    inputs = _fmt_inputs(tiny.config)
    assert torch.equal(reloaded.fmt(**inputs), tiny.fmt(**inputs))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FLOAT.from_pretrained(folder)


def test_part_missing_from_checkpoint(tmp_path):
    path = tmp_path / "no_fmt.pth"
    torch.save({"motion_autoencoder.enc.fc.0.bias": torch.zeros(32)}, path)
    with pytest.raises(CheckpointMismatchError, match=r"holds no 'fmt\.\*' keys"):
        FlowMatchingTransformer.from_release(path, tiny_config())


# ---- FMT --------------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [1, 2])
def test_attention_reaches_only_the_window(depth):
    cfg = FloatConfig.preset("tiny", fmt_depth=depth, num_prev_frames=4, wav2vec_sec=0.64)  # 4 + 16 frames
    fmt = _randomise(FlowMatchingTransformer(cfg)).eval()
    inputs = _fmt_inputs(cfg)
    base = fmt(**inputs)
    frame, reach = 10, cfg.attention_window * depth  # frame 10 of the 20 (6 of the window)
    moved = dict(inputs, x=inputs["x"].clone())
    moved["x"][:, frame - cfg.num_prev_frames] += 1.0
    changed = (fmt(**moved) - base).abs().amax(dim=(0, 2)) > 0
    expected = torch.zeros(cfg.seq_len, dtype=torch.bool)
    expected[frame - reach:frame + reach + 1] = True
    assert torch.equal(changed, expected)


def test_fmt_is_deterministic_in_train_mode_and_checks_shapes():
    cfg = FloatConfig.preset("tiny", dim_a=16)  # the audio width no longer has to equal dim_w
    fmt = _randomise(FlowMatchingTransformer(cfg)).train()
    inputs = _fmt_inputs(cfg)
    assert torch.equal(fmt(**inputs), fmt(**inputs))
    with pytest.raises(FMTShapeError, match="expects 17 frames"):
        fmt(**dict(inputs, x=inputs["x"][:, :5]))
    with pytest.raises(FMTShapeError, match="both prev_x and prev_wa"):
        fmt(**dict(inputs, prev_wa=None))


def test_guidance_scales_change_the_velocity():
    cfg = FloatConfig.preset("tiny")
    fmt = _randomise(FlowMatchingTransformer(cfg)).eval()
    inputs = _fmt_inputs(cfg)
    outs = {s: fmt.forward_guided(torch.tensor(0.3), *(inputs[k] for k in ("x", "wa", "wr", "we", "prev_x", "prev_wa")),
                                  GuidanceScales(*s))
            for s in ((1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (1.0, 2.0, 1.0), (1.0, 1.0, 2.0))}
    plain = outs[(1.0, 1.0, 1.0)]
    assert torch.equal(plain, fmt(torch.tensor(0.3), **{k: v for k, v in inputs.items() if k != "t"}))
    for scales, out in outs.items():
        if scales != (1.0, 1.0, 1.0):
            assert (out - plain).abs().max() > 1e-3, scales


def test_training_loss_scores_the_window_and_reaches_trainable_weights():
    cfg = FloatConfig.preset("tiny")
    fmt = FlowMatchingTransformer(cfg)  # fresh init: zero velocity everywhere
    inputs = _fmt_inputs(cfg)
    x1 = inputs.pop("x")
    inputs.pop("t")
    flow, keep_all = RectifiedFlow(velocity_weight=1.0), ConditionDropout.for_float(0.0, 0.0, 0.0, 0.0)
    loss = fmt.training_loss(flow, keep_all, x1, generator=torch.Generator().manual_seed(0), **inputs)
    draw = flow.draw(x1, generator=torch.Generator().manual_seed(0))
    assert torch.isclose(loss.flow, draw.target.pow(2).mean())
    assert torch.isclose(loss.velocity, draw.target.diff(dim=1).pow(2).mean())
    _randomise(fmt)
    fmt.training_loss(flow, ConditionDropout.for_float(), x1, **inputs).total.backward()
    assert fmt.blocks[0].attn.qkv.weight.grad.abs().sum() > 0 and fmt.pos_embed.grad is None


# ---- condition encoders -----------------------------------------------------------------------

def test_emotion_condition_for_a_batch(tiny):
    audio = torch.randn(3, 4000)
    onehot = tiny.emotion_encoder.condition(audio, "Happy")
    assert onehot.shape == (3, 1, 7) and onehot.dtype == torch.float32
    assert torch.equal(onehot[:, 0].argmax(-1), torch.full((3,), 3))
    predicted = tiny.emotion_encoder.condition(audio, "S2E")
    assert predicted.shape == (3, 1, 7) and torch.allclose(predicted.sum(-1), torch.ones(3, 1))
    with pytest.raises(ValueError, match="unknown emotion 'bored'"):
        tiny.emotion_encoder.condition(audio, "bored")


def test_audio_length_and_width_checks(tiny):
    encoder = tiny.audio_encoder
    assert encoder.fit_length(torch.randn(2, 9000), 11).shape == (2, 7040)  # longer audio is cropped
    padded = encoder.fit_length(torch.arange(10.0)[None], 1)
    assert padded.shape == (1, 640) and torch.all(padded[0, 10:] == 9.0)
    assert tiny.num_frames(7000) == 11 and tiny.num_frames(8000) == 13
    with pytest.raises(AudioFeatureError, match="width 384 but the audio projection expects 9216"):
        tiny.audio_condition(torch.randn(1, 7000))  # the tiny wav2vec2 is narrower than the projection
    matched = AudioEncoder(Wav2Vec2Model.from_pretrained(AUDIO_DIR), dim_out=8, feature_dim=12 * 32)
    assert matched(torch.randn(2, 7000), 11).shape == (2, 11, 8)


def test_training_mode_keeps_frozen_parts_in_eval(tiny):
    model = tiny.train()
    try:
        assert not model.audio_encoder.wav2vec2.training and not model.emotion_encoder.wav2vec2_for_emotion.training
        assert not model.motion_autoencoder.training and model.fmt.training
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(n.startswith(("fmt.", "audio_encoder.audio_projection.")) for n in trainable)
        assert "audio_encoder.audio_projection.0.weight" in trainable and "fmt.pos_embed" not in trainable
    finally:
        tiny.eval()


# ---- motion auto-encoder ----------------------------------------------------------------------

def test_small_motion_autoencoder_any_dim_and_size():
    """Fixed defects: the public basis had 512 rows whatever dim_w was, and images under 64 px failed."""
    cfg = FloatConfig(input_size=32, dim_w=24, dim_m=6, motion_channels=8)
    mae = MotionAutoEncoder.from_config(cfg).eval()
    img = torch.randn(2, 3, 32, 32)
    s_r, coeffs, feats = mae.encode(img)
    assert s_r.shape == (2, 24) and coeffs.shape == (2, 6) and [f.shape[-1] for f in feats] == [8, 16, 32]
    q = mae.dec.direction.basis()
    assert torch.allclose(q.T @ q, torch.eye(6), atol=1e-5)
    out = mae(img, img.flip(0))
    assert out["d_hat"].shape == (2, 3, 32, 32) and out["flow"].shape == (2, 32, 32, 2)


def test_decode_keeps_batch_and_time_axes(tiny):
    s_r, r_s, feats = tiny.encode_image(torch.randn(1, 3, 128, 128))
    video = tiny.decode(s_r, feats, torch.zeros(1, 1, tiny.config.dim_w))
    assert video.shape == (1, 1, 3, 128, 128)


def test_batched_rendering_draws_the_frames_of_one_at_a_time(tiny):
    """Frames rendered 3 at a time for 2 portraits are those rendered one by one, up to float32 rounding: both lie
    as close to a float64 rendering (measured on the tiny checkpoint: equal errors within 10%)."""
    import copy

    size, g = tiny.config.input_size, torch.Generator().manual_seed(0)
    with torch.no_grad():
        s_r, _, feats = tiny.encode_image(torch.rand(2, 3, size, size, generator=g) * 2 - 1)
        motion = torch.randn(2, 7, tiny.config.dim_w, generator=g) * 0.1
        one, batched = tiny.decode(s_r, feats, motion, 1), tiny.decode(s_r, feats, motion, 3)
        exact = copy.deepcopy(tiny).double().decode(s_r.double(), [f.double() for f in feats], motion.double(), 1)
    assert batched.shape == one.shape == (2, 7, 3, size, size)
    error_one, error_batched = ((x.double() - exact).abs().max().item() for x in (one, batched))
    assert error_batched <= 2 * error_one + 1e-6, (error_batched, error_one)
    with pytest.raises(ValueError, match="render batch size must be >= 1"):
        tiny.decode(s_r, feats, motion, 0)

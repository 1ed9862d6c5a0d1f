"""Pieces of FLOAT training: the trained-part module, option precedence, EMA, gradient checkpointing."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest
import torch

from float_helpers import TINY_CHECKPOINT, tiny_config
from omniflow.flow import ConditionDropout, RectifiedFlow
from omniflow.models.float import CheckpointMismatchError, FloatConfig, FloatMotionGenerator, read_release_checkpoint
from omniflow.models.float.cli import PresetOptions, parse_float_options
from omniflow.models.float.training import ema_of
from omniflow.runtime.errors import ConfigError
from runtime_helpers import REPO


def _batch(config: FloatConfig, batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)
    p, n = config.num_prev_frames, config.window
    return {"motion": r(batch, n, config.dim_w), "audio": r(batch, n, config.audio_feature_dim),
            "prev_motion": r(batch, p, config.dim_w), "prev_audio": r(batch, p, config.audio_feature_dim),
            "has_prev": torch.tensor([1.0, 0.0, 1.0][:batch]), "reference_motion": r(batch, config.dim_w),
            "emotion": torch.softmax(r(batch, config.dim_e), -1)}


def _loss(model, batch, seed=0):
    flow, dropout = RectifiedFlow(), ConditionDropout({})
    return model(flow, dropout, batch, generator=torch.Generator().manual_seed(seed))["loss"]


def test_generator_loads_the_trained_parts_of_a_release_checkpoint_strictly():
    model = FloatMotionGenerator(tiny_config())
    counts = model.load_release(TINY_CHECKPOINT)
    assert counts == {"motion_autoencoder.": 133, "audio_encoder.wav2vec2.": 211, "audio_encoder.audio_projection.": 4,
                      "emotion_encoder.wav2vec2_for_emotion.": 74, "fmt.": 33}
    state = read_release_checkpoint(TINY_CHECKPOINT)
    assert all(torch.equal(v, state[k]) for k, v in model.release_state_dict().items())
    with pytest.raises(CheckpointMismatchError, match=r"fmt\.blocks\.0\.mlp\.fc1\.bias: file \(192,\) vs model"):
        FloatMotionGenerator(tiny_config(mlp_ratio=2.0)).load_release(TINY_CHECKPOINT)
    state.pop("fmt.c_embedder.bias")
    with pytest.raises(CheckpointMismatchError, match="1 missing: fmt.c_embedder.bias"):
        FloatMotionGenerator(tiny_config()).load_release(state)


def test_windows_at_a_clip_start_ignore_their_previous_frames():
    config = tiny_config()
    model = FloatMotionGenerator(config)
    model.load_release(TINY_CHECKPOINT)
    batch = _batch(config)
    changed = dict(batch, prev_motion=batch["prev_motion"] + 1, prev_audio=batch["prev_audio"] + 1)
    clip_start = {k: v[1:2] for k, v in batch.items()}
    assert torch.equal(_loss(model, clip_start), _loss(model, {k: v[1:2] for k, v in changed.items()}))
    middle = {k: v[:1] for k, v in batch.items()}
    assert not torch.equal(_loss(model, middle), _loss(model, {k: v[:1] for k, v in changed.items()}))


def test_gradient_checkpointing_recomputes_blocks_with_the_same_gradients():
    config = tiny_config()
    model = FloatMotionGenerator(config)
    model.load_release(TINY_CHECKPOINT)
    batch, grads, calls = _batch(config), [], []
    block, forward = model.fmt.blocks[0], model.fmt.blocks[0].forward
    block.forward = lambda *args: calls.append(1) or forward(*args)  # module hooks do not see the recompute
    for recompute in (False, True):
        model.zero_grad()
        model.fmt.gradient_checkpointing = recompute
        _loss(model, batch).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert len(calls) == 3  # once without, twice (forward + recompute) with checkpointing
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


def test_options_apply_preset_then_config_file_then_flags(tmp_path):
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"config": "small", "dim_h": 192, "num_heads": 4, "nfe": 7}))
    _, config = parse_float_options(PresetOptions, FloatConfig, args=["--config-file", str(config_file), "--nfe", "5"])
    assert (config.input_size, config.dim_w, config.dim_h, config.nfe) == (256, 256, 192, 5)
    preset, config = parse_float_options(PresetOptions, FloatConfig,
                                         args=["--config", "tiny", "--config-file", str(config_file)])
    assert (preset.config, config.dim_w, config.dim_h, config.fmt_depth) == ("tiny", 32, 192, 2)
    assert parse_float_options(PresetOptions, FloatConfig, args=["--fmt-depth", "3"])[1].fmt_depth == 3
    with pytest.raises(ConfigError, match="not a FLOAT preset"):
        parse_float_options(PresetOptions, FloatConfig, args=["--config", "huge"])
    with pytest.raises(ConfigError, match="not divisible by num_heads"):
        parse_float_options(PresetOptions, FloatConfig, args=["--dim_h", "100"])


@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("train_rectified_flow", REPO / "scripts" / "train_rectified_flow.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_ema_copies_first_then_averages_with_a_warmed_up_decay():
    model = torch.nn.Linear(2, 1, bias=False)
    ema = ema_of(model, decay=0.95)
    values = [1.0, 3.0, 5.0, 2.0]
    expected = None
    for n, value in enumerate(values):
        model.weight.data.fill_(value)
        ema.update_parameters(model)
        decay = min(0.95, (1 + n) / (10 + n))
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.module.weight[0, 0].item() == pytest.approx(expected, rel=1e-6)
    restored = ema_of(model, decay=0.95)
    restored.load_state_dict(ema.state_dict())
    assert torch.equal(restored.module.weight, ema.module.weight) and int(restored.n_averaged) == len(values)


def test_early_stopping_counts_validations_without_improvement(train_script):
    stopper = train_script.EarlyStopping(patience=2, min_delta=0.1)
    assert [stopper.update(v, s) for s, v in enumerate([1.0, 0.95, 0.85, 0.9])] == [True, False, True, False]
    assert (stopper.best, stopper.best_step, stopper.should_stop) == (0.85, 2, False)
    stopper.update(0.8, 4)
    assert stopper.should_stop
    again = train_script.EarlyStopping(patience=2, min_delta=0.1)
    again.load_state_dict(stopper.state_dict())
    assert again.should_stop and again.best == 0.85

"""Loading the released layout: weight formats, EMA, strictness errors, tokenizer [PAD], the converter."""
from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, LlamaTokenizer

from omniflow.data.text import jsonl_texts
from omniflow.models.omniflow.checkpoint import ema_parameter_names, omniflow_state_dict
from omniflow.models.omniflow.errors import CheckpointError, MissingComponentError, OmniFlowConfigError
from omniflow.models.omniflow.loading import load_omniflow
from omniflow_helpers import FIXTURES, TINY_RELEASE, reference_models, tiny_loaded, tiny_saved

CONVERTER = runpy.run_path(str(FIXTURES.parents[2] / "scripts" / "convert_omniflow_checkpoint.py"), run_name="test")
SHARD_1 = "diffusion_pytorch_model-00001-of-00005.safetensors"


def _state(components) -> dict[str, torch.Tensor]:
    return omniflow_state_dict(components.transformer, components.text_vae)


@pytest.mark.parametrize("weights", ["bin", "sharded"])
def test_weight_formats_load_identically(weights):
    paths = tiny_saved(weights)
    names = {p.name for p in (paths.model_path / "transformer").iterdir()}
    assert ("diffusion_pytorch_model.bin" in names) == (weights == "bin")
    assert ("diffusion_pytorch_model.safetensors.index.json" in names) == (weights == "sharded")
    loaded = load_omniflow(paths.model_path, ("transformer", "text_vae", "text_encoder"),
                           dtype=torch.float32, models_dir=paths.models_dir)
    reference = _state(tiny_loaded())
    assert all(torch.equal(value, reference[key]) for key, value in _state(loaded).items())


def test_ema_weights_replace_the_parameters():
    paths = tiny_saved()
    ema = load_omniflow(paths.model_path, ("transformer", "text_vae", "text_encoder"), dtype=torch.float32,
                        models_dir=paths.models_dir, load_ema=True)
    shadow = torch.load(paths.model_path / "transformer" / "ema_transformer.pt", weights_only=True)["shadow_params"]
    names = ema_parameter_names(ema.transformer, ema.text_vae)
    state, plain = _state(ema), _state(tiny_loaded())
    assert len(names) == len(shadow)
    assert all(torch.equal(state[name], value) for name, value in zip(names, shadow))
    assert not torch.equal(state["proj_out.weight"], plain["proj_out.weight"])


def test_ema_list_of_the_wrong_length_is_rejected(tmp_path):
    paths = tiny_saved()
    root = tmp_path / "OmniFlow"
    shutil.copytree(paths.model_path, root, ignore=shutil.ignore_patterns("vae", "text_encoder_2"))
    state = torch.load(root / "transformer" / "ema_transformer.pt", weights_only=True)
    state["shadow_params"] = state["shadow_params"][:-3]
    torch.save(state, root / "transformer" / "ema_transformer.pt")
    with pytest.raises(CheckpointError, match="307 EMA tensors for 310 model parameters"):
        load_omniflow(root, ("transformer", "text_encoder"), models_dir=paths.models_dir, load_ema=True)
    state["shadow_params"][0] = state["shadow_params"][0][:1]
    torch.save(state, root / "transformer" / "ema_transformer.pt")
    with pytest.raises(CheckpointError, match=r"shadow_params\[0\] has shape .* parameter pos_embed.proj.weight"):
        load_omniflow(root, ("transformer",), load_ema=True)  # without the text VAE only the head of the list is checked


def _copy_reference(tmp_path: Path) -> Path:
    """A copy of the reference folder's transformer/ and text_vae/; returns the transformer folder."""
    folder = tmp_path / "transformer"
    shutil.copytree(TINY_RELEASE / "transformer", folder)
    shutil.copytree(TINY_RELEASE / "text_vae", tmp_path / "text_vae")
    return folder


def _edit_shard(folder: Path, edit) -> None:
    """Applies ``edit(dict)`` to the first shard and keeps the index consistent."""
    tensors = load_file(folder / SHARD_1)
    edit(tensors)
    save_file(tensors, folder / SHARD_1)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != SHARD_1}
    index["weight_map"].update({k: SHARD_1 for k in tensors})
    index_path.write_text(json.dumps(index))


def test_a_renamed_key_is_reported_with_its_file(tmp_path):
    folder = _copy_reference(tmp_path)
    _edit_shard(folder, lambda t: t.__setitem__("pos_embed.proj.weights", t.pop("pos_embed.proj.weight")))
    with pytest.raises(CheckpointError) as err:
        load_omniflow(tmp_path, ("transformer",))
    message = str(err.value)
    assert "1 missing: pos_embed.proj.weight" in message
    assert f"1 unexpected: pos_embed.proj.weights ({SHARD_1})" in message and str(folder) in message


def test_a_wrong_shape_is_reported(tmp_path):
    folder = _copy_reference(tmp_path)
    _edit_shard(folder, lambda t: t.__setitem__("pos_embed.proj.bias", torch.zeros(7)))
    with pytest.raises(CheckpointError, match=r"pos_embed.proj.bias: file \[7\] vs model \[32\]"):
        reference_models(folder=folder)


def test_t5_copy_is_all_or_nothing_and_unused_qformer_keys_are_skipped(tmp_path):
    folder = _copy_reference(tmp_path)
    encoder_key = "text_decoder.encoder.encoder.final_layer_norm.weight"
    unused_key = "text_decoder.qformer.encoder.layer.0.intermediate.dense.weight"
    shard = next(f for f in folder.glob("*.safetensors") if encoder_key in safe_open(f, "pt").keys())
    tensors = load_file(shard)
    del tensors[encoder_key]
    save_file(tensors, shard)
    _edit_shard(folder, lambda t: t.__setitem__(unused_key, torch.zeros(3072, 48)))
    with pytest.raises(CheckpointError, match=f"1 missing: {encoder_key}"):
        reference_models(folder=folder)
    *_, report = reference_models(with_t5=False, folder=folder)  # the copy is skipped without a T5 attached
    assert report.skipped_unused_keys == [unused_key] and report.skipped_encoder_keys == 21


def test_missing_files_are_named(tmp_path):
    (tmp_path / "transformer").mkdir()
    shutil.copy(TINY_RELEASE / "transformer" / "config.json", tmp_path / "transformer")
    with pytest.raises(MissingComponentError, match="no transformer weights in .*transformer"):
        reference_models(folder=tmp_path / "transformer")
    folder = _copy_reference(tmp_path / "copy")
    (folder / SHARD_1).unlink()
    with pytest.raises(MissingComponentError, match="lists shards that do not exist"):
        reference_models(folder=folder)
    with pytest.raises(MissingComponentError, match="download_models.py --models omniflow"):
        load_omniflow(tmp_path / "nowhere")
    with pytest.raises(OmniFlowConfigError, match="unknown OmniFlow components"):
        load_omniflow(TINY_RELEASE, ("transformer", "decoder"))
    with pytest.raises(MissingComponentError, match="vae_tokenizer"):
        load_omniflow(TINY_RELEASE, ("text_vae",))  # the reference tiny folder has no tokenizer
    with pytest.raises(MissingComponentError, match="download_models.py --models t5_large"):
        load_omniflow(tiny_saved().model_path, ("text_encoder",), models_dir=tmp_path)  # offline, not in models_dir


def test_decoder_tokenizer_gets_pad_and_must_fit_the_vocab(tmp_path):
    source = tiny_saved().model_path
    root = tmp_path / "OmniFlow"
    root.mkdir()
    (root / "transformer").symlink_to(source / "transformer")
    shutil.copytree(source / "text_vae", root / "text_vae")
    with_pad = AutoTokenizer.from_pretrained(source / "vae_tokenizer")
    model = json.loads(with_pad.backend_tokenizer.to_str())["model"]
    LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]]).save_pretrained(root / "vae_tokenizer")
    loaded = load_omniflow(root, ("text_vae",), dtype=torch.float32)
    assert loaded.vae_tokenizer.pad_token == "[PAD]" and loaded.vae_tokenizer.pad_token_id == len(model["vocab"])
    config = json.loads((root / "text_vae" / "config.json").read_text())
    (root / "text_vae" / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    with pytest.raises(OmniFlowConfigError, match="vocab_size is 100"):
        load_omniflow(root, ("text_vae",))


def test_converter_streams_a_pickle_into_verified_shards(tmp_path, capsys):
    transformer, text_vae, _ = reference_models()
    source = tmp_path / "released" / "transformer"
    source.mkdir(parents=True)
    shutil.copy(TINY_RELEASE / "transformer" / "config.json", source)
    state = omniflow_state_dict(transformer, text_vae)
    torch.save(state, source / "diffusion_pytorch_model.bin")
    out = tmp_path / "converted" / "transformer"
    CONVERTER["main"](["--input", str(source.parent), "--output_dir", str(out), "--max_shard_size", "3MB", "--verify"])
    assert "(verified)" in capsys.readouterr().out
    assert (out / "config.json").is_file() and len(list(out.glob("*.safetensors"))) > 1
    *_, report = reference_models(folder=out)
    assert report.loaded == len(state)

    small = tmp_path / "small"
    CONVERTER["main"](["--input", str(source / "diffusion_pytorch_model.bin"), "--output_dir", str(small),
                       "--dtype", "bf16", "--drop_t5_copy"])
    written = load_file(small / "diffusion_pytorch_model.safetensors")
    assert not any(k.startswith("text_decoder.encoder.") for k in written)
    assert len(written) == len(state) - 22 and {v.dtype for v in written.values()} == {torch.bfloat16}
    with pytest.raises(SystemExit):
        CONVERTER["main"](["--input", str(source), "--output_dir", str(small), "--max_shard_size", "lots"])


def test_benchmark_prints_counts_and_a_cpu_timing(tmp_path, capsys):
    bench = runpy.run_path(str(FIXTURES.parents[2] / "benchmarks" / "bench_omniflow.py"), run_name="test")
    bench["main"](["--batch_size", "1", "--warmup", "0", "--iters", "1", "--json_out", str(tmp_path / "b.json")])
    printed = capsys.readouterr().out
    assert "| transformer (MMDiT) |" in printed and "| omniflow_tiny | cpu | float32 | 1 |" in printed
    result = json.loads((tmp_path / "b.json").read_text())
    # the assumed release config: 4.83e9 elements in the reference's key list, of which 113M are position buffers
    assert round(sum(result["parameters"].values()) / 1e6) == 4719 and result["forward"]["ms_per_forward"] > 0


def test_make_tiny_script_reports_a_missing_config_dir(tmp_path):
    script = runpy.run_path(str(FIXTURES.parents[2] / "scripts" / "make_tiny_omniflow.py"), run_name="test")
    with pytest.raises(SystemExit, match="tiny OmniFlow config not found"):
        script["main"](["--output_dir", str(tmp_path), "--config_dir", str(tmp_path / "none")])


def test_make_tiny_script_names_the_bad_line_of_a_decoder_corpus(tmp_path):
    script = runpy.run_path(str(FIXTURES.parents[2] / "scripts" / "make_tiny_omniflow.py"), run_name="test")
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "Brick wall.", "references": ["Brick wall.", "A wall of bricks."]}\n{"text": oops}\n')
    with pytest.raises(SystemExit, match=f"{corpus}:2: not a JSON record"):
        script["main"](["--output_dir", str(tmp_path / "out"), "--fit_decoder_on", str(corpus)])
    corpus.write_text('{"text": "Brick wall.", "references": ["Brick wall.", "A wall of bricks."]}\n')
    assert jsonl_texts([corpus]) == ["Brick wall.", "A wall of bricks."]
    corpus.write_text('{"id": 1}\n')
    with pytest.raises(SystemExit, match="no record has a"):
        script["main"](["--output_dir", str(tmp_path / "out"), "--fit_decoder_on", str(corpus)])
    assert not (tmp_path / "out").exists()

"""The main job end to end on the tiny OmniFlow and the embedded sample data (CPU, subprocesses):
train_text.py for every head variant, checkpoint + exact resume, generate_text.py (real sampling),
eval_text.py, and the one-line errors."""
import json
import subprocess
import sys

import pytest

from runtime_helpers import REPO, env, metrics

pytestmark = pytest.mark.slow


def run_script(name, *args, check=True):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], env=env(),
                            capture_output=True, text=True, timeout=900, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_job")
    run_script("make_tiny_omniflow.py", "--output_dir", root / "models")
    subprocess.run([sys.executable, "-m", "omniflow.data.sample_text", "--output_dir", root / "data"], env=env(),
                   check=True, capture_output=True, cwd=REPO)
    config = json.loads((REPO / "configs/data_config_sample.json").read_text())
    for spec in config["datasets"]:
        spec["source"] = str(root / "data" / spec["source"].split("/")[-1])
        spec["max_samples"] = 24
    (root / "data_config.json").write_text(json.dumps(config))
    return root


def train_rows(out):
    """Logged training terms per step (throughput left out: it is wall-clock)."""
    return [{k: v for k, v in r.items() if not k.endswith("_per_s")} for r in metrics(out) if "ce" in r]


def model_args(tiny):
    return ["--model_path", tiny / "models/OmniFlow-tiny", "--models_dir", tiny / "models/models",
            "--data_config", tiny / "data_config.json"]


def train(tiny, out, *extra, check=True):
    return run_script("train_text.py", *model_args(tiny), "--batch_size", "4", "--lr", "1e-2", "--noise_shift", "0.1",
                      "--max_eval_samples", "4", "--logging_steps", "2", "--report_to", "none", "--output_dir", out,
                      *extra, check=check)


@pytest.fixture(scope="module")
def baseline_run(tiny):
    out = tiny / "baseline"
    train(tiny, out, "--use_text_decoder_head", "--max_train_steps", "60", "--checkpointing_steps", "30",
          "--eval_interval", "30")
    return out


def test_head_learns_on_the_embedded_data(baseline_run):
    rows = train_rows(baseline_run)
    mean = lambda part, key: sum(r[key] for r in part) / len(part)
    first, last = rows[:3], rows[-3:]
    assert mean(last, "ce") < mean(first, "ce") - 0.3, rows
    assert mean(last, "token_accuracy") > mean(first, "token_accuracy")
    last = last[-1]
    assert {"perplexity", "latent_mse", "lr", "samples_per_s", "tokens_per_s"} <= set(metrics(baseline_run)[-2])
    assert any("val/loss" in r for r in metrics(baseline_run))
    assert (baseline_run / "best_head/model.safetensors").is_file() and (baseline_run / "final_head/config.json").is_file()


def test_resume_reproduces_the_run(tiny, baseline_run, tmp_path):
    train(tiny, tmp_path, "--use_text_decoder_head", "--max_train_steps", "60", "--checkpointing_steps", "30",
          "--eval_interval", "30", "--resume_from_checkpoint", baseline_run / "checkpoint-30")
    assert train_rows(tmp_path) == [r for r in train_rows(baseline_run) if r["step"] > 30]


def generate_and_score(tiny, checkpoint, out):
    predictions = out / "predictions.json"
    run_script("generate_text.py", *model_args(tiny), "--checkpoint", checkpoint, "--output", predictions,
               "--max_samples", "3", "--num_inference_steps", "2", "--max_new_tokens", "6", "--batch_size", "3")
    records = json.loads(predictions.read_text())
    assert len(records) == 6 and {r["task"] for r in records} == {"image_to_text", "text"}
    assert all(isinstance(r["prediction"], str) and r["references"] for r in records)
    scores = out / "scores.json"
    run_script("eval_text.py", "--predictions", predictions, "--output_json", scores)
    return json.loads(scores.read_text())["overall"]["predictions.json"]


def test_baseline_generates_and_evaluates(tiny, baseline_run):
    scores = generate_and_score(tiny, baseline_run / "best_*", baseline_run)
    assert {"bleu", "rouge", "cider"} <= set(scores)


@pytest.mark.parametrize("variant", [
    ["--use_latent_refiner", "--latent_refiner_hidden_dim", "32"],
    ["--use_vq_codebook", "--vq_codebook_size", "64"],
    ["--use_vq_codebook", "--vq_codebook_size", "64", "--use_latent_refiner", "--latent_refiner_hidden_dim", "32"],
    ["--text_decoder_head_dim", "96"],  # the tiny LM's hidden size: the head output is the LM prefix
], ids=["refiner", "vq", "vq_refiner", "prefix_head"])
def test_variant_trains_saves_and_generates(tiny, tmp_path, variant):
    train(tiny, tmp_path, "--use_text_decoder_head", *variant, "--max_train_steps", "4", "--eval_interval", "4")
    config = json.loads((tmp_path / "final_head/config.json").read_text())
    assert config["options"]["use_vq_codebook"] == ("--use_vq_codebook" in variant)
    rows = train_rows(tmp_path)
    assert rows and all(r["ce"] == r["ce"] for r in rows)  # finite
    if "--use_vq_codebook" in variant:
        assert "vq_perplexity" in rows[-1] and "vq_loss" in rows[-1]
    if "--use_latent_refiner" in variant and "--use_vq_codebook" in variant or "--text_decoder_head_dim" in variant:
        generate_and_score(tiny, tmp_path / "final_head", tmp_path)  # the other variants sample the same way


def test_bad_head_dim_and_missing_model_are_one_line(tiny, tmp_path):
    result = train(tiny, tmp_path / "a", "--use_text_decoder_head", "--text_decoder_head_dim", "50",
                   "--max_train_steps", "1", check=False)
    assert result.returncode == 2
    assert "text_decoder_head_dim" in result.stderr.strip().splitlines()[-1]
    result = run_script("train_text.py", "--model_path", tmp_path / "nowhere/OmniFlow-v0.5", "--data_config",
                        tiny / "data_config.json", "--use_text_decoder_head", "--output_dir", tmp_path / "b",
                        "--report_to", "none", check=False)
    assert result.returncode == 2
    assert "download_models.py --models omniflow" in result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("name", ["baseline", "refiner", "vq", "vq_refiner"])
def test_experiment_configs_parse(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_text", REPO / "scripts/train_text.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    from omniflow.models.text_heads import TextHeadOptions
    from omniflow.runtime.options import parse_options
    from omniflow.runtime.run import TrainingOptions

    opts, heads, train = parse_options(script.TextTrainOptions, TextHeadOptions, TrainingOptions,
                                       args=["--config", str(REPO / f"configs/text_head/{name}.json")])
    assert heads.use_text_decoder_head and heads.use_vq_codebook == name.startswith("vq")
    assert heads.use_latent_refiner == name.endswith("refiner") and train.mixed_precision == "bf16"

"""omniflow.runtime.hub: local folders, registry names, Hub ids, offline errors, the token."""

import logging

import huggingface_hub
import pytest
import torch
from diffusers import AutoencoderKL
from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError
from transformers import CLIPTextConfig, CLIPTextModel

from download_helpers import SECRET, fake_snapshot_download
from omniflow.runtime import hub
from omniflow.runtime.hub import MissingModelError, resolve_model_path


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                         sample_size=16)


def save_tiny_vae(folder, repo_id=None):
    torch.manual_seed(0)
    tiny_vae().save_pretrained(folder)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


def test_local_folder_with_subfolder_loads_with_from_pretrained(tmp_path):
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(vocab_size=99, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, bos_token_id=0,
                                         eos_token_id=1, pad_token_id=1))
    model.save_pretrained(tmp_path / "pipe" / "text_encoder")
    path = resolve_model_path(str(tmp_path / "pipe"), subfolder="text_encoder")
    assert path == tmp_path / "pipe" / "text_encoder"
    loaded = CLIPTextModel.from_pretrained(path)
    assert torch.equal(loaded.get_input_embeddings().weight, model.get_input_embeddings().weight)


def test_local_folder_missing_subfolder_is_one_clear_line(tmp_path):
    (tmp_path / "OmniFlow-v0.5").mkdir()
    with pytest.raises(MissingModelError) as err:
        resolve_model_path(str(tmp_path / "OmniFlow-v0.5"), subfolder="transformer")
    message = str(err.value)
    assert "\n" not in message
    assert "no subfolder 'transformer'" in message and str(tmp_path / "OmniFlow-v0.5") in message
    assert "python download_models.py --models omniflow" in message


def test_short_names_and_hub_ids_find_download_models_folders(tmp_path):
    models = tmp_path / "models"
    (models / "OmniFlow-v0.5" / "transformer").mkdir(parents=True)
    save_tiny_vae(models / "stable-diffusion-v1-5" / "vae")
    (models / "custom-model").mkdir()

    assert resolve_model_path("omniflow", models_dir=models) == models / "OmniFlow-v0.5"
    assert resolve_model_path("jacklishufan/OmniFlow-v0.5", "transformer", models_dir=models) == \
        models / "OmniFlow-v0.5" / "transformer"
    vae_path = resolve_model_path("sd15_vae", models_dir=models)  # registry default subfolder: vae
    assert vae_path == models / "stable-diffusion-v1-5" / "vae"
    assert AutoencoderKL.from_pretrained(vae_path).config.latent_channels == 4
    assert resolve_model_path("someone/custom-model", models_dir=models) == models / "custom-model"


def test_offline_missing_model_names_the_download_command(tmp_path):
    # The real huggingface_hub client, offline, with an empty cache.
    with pytest.raises(MissingModelError) as err:
        resolve_model_path("google/flan-t5-large", cache_dir=tmp_path / "cache", models_dir=tmp_path / "models")
    message = str(err.value)
    assert isinstance(err.value, FileNotFoundError) and "\n" not in message
    assert "google/flan-t5-large" in message and "HF_HUB_OFFLINE=1" in message
    assert message.endswith("python download_models.py --models t5_large")

    with pytest.raises(MissingModelError, match=r"--models someone/thing$"):
        resolve_model_path("someone/thing", "unet", cache_dir=tmp_path / "cache", models_dir=tmp_path / "models")
    with pytest.raises(MissingModelError, match=r"path models/OmniFlow-v0.5 does not exist; .*--models omniflow$"):
        resolve_model_path("models/OmniFlow-v0.5", models_dir="models")


def test_hub_download_uses_token_registry_patterns_and_subfolder(tmp_path, monkeypatch, online, caplog):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download(calls, save_tiny_vae))
    monkeypatch.setenv("HF_TOKEN", SECRET)
    with caplog.at_level(logging.DEBUG):
        path = resolve_model_path("stable-diffusion-v1-5/stable-diffusion-v1-5", subfolder="vae",
                                  cache_dir=tmp_path / "cache", models_dir=tmp_path / "models")
    assert path.name == "vae" and AutoencoderKL.from_pretrained(path).config.latent_channels == 4
    call = calls.read_text()
    assert '"token_is_secret": true' in call
    assert '"allow_patterns": ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]' in call
    assert SECRET not in caplog.text


def test_unreachable_hub_and_gated_repo_give_one_line_without_token(tmp_path, monkeypatch, online):
    monkeypatch.setenv("HUGGINGFACE_TOKEN", SECRET)

    def unreachable(repo_id, **kwargs):
        raise LocalEntryNotFoundError(f"Got: ConnectError: [Errno -2] Name or service not known (token {SECRET})"
                                      "\nAn error happened while trying to locate the files on the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(MissingModelError) as err:
        resolve_model_path("t5_large", cache_dir=tmp_path, models_dir=tmp_path)
    message = str(err.value)
    assert "cannot reach the Hugging Face Hub" in message and "Name or service not known" in message
    assert "\n" not in message and SECRET not in message and "<token>" in message
    assert message.endswith("python download_models.py --models t5_large")

    def gated(repo_id, **kwargs):
        import httpx2
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise GatedRepoError("Access to model is restricted.", response=httpx2.Response(401, request=request))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(MissingModelError) as err:
        resolve_model_path("flux_vae", cache_dir=tmp_path, models_dir=tmp_path)
    message = str(err.value)
    assert "gated or private" in message and "HF_TOKEN" in message and SECRET not in message
    assert message.endswith("python download_models.py --models flux_vae")


def test_token_from_environment(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGINGFACE_TOKEN", raising=False)
    assert hub.hf_token() is None
    monkeypatch.setenv("HUGGINGFACE_TOKEN", "second")
    assert hub.hf_token() == "second"
    monkeypatch.setenv("HF_TOKEN", " first ")
    assert hub.hf_token() == "first"
    assert hub.redact("value first here") == "value <token> here"


@pytest.mark.parametrize("value, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("", False)])
def test_is_offline_reads_the_environment_now(monkeypatch, value, expected):
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert hub.is_offline() is expected


def test_from_pretrained_kwargs_load_a_subfolder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    save_tiny_vae(tmp_path / "vae")
    kwargs = hub.from_pretrained_kwargs(subfolder="vae", cache_dir=tmp_path / "cache")
    assert kwargs == {"token": SECRET, "subfolder": "vae", "cache_dir": str(tmp_path / "cache"),
                      "local_files_only": True}
    assert AutoencoderKL.from_pretrained(tmp_path, **kwargs).config.latent_channels == 4


def test_dataset_access_check_fails_fast_in_one_line(monkeypatch, online):
    class UnreachableApi:
        def repo_info(self, repo_id, **kwargs):
            import httpx2
            raise httpx2.ConnectError("[Errno -2] Name or service not known")

    class RefusingApi:
        def repo_info(self, repo_id, **kwargs):
            import httpx2
            request = httpx2.Request("GET", f"https://huggingface.co/api/datasets/{repo_id}")
            raise GatedRepoError("Access to dataset is restricted.", response=httpx2.Response(403, request=request))

    monkeypatch.setattr(hub, "HfApi", UnreachableApi)
    with pytest.raises(hub.MissingDatasetError, match=r"^cannot reach dataset Salesforce/wikitext .*ConnectError"):
        hub.check_dataset_access("Salesforce/wikitext")
    monkeypatch.setattr(hub, "HfApi", RefusingApi)
    with pytest.raises(hub.MissingDatasetError, match=r"refused access to dataset .*set HF_TOKEN"):
        hub.check_dataset_access("OpenSound/AudioCaps")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.check_dataset_access("Salesforce/wikitext")  # offline: the datasets cache decides, no Hub call

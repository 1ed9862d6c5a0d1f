"""AudioLDM2-VAE latents of audio clips: the input of OmniFlow's audio stream (audio -> text).

A clip becomes 10.24 s of 16 kHz mono audio (mean removed, peak scaled to 0.5, cut or zero-padded),
then a 64-bin log-mel spectrogram (STFT 1024, hop 160, periodic Hann window, centred with reflect
padding, Slaney mel filters over 0-8 kHz, ``log(max(x, 1e-5))``) of 1024 frames, as AudioLDM's
``TacotronSTFT`` computes it. The AudioLDM2 VAE (``cvssp/audioldm2``, subfolder ``vae``) encodes the
[B, 1, 1024, 64] spectrogram; its ``latent_dist.sample() * scaling_factor`` is [B, 8, 256, 16].
The optional LanguageBind audio embedding of the release's pooled vector is not computed here (zeros).
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers.audio_utils import mel_filter_bank

from ..models.omniflow.errors import MissingComponentError
from ..models.omniflow.loading import from_pretrained
from ..runtime.hub import MissingModelError, resolve_model_path
from ..runtime.noise import Generators

SAMPLE_RATE = 16_000
N_FFT = 1024
HOP = 160
N_MELS = 64
F_MAX = 8_000.0
FRAMES = 1024  # 10.24 s
REGISTRY_NAME = "audioldm2_vae"


def mel_filters() -> torch.Tensor:
    """Slaney-normalised triangular mel filters on the Slaney scale [N_MELS, N_FFT // 2 + 1] (librosa's
    defaults, as AudioLDM uses them)."""
    filters = mel_filter_bank(N_FFT // 2 + 1, N_MELS, 0.0, F_MAX, SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(filters.T).float()


def log_mel_spectrogram(waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Mono 16 kHz waveforms [B, T] (``lengths``: valid samples per row) -> log-mel [B, FRAMES, N_MELS]."""
    samples = FRAMES * HOP
    clips = torch.zeros(waveforms.shape[0], samples, device=waveforms.device)
    for i, wave in enumerate(waveforms.float()):
        wave = wave[: int(lengths[i])] if lengths is not None else wave
        wave = wave[:samples]
        wave = wave - wave.mean()
        clips[i, : wave.numel()] = 0.5 * wave / (wave.abs().max() + 1e-8)
    window = torch.hann_window(N_FFT, periodic=True, device=clips.device)
    spectrum = torch.stft(clips, N_FFT, HOP, N_FFT, window, center=True, pad_mode="reflect", return_complex=True)
    mel = mel_filters().to(clips.device) @ spectrum.abs()
    return torch.log(mel.clamp(min=1e-5))[..., :FRAMES].transpose(1, 2)


class AudioLatentEncoder:
    """Waveforms -> AudioLDM2-VAE latents x scaling_factor [B, 8, 256, 16] (see the module doc)."""

    def __init__(self, vae: AutoencoderKL):
        self.vae = vae.eval().requires_grad_(False)

    @torch.no_grad()
    def encode(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None,
               generator: Generators = None) -> torch.Tensor:
        device, dtype = self.vae.device, self.vae.dtype
        mel = log_mel_spectrogram(waveforms.to(device), lengths)
        posterior = self.vae.encode(mel[:, None].to(dtype)).latent_dist
        return posterior.sample(generator=generator) * self.vae.config.scaling_factor


def load_audio_encoder(models_dir: str | Path = "models", device: torch.device | str = "cpu") -> AudioLatentEncoder:
    """The AudioLDM2 VAE from ``<models_dir>/audioldm2/vae`` (``download_models.py --models audioldm2_vae``)."""
    try:
        folder = resolve_model_path(REGISTRY_NAME, models_dir=models_dir)
    except MissingModelError as err:
        raise MissingComponentError(f"audio->text needs the AudioLDM2 VAE to encode audio clips: {err}") from None
    return AudioLatentEncoder(from_pretrained(AutoencoderKL, folder).to(device))

"""The main job: text decoder heads trained on a frozen OmniFlow (``scripts/train_text.py``,
``scripts/generate_text.py``).

- :mod:`.model`: the frozen OmniFlow of the job, the conditions of a batch, the head's training
  terms and sampling with a head.
- :mod:`.checkpoints`: head exports (``best_head/``, ``final_head/``) and ``--checkpoint`` globs.
- :mod:`.audio`: AudioLDM2-VAE latents of audio clips (audio->text).
"""

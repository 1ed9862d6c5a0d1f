"""Data builders: Hugging Face datasets (streaming or local files) with resumable positions."""

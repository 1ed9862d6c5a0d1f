"""Helpers for the text-job tests: a tiny OmniFlow and the embedded sample data, built once, and the
three scripts run as subprocesses the way a user runs them."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omniflow.data.sample_text import write_sample_text_data
from omniflow.data.text import jsonl_texts
from omniflow.models.omniflow.tiny import make_tiny_omniflow
import runtime_helpers
from runtime_helpers import REPO, metrics

SCRIPTS = REPO / "scripts"


@dataclass
class TinyWorld:
    """Paths of the tiny OmniFlow (``model``, ``models_dir``) and of data configs over the sample data."""

    root: Path
    model: Path
    models_dir: Path
    data: dict[str, Path]

    def model_args(self) -> list[str]:
        return ["--model_path", str(self.model), "--models_dir", str(self.models_dir)]


def build_world(root: Path) -> TinyWorld:
    folders = write_sample_text_data(root / "data", n_text=40, variants=2)
    # The text decoder is fitted to the sample texts (as run_example.sh does), so that heads can steer it.
    texts = jsonl_texts([folders["photos"] / "validation.jsonl", folders["shakespeare"] / "train.jsonl"])
    paths = make_tiny_omniflow(root / "tiny", decoder_texts=texts, decoder_steps=300)
    configs = {
        # 4 photos (2 training crops each, the whole photo held out) and 8 + 8 sonnet sentences.
        "mixed": [("photos", "image_to_text", folders["photos"], 8), ("sonnets", "text", folders["shakespeare"], 8)],
        # The learning tests' memorisation tasks: two sentences; two whole photos, trained and scored.
        "two_sentences": [("sonnets", "text", folders["shakespeare"], 2)],
        "two_photos": [("photos", "image_to_text", folders["photos"], 2)],
        "streaming": [("sonnets", "text", folders["shakespeare"], 8)],
    }
    data = {}
    for name, sets in configs.items():
        splits = {"train_split": "validation", "eval_split": "validation"} if name == "two_photos" else {}
        datasets = [{"name": n, "task": task, "source": str(folder), "max_samples": limit,
                     "streaming": name == "streaming", **splits} for n, task, folder, limit in sets]
        data[name] = root / f"{name}.json"
        data[name].write_text(json.dumps({"datasets": datasets, "image_size": 64, "max_length": 40}))
    # run_example.sh's embedded default over this world's sample data: 4 photos and 4 sentences, scored on themselves.
    example = json.loads((REPO / "configs/text_head/tiny_example_data.json").read_text())
    for spec in example["datasets"]:
        spec["source"] = str(folders[{"photos": "photos", "sonnets": "shakespeare"}[spec["name"]]])
    data["example"] = root / "example.json"
    data["example"].write_text(json.dumps(example))
    return TinyWorld(root, paths.model_path, paths.models_dir, data)


def run_script(name: str, *args, processes: int = 1, check: bool = True, cwd: Path = REPO):
    """``scripts/<name> args`` in one process or, with ``processes`` > 1, CPU DDP under accelerate launch."""
    return runtime_helpers.run_script(SCRIPTS / name, *args, processes=processes, check=check, cwd=cwd)


def train_rows(output_dir: Path) -> list[dict]:
    """The logged training terms per step, throughput (wall-clock) left out."""
    return [{k: v for k, v in row.items() if not k.endswith("_per_s")} for row in metrics(output_dir) if "loss" in row]

"""Run the text-head experiment grid: train the four heads of configs/text_head/ on the same data and seed,
generate with each best head and with the released text_output, score all side by side.

    python scripts/run_text_grid.py --output_dir checkpoints/text_grid
    python scripts/run_text_grid.py --output_dir checkpoints/text_grid \
        --launcher "accelerate launch --config_file accelerate_configs/zero2.yaml --num_processes 8"

With models/OmniFlow-v0.5 each variant trains with its configs/text_head/<variant>.json (the README's
full-size experiment); without it, on the embedded default (a tiny OmniFlow and the sample data, built
offline; 4.5 minutes on 2 CPU cores once the tiny model is built). Writes <output_dir>/grid.md (parameters, relative training time,
samples/s, peak memory, BLEU-4 / METEOR / ROUGE-L / CIDEr-D overall and per task) and curves.png
(validation loss and token accuracy against step). Rerunning the same command resumes a half-finished
grid: finished variants are skipped, an interrupted one resumes from its latest checkpoint.
"""
import json
import os
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import List

from omniflow.runtime.errors import ConfigError, OmniflowError, run_main
from omniflow.runtime.options import parse_options
from omniflow.text_job.checkpoints import BEST_HEAD
from omniflow.text_job.grid import RELEASED, VARIANTS, GridFolder, write_curves, write_grid_table

REPO = Path(__file__).resolve().parents[1]
FULL_MODEL = Path("models/OmniFlow-v0.5")
# The embedded default: each head memorises the 4 photo captions and 4 sentences of the example data.
TINY_TRAIN_ARGS = ("--batch_size 4 --max_train_steps 300 --lr 1e-2 --lr_warmup_steps 0 --mixed_precision no "
                   "--no-gradient_checkpointing --log_interval 25 --eval_interval 50 --save_interval 100 "
                   "--vq_codebook_size 256 --latent_refiner_hidden_dim 64 --num_validation_samples 2 "
                   "--validation_inference_steps 10")
TINY_GENERATE_ARGS = "--strength 0.1 --num_inference_steps 10 --max_new_tokens 40"
FULL_GENERATE_ARGS = "--max_samples 500 --batch_size 8"


class GridStepError(OmniflowError):
    """A training, generation or scoring process of the grid failed."""


@dataclass
class GridOptions:
    output_dir: str = field(default="checkpoints/text_grid", metadata={"help": "folder of the whole grid"})
    variants: List[str] = field(default_factory=lambda: list(VARIANTS), metadata={
        "help": "heads to train (configs/text_head/<variant>.json)", "choices": list(VARIANTS)})
    model_path: str = field(default="", metadata={
        "help": "OmniFlow folder (default: models/OmniFlow-v0.5 if present, else the embedded tiny default)"})
    models_dir: str = field(default="", metadata={"help": "external models folder (default: the config's)"})
    data_config: str = field(default="", metadata={"help": "data config (default: the config's)"})
    seed: int = field(default=0, metadata={"help": "seed of every variant (data order, initialisation, noise)"})
    launcher: str = field(default="python", metadata={
        "help": "how train_text.py is started: python, or an accelerate launch command line (several GPUs)"})
    train_args: str = field(default="", metadata={
        "help": "extra train_text.py flags for every variant (the embedded default adds its own first)"})
    generate_args: str = field(default="", metadata={"help": "extra generate_text.py flags"})
    config_dir: str = field(default="configs/text_head", metadata={"help": "folder of the <variant>.json configs"})


def absolute(path: str) -> str:
    return os.path.abspath(path) if path else path


def resolve(opts: GridOptions) -> dict:
    """The grid's settings: every path absolute (the steps run from the repository root), defaults filled in."""
    model_path, models_dir, data_config = map(absolute, (opts.model_path, opts.models_dir, opts.data_config))
    train_args, generate_args = opts.train_args, opts.generate_args
    if not model_path and not (REPO / FULL_MODEL).is_dir():
        print(f"{FULL_MODEL} not found: running the embedded default (tiny OmniFlow + sample data, built offline)")
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # the tiny models gain nothing from more threads
        from omniflow.text_job.example import EXAMPLE_DATA_CONFIG, ensure_example_model  # torch: only here

        tiny, tiny_models = ensure_example_model(REPO)
        model_path, models_dir = str(tiny), models_dir or str(tiny_models)
        data_config = data_config or str(REPO / EXAMPLE_DATA_CONFIG)
        train_args, generate_args = f"{TINY_TRAIN_ARGS} {train_args}", f"{TINY_GENERATE_ARGS} {generate_args}"
    elif not opts.generate_args:
        generate_args = FULL_GENERATE_ARGS
    for variant in opts.variants:
        if not (Path(absolute(opts.config_dir)) / f"{variant}.json").is_file():
            raise ConfigError(f"--config_dir {opts.config_dir} holds no {variant}.json")
    return {**asdict(opts), "output_dir": absolute(opts.output_dir), "config_dir": absolute(opts.config_dir),
            "model_path": model_path, "models_dir": models_dir, "data_config": data_config,
            "train_args": train_args.strip(), "generate_args": generate_args.strip()}


def common_args(settings: dict) -> list[str]:
    pairs = [(name, settings[name]) for name in ("model_path", "models_dir", "data_config") if settings[name]]
    return [item for name, value in pairs for item in (f"--{name}", value)]


def launcher(spec: str) -> list[str]:
    """``python`` or ``accelerate launch ...``, run with this interpreter."""
    words = shlex.split(spec)
    if words == ["python"]:
        return [sys.executable]
    if words[:2] == ["accelerate", "launch"]:
        return [sys.executable, "-m", "accelerate.commands.launch", *words[2:]]
    raise ConfigError(f"--launcher {spec!r}: expected 'python' or 'accelerate launch [options]'")


def step(command: list[str], what: str) -> None:
    print(f"[grid] {what}", flush=True)
    if subprocess.run(command, cwd=REPO).returncode != 0:
        raise GridStepError(f"{what} failed (see its output above); rerun the same command to resume the grid")


def main():
    opts = parse_options(GridOptions, description=__doc__.split("\n\n")[0])
    settings = resolve(opts)
    start = launcher(opts.launcher)
    grid = GridFolder(settings["output_dir"])
    # A grid may resume on other GPUs, or after its folder moved.
    grid.claim({key: value for key, value in settings.items() if key not in ("launcher", "output_dir")})
    scripts = REPO / "scripts"
    for variant in opts.variants:
        if grid.finished(variant):
            print(f"[grid] {variant}: finished earlier, skipped")
            continue
        grid.predictions(variant).unlink(missing_ok=True)  # from an earlier best head of this variant
        command = [*start, str(scripts / "train_text.py"), "--config", f"{settings['config_dir']}/{variant}.json",
                   *common_args(settings), "--seed", str(opts.seed), *shlex.split(settings["train_args"]),
                   "--output_dir", str(grid.variant(variant)), "--resume_from_checkpoint", "latest"]
        print(f"[grid] training {variant}", flush=True)
        if grid.run_training(variant, command) != 0:
            raise GridStepError(f"training {variant} failed (see {grid.variant(variant)}/train.log); rerun the same "
                                "command to resume it")
    for name in [RELEASED, *opts.variants]:
        if not grid.predictions(name).is_file():
            head = "none" if name == RELEASED else str(grid.variant(name) / BEST_HEAD)
            step([sys.executable, str(scripts / "generate_text.py"), *common_args(settings), "--checkpoint", head,
                  "--seed", str(opts.seed), *shlex.split(settings["generate_args"]),
                  "--output", str(grid.predictions(name))], f"generating with {name}")
    scores = grid.root / "eval.json"
    step([sys.executable, str(scripts / "eval_text.py"), "--by_task", "--output_json", str(scores), "--predictions",
          *(str(grid.predictions(name)) for name in [RELEASED, *opts.variants])], "scoring")
    table = write_grid_table(grid, opts.variants, json.loads(scores.read_text()))
    curves = write_curves(grid, opts.variants)
    print(f"\n{table.read_text()}\n[grid] wrote {table} and {curves}")


if __name__ == "__main__":
    run_main(main)

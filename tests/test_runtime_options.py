import json
from dataclasses import dataclass, field
from typing import List, Optional

import pytest

from omniflow.runtime.errors import ConfigError
from omniflow.runtime.options import parse_options, save_config
from omniflow.runtime.run import TrainingOptions


@dataclass
class ModelOptions:
    hidden_dim: int = field(default=64, metadata={"help": "hidden width"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate", "aliases": ["--learning_rate"]})
    use_refiner: bool = field(default=False, metadata={"help": "add the refiner"})
    loss: str = field(default="mse", metadata={"help": "loss", "choices": ["mse", "l1"]})
    input_types: List[str] = field(default_factory=lambda: ["image"], metadata={"help": "inputs"})
    max_length: Optional[int] = field(default=None, metadata={"help": "truncate"})


def test_defaults_and_cli_types():
    opts = parse_options(ModelOptions, args=["--hidden_dim", "32", "--use_refiner", "--input_types", "image", "latent"])
    assert opts.hidden_dim == 32 and opts.use_refiner is True and opts.input_types == ["image", "latent"]
    assert opts.lr == 1e-4 and opts.max_length is None
    assert parse_options(ModelOptions, args=["--no-use_refiner"]).use_refiner is False


def test_config_file_then_cli_override(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_dim": 128, "lr": 3e-4, "loss": "l1", "max_length": 77}))
    opts = parse_options(ModelOptions, args=["--config", str(cfg), "--lr", "1e-3"])
    assert (opts.hidden_dim, opts.lr, opts.loss, opts.max_length) == (128, 1e-3, "l1", 77)


def test_config_file_sections_are_merged_and_a_key_set_twice_is_refused(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"hidden_dim": 64}, "training": {"lr": 2e-4}, "loss": "l1"}))
    opts = parse_options(ModelOptions, args=["--config", str(cfg)])
    assert (opts.hidden_dim, opts.lr, opts.loss) == (64, 2e-4, "l1")
    cfg.write_text(json.dumps({"model": {"hidden_dim": 64}, "training": {"hidden_dim": 32}}))
    with pytest.raises(ConfigError, match=r"c\.json: key 'hidden_dim' is set twice \(sections are merged\)"):
        parse_options(ModelOptions, args=["--config", str(cfg)])


def test_alias_flag_and_alias_key(tmp_path):
    assert parse_options(ModelOptions, args=["--learning_rate", "0.5"]).lr == 0.5
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"learning_rate": 0.25}))
    assert parse_options(ModelOptions, args=["--config", str(cfg)]).lr == 0.25


def test_seed_config_flag_names(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_dim": 8}))
    opts = parse_options(ModelOptions, args=["--load_config", str(cfg)], config_flags=("--config", "--load_config"))
    assert opts.hidden_dim == 8


def test_script_aliases_and_synonyms_keep_flags_above_the_file(tmp_path):
    """A script's own spelling of an option is that option: defaults < file < command line, any spelling."""
    def parse(*args):
        return parse_options(TrainingOptions, args=[str(a) for a in args], aliases={"output_dir": ["--save_dir"]},
                             synonyms={"mixed_precision": {"float32": "no", "bfloat16": "bf16"}})

    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"save_dir": "from_file", "mixed_precision": "float32"}))
    assert (parse("--config", cfg).output_dir, parse("--config", cfg).mixed_precision) == ("from_file", "no")
    flags = parse("--config", cfg, "--output_dir", "from_flag", "--mixed_precision", "bf16")
    assert (flags.output_dir, flags.mixed_precision) == ("from_flag", "bf16")
    cfg.write_text(json.dumps({"output_dir": "from_file"}))
    assert parse("--config", cfg, "--save_dir", "from_flag", "--mixed_precision", "bfloat16").mixed_precision == "bf16"
    assert parse("--config", cfg, "--save_dir", "from_flag").output_dir == "from_flag"
    cfg.write_text(json.dumps({"save_dir": None, "output_dir": "kept"}))  # saved when save_dir was its own option
    assert parse("--config", cfg).output_dir == "kept"
    cfg.write_text(json.dumps({"save_dir": "a", "output_dir": "b"}))
    with pytest.raises(ConfigError, match="keys 'save_dir' and 'output_dir' both set option 'output_dir'"):
        parse("--config", cfg)
    with pytest.raises(ConfigError, match="invalid choice: 'float64'"):
        parse("--mixed_precision", "float64")


def test_unknown_key_names_closest(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hiden_dim": 8}))
    with pytest.raises(ConfigError, match=r"unknown key 'hiden_dim'.*did you mean 'hidden_dim'"):
        parse_options(ModelOptions, args=["--config", str(cfg)])


def test_bad_values_are_one_clear_error(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"hidden_dim": "wide"}))
    with pytest.raises(ConfigError, match=r"c.json: key 'hidden_dim' has value 'wide', expected int"):
        parse_options(ModelOptions, args=["--config", str(cfg)])
    cfg.write_text(json.dumps({"loss": "huber"}))
    with pytest.raises(ConfigError, match=r"'huber' is not one of \['mse', 'l1'\]"):
        parse_options(ModelOptions, args=["--config", str(cfg)])
    cfg.write_text("{not json")
    with pytest.raises(ConfigError, match=r"invalid JSON at line 1"):
        parse_options(ModelOptions, args=["--config", str(cfg)])
    with pytest.raises(FileNotFoundError, match="config file not found"):
        parse_options(ModelOptions, args=["--config", str(tmp_path / "missing.json")])
    with pytest.raises(ConfigError, match="--checkpointing_steps must be >= 1"):
        parse_options(TrainingOptions, args=["--checkpointing_steps", "0"])


def test_saved_config_round_trips(tmp_path):
    model, train = parse_options(ModelOptions, TrainingOptions, args=["--hidden_dim", "16", "--save_interval", "7"])
    assert train.checkpointing_steps == 7
    path = save_config(tmp_path / "run" / "config.json", model, train)
    again_model, again_train = parse_options(ModelOptions, TrainingOptions, args=["--config", str(path)])
    assert again_model == model and again_train == train


def test_every_training_option_has_help():
    from dataclasses import fields

    assert all(f.metadata.get("help") for f in fields(TrainingOptions))


def test_negative_numbers_in_any_notation_are_values():
    for text, value in (("-1e-3", -1e-3), ("-2.5E+2", -250.0), ("-.5", -0.5), ("-3", -3.0)):
        assert parse_options(ModelOptions, args=["--lr", text]).lr == value


def test_flags_are_never_abbreviated_and_errors_are_one_config_error():
    with pytest.raises(ConfigError, match=r"unrecognized argument '--hidden_di'; did you mean '--hidden_dim'\?"):
        parse_options(ModelOptions, args=["--hidden_di", "32"])
    with pytest.raises(ConfigError, match=r"argument --hidden_dim: invalid int value: 'wide'"):
        parse_options(ModelOptions, args=["--hidden_dim", "wide"])


def test_every_argument_parser_refuses_abbreviations():
    """Prefix matching reads a mistyped --fmt_dept as --fmt_depth; every parser of the project turns it off."""
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = [repo / "download_models.py", *(p for d in ("omniflow", "scripts", "benchmarks")
                                             for p in (repo / d).rglob("*.py"))]
    parsers = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            name = getattr(node, "func", None)
            name = getattr(name, "attr", getattr(name, "id", None))
            if isinstance(node, ast.Call) and name in ("ArgumentParser", "add_parser"):
                allowed = {k.arg: getattr(k.value, "value", None) for k in node.keywords}.get("allow_abbrev", True)
                parsers.append((f"{path.relative_to(repo)}:{node.lineno}", allowed))
    assert len(parsers) > 10 and [where for where, allowed in parsers if allowed is not False] == []

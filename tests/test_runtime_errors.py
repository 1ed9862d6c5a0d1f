"""Unreadable inputs are one error that names the file (and line): weight files truncated or pickled as
objects, a missing export path, a malformed JSON-lines row; run_main keeps programming errors as tracebacks."""
import json

import pytest
import torch
from transformers import AutoConfig, T5Config, T5EncoderModel

from omniflow.data.core import load_hf_dataset
from omniflow.runtime.errors import CheckpointError, DataError, run_main
from omniflow.runtime.export import export_weights, load_export
from omniflow.runtime.weights import load_pretrained, read_weights_file
from runtime_helpers import truncated


@pytest.fixture
def tiny_t5(tmp_path):
    config = T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2)
    torch.manual_seed(0)
    model = T5EncoderModel(config)
    model.save_pretrained(tmp_path / "t5")
    return model, tmp_path / "t5"


def test_unreadable_weight_files_name_the_file_and_the_fault(tiny_t5, tmp_path):
    model, folder = tiny_t5
    torch.save(model.state_dict(), tmp_path / "state.pt")
    torch.save(model, tmp_path / "pickled_model.pt")  # the module object itself, not its weights
    cases = {
        truncated(folder / "model.safetensors"): "truncated, corrupt or not a weights file (SafetensorError: ",
        truncated(tmp_path / "state.pt"): "truncated, corrupt or not a weights file (",  # torch's type varies
        tmp_path / "pickled_model.pt": "not a weights-only checkpoint: it pickles "
                                       "transformers.models.t5.modeling_t5.T5EncoderModel, and omniflow never",
        folder / "config.json": "truncated, corrupt or not a weights file (UnpicklingError: ",
    }
    for path, fault in cases.items():
        with pytest.raises(CheckpointError) as err:
            read_weights_file(path)
        assert str(err.value).startswith(f"{path}: {fault}") and "\n" not in str(err.value)


def test_from_pretrained_names_an_unreadable_weight_file_and_passes_other_failures(tiny_t5, tmp_path):
    model, folder = tiny_t5
    (folder / "model.safetensors").unlink()
    torch.save(model, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=f"^{folder / 'pytorch_model.bin'}: not a weights-only checkpoint"):
        load_pretrained(T5EncoderModel, folder)
    (folder / "pytorch_model.bin").unlink()
    with pytest.raises(OSError) as err:  # no weights at all: transformers' own error, unchanged
        load_pretrained(T5EncoderModel, folder)
    assert not isinstance(err.value, CheckpointError)


def test_a_missing_export_path_is_named_and_its_parent_export_not_loaded(tmp_path):
    run = export_weights({"w": torch.zeros(2)}, {"model_type": "x"}, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match=f"^no export at {run / 'nope'}: no such folder or file$"):
        load_export(run / "nope")
    assert load_export(run / "model.safetensors")[1] == load_export(run)[1] == {"model_type": "x"}
    with pytest.raises(CheckpointError, match="model.safetensors: truncated"):
        load_export(truncated(run / "model.safetensors"))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_malformed_json_lines_row_names_the_file_and_line(tmp_path, streaming):
    path = tmp_path / "train.jsonl"
    rows = [json.dumps({"id": str(i), "text": f"row {i}"}) for i in range(5)]
    rows[3] = rows[3].replace('"text"', "text")
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"^{path}:4: not a JSON record \\(Expecting property name enclosed in "
                                        "double quotes at column 13\\)$"):
        load_hf_dataset(str(tmp_path), "train", streaming=streaming, cache_dir=str(tmp_path / "cache"))
    rows[3] = "[3]"
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DataError, match=f"^{path}:4: not a JSON record \\(a JSON list\\)$"):
        load_hf_dataset(str(path), "train", streaming=streaming, cache_dir=str(tmp_path / "cache"))


def test_run_main_prints_os_errors_in_one_line_and_keeps_bugs_as_tracebacks(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"d_model": ')
    with pytest.raises(SystemExit) as exit_info:  # transformers' OSError names the file that is not JSON
        run_main(lambda: AutoConfig.from_pretrained(tmp_path))
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (f"error: OSError: It looks like the config file at "
                                       f"'{tmp_path / 'config.json'}' is not a valid JSON file.\n")
    with pytest.raises(KeyError):
        run_main(lambda: {}["model_path"])


"""Output that must not depend on Python's hash seed (set and dict-hash order)."""
import os
import subprocess
import sys

# Seeds under which Python's set order once dropped a different key from the message (issue 22).
HASH_SEEDS = ("0", "18", "19")

MISMATCH_PROGRAM = """
import torch
from omniflow.runtime.errors import CheckpointError
from omniflow.runtime.export import load_state_dict_strict
model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(3)])
state = {k: torch.zeros(2, *v.shape) for k, v in model.state_dict().items()}
try:
    load_state_dict_strict(model, state, "file")
except CheckpointError as err:
    print(err)
"""


def test_key_lists_in_errors_do_not_depend_on_the_hash_seed():
    """Six shape mismatches, of which the message shows five: the same five whatever the hash seed."""
    messages = set()
    for seed in HASH_SEEDS:
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", MISMATCH_PROGRAM], env=env, capture_output=True, text=True,
                              check=True)
        messages.add(done.stdout.strip())
    assert len(messages) == 1, messages
    assert messages.pop().startswith("file does not fit Sequential: 6 shape mismatch: 0.bias: file (2, 3) vs model "
                                     "(3,), 0.weight: ")

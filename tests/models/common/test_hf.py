import subprocess
import sys

SCRIPT = """
import os, sys
os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
from transformers import LlamaConfig, LlamaForCausalLM
from mmflow.models.common.hf import save_pretrained
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                     num_hidden_layers=1, num_attention_heads=2))
out = sys.argv[1]
if sys.argv[2] == "helper":
    save_pretrained(out, model)
else:
    model.save_pretrained(out)
print(sorted(os.listdir(out)))
"""


def _save(tmp_path, how):
    out = tmp_path / how
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(out), how],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done


def test_save_pretrained_writes_safetensors_and_draws_no_progress_bar(tmp_path):
    """transformers' "Writing model shards" bar filled job logs on every save; the helper
    every stage saves through writes the same folder without it, whoever calls it (a remote
    worker does not inherit the driver's environment switch)."""
    plain, quiet = _save(tmp_path, "plain"), _save(tmp_path, "helper")
    assert "model.safetensors" in quiet.stdout and quiet.stdout == plain.stdout
    assert "Writing" in plain.stderr  # the bar the helper is there to stop
    assert "Writing" not in quiet.stderr, quiet.stderr

    from transformers import LlamaForCausalLM

    a = LlamaForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    b = LlamaForCausalLM.from_pretrained(tmp_path / "helper").state_dict()
    assert a.keys() == b.keys()

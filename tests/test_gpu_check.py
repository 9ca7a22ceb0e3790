"""gpu_check.sh, issue 7's one-command GPU measurement, runs every step at a toy size on CPU (MINI=1), so the
minutes of a GPU lease are not lost to a broken command line; and the GPU memory field of the metrics."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_world
import model as M

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_runs_every_step_at_a_toy_size(tmp_path):
    tiny_world(tmp_path, n_sft=6, n_rl=4, n_eval=2, vocab_size=512)  # 512: the world's records fit max_len
    out, world = tmp_path / "out", tmp_path / "shapes"
    env = {**os.environ, "MINI": "1", "PY": sys.executable, "WORLD": str(world)}
    r = subprocess.run(["bash", "gpu_check.sh", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    status = (out / "status.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in status] == ["sft_1b", "prefs_1b", "rm_1b", "ppo_1b", "sft_1b_lora", "tiny_pipeline"]
    summary = (out / "summary.txt").read_text()
    for line in ("sft_1b: 2 steps", "sft_1b_lora: 2 steps", "rm_1b: ", "prefs_1b: 4 prompts", "ppo_1b: ",
                 "tiny pipeline seconds: eval", "tiny pipeline judge agreement with the oracle: gt",
                 "tiny pipeline RM held out: ", "tiny pipeline accuracy: prior"):
        assert line in summary, summary
    # make was given RUN and WORLD, and passed both on to every stage (none read runs/tiny or data/shapes),
    # and each stage its *_ARGS (MINI shortens the pipeline: PPO_ARGS="--iterations 2")
    ppo_args = json.loads((out / "tiny" / "ppo" / "config.json").read_text())
    assert (ppo_args["sft"], ppo_args["rm"], ppo_args["prompts"], ppo_args["iterations"]) == \
        (str(out / "tiny" / "sft" / "model"), str(out / "tiny" / "rm" / "model"), str(world / "rl.jsonl"), 2)
    assert json.loads((out / "tiny" / "rm" / "config.json").read_text())["sft"] == str(out / "tiny" / "sft" / "model")


def test_gpu_peak_memory_is_logged_on_cuda_only(monkeypatch):
    assert M.gpu_peak_gb("cpu") == {}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2_345_678_901)
    assert M.gpu_peak_gb("cuda:0") == {"gpu_peak_gb": 2.346}

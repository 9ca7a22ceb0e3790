"""bench.py runs end to end on a miniature configuration (seconds), so `make bench` does not rot."""
import math
import queue

import torch

import bench
import sft

torch.set_num_threads(1)


def test_bench_runs_and_prints_ratios(capsys):
    ratios = bench.main(bench.Args(sizes=["mini"], threads=1, batch=2, new_tokens=4, naive=["mini"], compile=[],
                                   memory=False))
    out = capsys.readouterr().out
    printed = dict(line.split()[1:] for line in out.splitlines() if line.startswith("ratio "))
    assert set(printed) == {"gen_vs_hf_mini", "gen_vs_naive_mini", "train_vs_hf_mini"} == set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    assert "max logit difference ours vs HF" in out  # identical weights were checked


def test_naive_decoding_runs_only_where_asked(monkeypatch):
    """At 122M one naive batch takes minutes: a size not in --naive must not run it, not even as a check."""
    calls, real = [], bench.naive_generate
    monkeypatch.setattr(bench, "naive_generate", lambda *a: calls.append(1) or real(*a))
    ratios = bench.main(bench.Args(sizes=["mini"], threads=1, batch=2, new_tokens=4, naive=[], compile=[], memory=False))
    assert not calls and "gen_vs_naive_mini" not in ratios


def test_training_step_holds_no_gradients_between_steps(tmp_path):
    """The memory baseline is read between two steps: gradients must be allocated inside the measured step
    (they are part of its growth), not left over from the warm-up."""
    bench.save_hf(bench.SHAPES["mini"], str(tmp_path))
    ours = bench.load_ours(bench.SHAPES["mini"], str(tmp_path))
    hf = bench.HFVideoLLM(ours, str(tmp_path))
    w = bench.workloads(ours, hf, bench.SHAPES["mini"], bench.Args(batch=2, new_tokens=4))
    w["train_ours"](), w["train_hf"]()
    assert all(p.grad is None for m in (ours, hf) for p in m.parameters())


def test_peak_memory_measurement(tmp_path):
    # what bench.peak_mb runs in a fresh process, run here in-process (a fresh interpreter costs seconds)
    bench.save_hf(bench.SHAPES["mini"], str(tmp_path))
    result = queue.Queue()
    bench._peak_child("mini", str(tmp_path), "gen_ours", bench.Args(threads=1, batch=64, new_tokens=32), result)
    assert 0 < result.get() < 500  # the KV cache and logits of 64 rows take some memory, not gigabytes


def test_tiny_shape_is_sfts_default_model():
    a, tiny = sft.Args(), bench.SHAPES["tiny"]
    assert tiny["llm"] == dict(vocab_size=tiny["llm"]["vocab_size"], hidden_size=a.hidden, num_layers=a.layers,
                               num_heads=a.heads, num_kv_heads=a.kv_heads,
                               intermediate_size=(8 * a.hidden // 3 + 7) // 8 * 8)
    assert tiny["vision"] == dict(image_size=a.image_size, patch_size=a.patch, hidden_size=a.vision_hidden,
                                  num_layers=a.vision_layers, num_heads=4, intermediate_size=4 * a.vision_hidden)
    assert tiny["frames"] == a.frames


def test_compiled_samplers_sample_every_token(tmp_path):
    """What `make bench` times under torch.compile (not run above: it costs a minute): our compiled sampler draws
    what our eager one draws, HF's static-cache compiled `generate` samples the full length, and the HF copy it
    compiles leaves the eager one as it was."""
    bench.save_hf(bench.SHAPES["mini"], str(tmp_path))
    ours = bench.load_ours(bench.SHAPES["mini"], str(tmp_path))
    hf = bench.HFVideoLLM(ours, str(tmp_path))
    args = bench.Args(batch=2, new_tokens=4)
    eager, compiled = bench.workloads(ours, hf, bench.SHAPES["mini"], args), \
        bench.workloads(ours, hf, bench.SHAPES["mini"], args, compiled=True)
    assert torch.equal(compiled["gen_ours"](), eager["gen_ours"]())
    assert compiled["gen_hf"]().shape == (2, 4)
    assert not hasattr(hf.llama.forward, "_torchdynamo_orig_callable")  # the eager HF model was not compiled

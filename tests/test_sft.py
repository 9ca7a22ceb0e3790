"""sft.py: curriculum order, loss mask, and resume == an uninterrupted run."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import data
import model as M
import sft

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    data.generate_world(data.WorldArgs(out=str(out), n_sft=4, n_rl=2, n_eval=2, n_text=20, n_captions=2, vocab_size=300))
    return out


def tiny_args(world, out, **kw):
    return sft.Args(train=[str(world / "sft.jsonl"), str(world / "text.jsonl")], tokenizer=str(world / "tokenizer"),
                    out=str(out), hidden=32, layers=1, heads=2, kv_heads=1, vision_hidden=16, vision_layers=2,
                    epochs_short=1, epochs_long=2, batch_size=8, warmup=2, save_every=3, max_len=512, **kw)


def test_curriculum_puts_short_answers_first():
    lens = [1, 30, 2, 3, 40, 1, 25, 2]
    text = [False, False, True, False, False, True, False, False]
    batches = sft.curriculum(lens, text, long_answer_tokens=8, epochs_text=1, epochs_short=2, epochs_long=1,
                             replay=0.0, text_mix=0.0, batch_size=3, seed=0)
    order = {"text": 0, "short": 1, "long": 2}
    stages = [s for s, _ in batches]
    assert stages == sorted(stages, key=order.get)  # text warm-up, then every short batch, then long
    of = lambda stage: sorted(i for s, b in batches if s == stage for i in b)
    assert of("text") == [2, 5] and of("short") == sorted([0, 3, 7] * 2) and of("long") == [1, 4, 6]
    assert batches == sft.curriculum(lens, text, 8, 1, 2, 1, 0.0, 0.0, 3, seed=0)  # fixed by the seed
    mixed = sft.curriculum(lens, text, 8, 0, 1, 0, 0.0, text_mix=0.67, batch_size=3, seed=0)  # 3 video + 2 text
    assert sorted(i for _, b in mixed for i in b) == [0, 2, 3, 5, 7]
    replayed = sft.curriculum(lens, text, 8, 0, 1, 1, replay=1.0, text_mix=0.0, batch_size=3, seed=0)
    long = [i for s, b in replayed if s == "long" for i in b]
    assert sorted(i for i in long if lens[i] > 8) == [1, 4, 6] and len(long) == 6


def test_length_grouping_keeps_every_example_and_cuts_padding():
    g = random.Random(1)
    lens = [1] * 64  # every example short-answer, no text: one stage
    tokens = [g.choice([40, 180]) + g.randrange(10) for _ in lens]  # text records beside packed clips
    args = dict(text_only=[False] * 64, long_answer_tokens=8, epochs_text=0, epochs_short=2, epochs_long=0,
                replay=0.0, text_mix=0.0, batch_size=4, seed=0)
    plain = sft.curriculum(lens, **args)
    grouped = sft.curriculum(lens, **args, lengths=tokens, group=8)
    assert sorted(i for _, b in grouped for i in b) == sorted(i for _, b in plain for i in b) == sorted(list(range(64)) * 2)
    assert all(len(b) == 4 for _, b in grouped)
    padded = lambda batches: sum(max(tokens[i] for i in b) * len(b) for _, b in batches)
    assert padded(grouped) < 0.75 * padded(plain)  # mostly one kind per batch
    for epoch in (grouped[:16], grouped[16:]):  # each epoch holds every example once
        assert sorted(i for _, b in epoch for i in b) == list(range(64))


def test_loss_covers_only_assistant_tokens():
    torch.manual_seed(0)
    cfg = M.VLMConfig(vision=M.VisionConfig(image_size=16, patch_size=8, hidden_size=16, num_layers=2, num_heads=2,
                                            intermediate_size=32),
                      llm=M.LLMConfig(vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                                      intermediate_size=32), num_frames=2)
    m = M.VideoLLM(cfg)
    ids = torch.randint(5, 40, (2, 9))
    labels = torch.full_like(ids, -100)
    labels[0, 6:] = ids[0, 6:]
    labels[1, 3:5] = ids[1, 3:5]
    mask = torch.ones_like(ids)
    loss, n = sft.sft_loss(m, ids, mask, labels, None)
    logits = m.logits(m(ids, mask))
    terms = [F.cross_entropy(logits[b, t - 1], ids[b, t]) for b, t in [(0, 6), (0, 7), (0, 8), (1, 3), (1, 4)]]
    assert n == 5 and torch.allclose(loss, torch.stack(terms).sum(), atol=1e-5)


def test_resume_equals_uninterrupted_run(world, tmp_path, monkeypatch):
    sft.main(tiny_args(world, tmp_path / "full"))
    full = M.load_pretrained(str(tmp_path / "full" / "model"))

    calls, real_loss = [0], sft.sft_loss

    def crash_at_step_5(*a, **kw):  # an interruption after the step-3 resume checkpoint, mid-run
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real_loss(*a, **kw)

    monkeypatch.setattr(sft, "sft_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        sft.main(tiny_args(world, tmp_path / "cut"))
    monkeypatch.setattr(sft, "sft_loss", real_loss)
    assert not (tmp_path / "cut" / "model").exists() and (tmp_path / "cut" / "resume.pt").exists()
    sft.main(tiny_args(world, tmp_path / "cut", resume=True))
    resumed = M.load_pretrained(str(tmp_path / "cut" / "model"))
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == list(range(1, len(steps) + 1))  # every step logged once
    assert not (tmp_path / "cut" / "resume.pt").exists()
    assert data.load_tokenizer(str(tmp_path / "cut" / "model")).pad_token_id == resumed.cfg.pad_token_id


def test_lora_trains_a_from_scratch_tower_unless_frozen(world, tmp_path):
    """add_lora freezes every weight but the adapters: the vision tower must be switched back on by hand."""
    for freeze in (False, True):
        out = tmp_path / str(freeze)
        sft.main(tiny_args(world, out, lora_r=2, freeze_vision=freeze))
        torch.manual_seed(0)  # main's seed: the same random initial tower
        before = sft.build_model(tiny_args(world, out), data.load_tokenizer(str(world / "tokenizer")))
        after = M.load_pretrained(str(out / "model"))
        key = "embeddings.patch_embedding.weight"
        moved = not torch.equal(before.vision.state_dict()[key], after.vision.state_dict()[key])
        assert moved != freeze


def test_init_from_our_checkpoint_refuses_another_frame_count(world, tmp_path):
    """One temporal video token per frame: fine-tuning our checkpoint with another --frames would silently keep
    the checkpoint's count (the flag ignored), so it is refused with the count to pass."""
    sft.main(tiny_args(world, tmp_path / "a", frames=4))
    with pytest.raises(ValueError, match=r"--frames 8, but .* was trained with 4 frames per video: pass --frames 4"):
        sft.main(tiny_args(world, tmp_path / "b", init=str(tmp_path / "a" / "model")))

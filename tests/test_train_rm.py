"""train_rm.py: Bradley-Terry loss by hand, the RM input, the split by video, padding-independent scores,
video paths, normalisation stored in the checkpoint, resume == an uninterrupted run, and no oracle in training."""
import json
import math
import random
import shutil

import pytest
import torch

import data
from conftest import tiny_world
import model as M
import train_rm as rm

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, a random SFT checkpoint, and a prefs folder (prefs.jsonl + oracle.jsonl) made by hand:
    the true answer against a perturbed one, in random positions, as make_prefs would write them."""
    root = tmp_path_factory.mktemp("world")
    tok = tiny_world(root, n_sft=4, n_rl=6, n_eval=2)
    rng, prefs, oracle = random.Random(0), [], []
    truth = {r["id"]: r["answer"] for _, r in data.read_records(root / "shapes" / "truth" / "rl_answers.jsonl")}
    for i, (_, p) in enumerate(data.read_records(root / "shapes" / "rl.jsonl")):
        right, wrong = truth[p["id"]], data.perturb(p["type"], p["question"], truth[p["id"]], rng)
        pref = 1 + i % 2
        a1, a2 = (right, wrong) if pref == 1 else (wrong, right)
        prefs.append({"id": p["id"], "pair": 0, "video": p["video"], "question": p["question"], "type": p["type"],
                      "answer_1": a1, "answer_2": a2, "preference": pref, "confidence": 0.9 if i % 3 else 0.6})
        oracle.append({"id": p["id"], "pair": 0, "oracle": 3 - pref if i % 3 == 1 else pref})  # the judge erred on some
    (root / "prefs").mkdir()
    (root / "prefs" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    (root / "prefs" / "oracle.jsonl").write_text("".join(json.dumps(r) + "\n" for r in oracle))
    return root


def args(world, out, **kw):
    return rm.Args(**{**dict(prefs=str(world / "prefs" / "prefs.jsonl"), video_root=str(world / "shapes"),
                             sft=str(world / "sft"), out=str(out), holdout=0.25, batch_size=2, save_every=3,
                             min_confidence=0.5, device="cpu"), **kw})


def test_bt_loss_by_hand():
    r1, r2, pref = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([1, 2])
    # -log sigmoid(r_preferred - r_rejected) = log(1 + exp(-(margin))); margins 1 and 2
    nll = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    assert rm.bt_loss(r1, r2, pref).item() == pytest.approx(nll + 1e-3 * abs((1 + 0 + 0 + 2) / 2))
    wrong = rm.bt_loss(r1, r2, torch.tensor([2, 1])).item()  # swapped labels: margins -1 and -2
    assert wrong == pytest.approx((math.log(1 + math.e) + math.log(1 + math.e ** 2)) / 2 + 1.5e-3)
    assert rm.accuracy(r1, r2, pref) == 1.0 and rm.accuracy(r1, r2, torch.tensor([2, 2])) == 0.5
    assert rm.bt_loss(-r2, -r1, torch.tensor([1, 2])).item() == pytest.approx(nll + 1.5e-3)  # centring: |mean|


def test_rm_input_is_conversation_eos_and_suffix(world):
    tok = data.load_tokenizer(str(world / "sft"))
    prompt, _ = data.encode(tok, [(f"{data.VIDEO}\nWhat colour is the circle?", None)], 7)
    answer = tok(" red", add_special_tokens=False).input_ids
    assert data.rm_input(tok, "What colour is the circle?", "red", 7) == \
           prompt + answer + [tok.eos_token_id] + data.rm_suffix(tok)


def test_split_keeps_videos_whole():
    videos = ["a", "a", "b", "c", "c", "c", "d", "e", "f", "g"]
    held = rm.split_videos(videos, 0.3, 500, seed=0)
    n = sum(v in held for v in videos)
    assert 3 <= n < 3 + 3 and held == rm.split_videos(list(reversed(videos)), 0.3, 500, seed=0)  # order-free
    assert sum(v in rm.split_videos(videos, 0.5, 1, seed=1) for v in videos) <= 3  # capped: one video at most
    assert rm.split_videos(videos, 0.0, 500, seed=0) == set()
    order = rm.batch_order(5, 2, 2, seed=0)
    assert [e for e, _ in order] == [0, 0, 0, 1, 1, 1] and order == rm.batch_order(5, 2, 2, seed=0)
    assert sorted(i for e, b in order if e == 1 for i in b) == [0, 1, 2, 3, 4]


def test_score_reads_last_real_token_whatever_the_padding(world):
    tok = data.load_tokenizer(str(world / "sft"))
    torch.manual_seed(1)
    model = M.load_pretrained(str(world / "sft"), kind="policy", new_head="reward").eval()
    assert model.score_head.bias.item() == 0.0
    n = model.cfg.n_video_tokens
    seqs = [data.rm_input(tok, "How many objects are in the video?", a, n) for a in ("two", "The video shows one object.")]
    video = data.load_video(world / "shapes" / "videos" / "rl_00000.mp4", model.cfg.num_frames, 48)
    videos = torch.stack([video, video])
    with torch.no_grad():
        right = rm.scores(model, seqs, videos, tok.pad_token_id)
        left = rm.scores(model, seqs, videos, tok.pad_token_id, left=True)
        alone = [rm.scores(model, [s], video[None], tok.pad_token_id) for s in seqs]
    assert torch.allclose(right, left, atol=1e-5) and torch.allclose(right, torch.cat(alone), atol=1e-5)
    assert right[0] != right[1]


def test_video_root_must_match_the_prefs_paths(world, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"prefs.jsonl:1: video .*rl_00000.mp4 not found \(video paths are relative to"):
        rm.main(args(world, tmp_path, video_root=str(tmp_path)))
    # by default: the folder of the prompts make_prefs read, from its config.json beside the prefs
    prefs = tmp_path / "prefs"
    prefs.mkdir()
    (prefs / "prefs.jsonl").write_text((world / "prefs" / "prefs.jsonl").read_text())
    (prefs / "config.json").write_text(json.dumps({"prompts": str(world / "shapes" / "rl.jsonl")}))
    assert rm.main(args(world, tmp_path / "out", prefs=str(prefs / "prefs.jsonl"), video_root="", epochs=1))["steps"]


def test_the_oracle_is_measured_never_trained_on(world, tmp_path):
    """The same run without oracle.jsonl next to the pairs trains the same RM: the truth only measures it."""
    (tmp_path / "prefs").mkdir()
    shutil.copy(world / "prefs" / "prefs.jsonl", tmp_path / "prefs")
    with_oracle = rm.main(args(world, tmp_path / "with", epochs=1))
    without = rm.main(args(world, tmp_path / "without", prefs=str(tmp_path / "prefs" / "prefs.jsonl"), epochs=1))
    assert with_oracle["n_oracle"] > 0 and without["n_oracle"] == 0
    x, y = (M.load_pretrained(str(tmp_path / d / "model")).state_dict() for d in ("with", "without"))
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_pairs_past_the_context_window_are_left_out(world, tmp_path):
    """An RM input longer than max_position_embeddings would be read at positions RoPE never trained on."""
    prefs = [json.loads(line) for line in open(world / "prefs" / "prefs.jsonl")]
    prefs[0]["answer_2"] = " ".join(["red"] * 600)  # far past the tiny model's 512 positions
    (tmp_path / "prefs").mkdir()
    (tmp_path / "prefs" / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prefs))
    s = rm.main(args(world, tmp_path / "out", prefs=str(tmp_path / "prefs" / "prefs.jsonl"), epochs=1))
    assert s["n_too_long"] == 1 and s["n_train"] + s["n_heldout"] + s["n_below_confidence"] == len(prefs) - 1


def test_training_normalisation_and_resume(world, tmp_path, monkeypatch):
    s = rm.main(args(world, tmp_path / "full", min_confidence=0.7))
    prefs = data.read_prefs(world / "prefs" / "prefs.jsonl", world / "shapes")
    held = rm.split_videos([r["video"] for r in prefs], 0.25, 500, 0)
    train = [r for r in prefs if r["video"] not in held]
    below = sum(r["confidence"] < 0.7 for r in train)
    assert s["n_heldout"] == len(prefs) - len(train) >= 3 and s["n_train"] == len(train) - below
    assert s["n_below_confidence"] == below > 0
    assert s["n_oracle"] == s["n_heldout"]  # every pair has a verdict
    metrics = [json.loads(l) for l in open(tmp_path / "full" / "metrics.jsonl")]
    assert [m["epoch"] for m in metrics if "heldout_acc" in m] == [0, 1]  # held-out accuracy every epoch
    steps = [m["step"] for m in metrics if "loss" in m]
    assert steps == list(range(1, 2 * math.ceil(s["n_train"] / 2) + 1)) and all(0 <= m["acc"] <= 1 for m in metrics if "loss" in m)

    # normalisation stored in the checkpoint: the saved RM's scores of the training answers have mean 0, std 1
    path = str(tmp_path / "full" / "model")
    cfg, extra = M.load_config(path)
    assert cfg.kind == "reward" and extra["stage"] == "rm" and extra["prompt"] == "rm_suffix"
    assert extra["score_mean"] == s["score_mean"] and extra["score_std"] > 0
    model, tok = M.load_pretrained(path, kind="reward").eval(), data.load_tokenizer(path)
    seqs = [data.rm_input(tok, r["question"], r[f"answer_{i}"], cfg.n_video_tokens) for i in (1, 2) for r in train]
    videos = torch.stack([data.load_video(r["video"], cfg.num_frames, 48) for _ in (1, 2) for r in train])
    with torch.no_grad():
        z = (rm.scores(model, seqs, videos, tok.pad_token_id) - extra["score_mean"]) / extra["score_std"]
    assert abs(z.mean().item()) < 1e-4 and z.std().item() == pytest.approx(1, abs=1e-4)

    # the last held-out numbers by hand, from the saved RM: against the labels, and against the oracle's verdicts
    held_pairs = [r for r in prefs if r["video"] in held]
    oracle = {r["id"]: r["oracle"] for r in map(json.loads, open(world / "prefs" / "oracle.jsonl"))}
    seqs = [data.rm_input(tok, r["question"], r[f"answer_{i}"], cfg.n_video_tokens) for i in (1, 2) for r in held_pairs]
    videos = torch.stack([data.load_video(r["video"], cfg.num_frames, 48) for _ in (1, 2) for r in held_pairs])
    with torch.no_grad():
        r1, r2 = rm.scores(model, seqs, videos, tok.pad_token_id).view(2, -1)
    by_label = rm.accuracy(r1, r2, torch.tensor([r["preference"] for r in held_pairs]))
    by_oracle = rm.accuracy(r1, r2, torch.tensor([oracle[r["id"]] for r in held_pairs]))
    assert (s["heldout_acc"], s["heldout_oracle_agreement"]) == pytest.approx((by_label, by_oracle))
    assert by_oracle != 0.5  # decisive: the oracle's verdicts read the wrong way round would give 1 - by_oracle

    # the first step's loss by hand: the seeded new RM on the first batch, each pair's preferred answer as labelled
    torch.manual_seed(0)
    init = M.load_pretrained(str(world / "sft"), kind="policy", new_head="reward")
    kept = [r for r in train if r["confidence"] >= 0.7]
    b = [kept[i] for i in rm.batch_order(len(kept), rm.Args().epochs, 2, 0)[0][1]]
    seqs = [data.rm_input(tok, r["question"], r[f"answer_{i}"], cfg.n_video_tokens, cfg.system) for i in (1, 2) for r in b]
    videos = torch.stack([data.load_video(r["video"], cfg.num_frames, 48) for _ in (1, 2) for r in b])
    with torch.no_grad():
        r1, r2 = rm.scores(init, seqs, videos, tok.pad_token_id).view(2, -1)
    pref = torch.tensor([r["preference"] for r in b])
    first, swapped = rm.bt_loss(r1, r2, pref).item(), rm.bt_loss(r2, r1, pref).item()
    assert metrics[0]["loss"] == pytest.approx(first, abs=2e-5) and abs(first - swapped) > 1e-4  # direction matters

    calls, real = [0], rm.bt_loss

    def crash_at_step_5(*a, **kw):  # after the step-3 resume checkpoint and the epoch-0 evaluation
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(rm, "bt_loss", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        rm.main(args(world, tmp_path / "cut", min_confidence=0.7))
    assert (tmp_path / "cut" / "resume.pt").exists() and not (tmp_path / "cut" / "model").exists()
    after = []
    monkeypatch.setattr(rm, "bt_loss", lambda *a, **kw: after.append(1) or real(*a, **kw))
    rm.main(args(world, tmp_path / "cut", min_confidence=0.7, resume=True))
    assert len(after) == len(steps) - 3  # it went on from the step-3 resume point, not from the start
    full, resumed = M.load_pretrained(path), M.load_pretrained(str(tmp_path / "cut" / "model"))
    for (k, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k
    cut = [json.loads(l) for l in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [(m["step"], "loss" in m) for m in cut] == [(m["step"], "loss" in m) for m in metrics]  # each once
    assert not (tmp_path / "cut" / "resume.pt").exists()

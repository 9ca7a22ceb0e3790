"""make_prefs.py: verdicts from two-token probabilities averaged over both orders, pairing, the oracle kept apart,
file formats, self context, and resume == an uninterrupted run."""
import json
import re
import shutil
from types import SimpleNamespace

import cv2
import pytest
import torch

import data
import model as M
from conftest import tiny_world
import make_prefs as mp
import ppo
import train_rm

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world (3 rl videos, 6 prompts) and a random policy checkpoint with the world's tokenizer."""
    root = tmp_path_factory.mktemp("world")
    tok = tiny_world(root, n_sft=4, n_rl=3, n_eval=2)
    return root


def args(world, out, **kw):
    return mp.Args(**{**dict(prompts=str(world / "shapes" / "rl.jsonl"), sft=str(world / "sft"), out=str(out),
                             k=2, max_new_tokens=8, batch_size=2, device="cpu"), **kw})


def lines(path):
    return [json.loads(line) for line in open(path)]


def judging(user):
    """(answer shown as A, answer shown as B) from a judging turn."""
    m = re.search(r"Answer A: (.*)\nAnswer B: (.*)\n" + re.escape(data.CRITERIA) + "$", user, re.S)
    return m.group(1), m.group(2)


def test_verdict_averages_both_orders():
    assert mp.verdict(0.9, 0.9) == (pytest.approx(0.5), 1, pytest.approx(0.5))  # always "first": no information
    assert mp.verdict(0.9, 0.1) == (pytest.approx(0.9), 1, pytest.approx(0.9))  # answer_1 in both orders
    assert mp.verdict(0.2, 0.6) == (pytest.approx(0.3), 2, pytest.approx(0.7))


def test_judge_verdict_is_its_likelihood_of_each_answer(world):
    tok = data.load_tokenizer(str(world / "sft"))
    judge = M.load_pretrained(str(world / "sft")).eval()
    users = [f"{data.VIDEO}\n" + data.judge_prompt("Q?", "red", "a blue circle", "ctx"), f"{data.VIDEO}\nQ2?"]
    replies = [["a blue circle", "red"], ["red", ""]]  # two sets of replies to the same two turns
    video = torch.randn(2, judge.cfg.num_frames, 3, judge.cfg.vision.image_size, judge.cfg.vision.image_size)
    with torch.no_grad():
        lp = mp.reply_logprobs(judge, tok, users, replies, video)  # (2, 2): prompts cached, replies right-padded
        assert lp.shape == (2, 2)
        for s, i in [(0, 0), (0, 1), (1, 0), (1, 1)]:  # reference: one unpadded sequence, no cache
            ids, labels = data.encode(tok, [(users[i], replies[s][i])], judge.cfg.n_video_tokens, system=judge.cfg.system)
            logp = judge.logits(judge(torch.tensor([ids]), torch.ones(1, len(ids)), video[i:i + 1]))[0].log_softmax(-1)
            want = sum(logp[t - 1, labels[t]] for t in range(1, len(ids)) if labels[t] != -100)
            assert lp[s, i].item() == pytest.approx(want.item(), abs=1e-4)
        p = mp.prob_a(judge, tok, users[:1], ["red"], ["blue"], video[:1])
        la, lb = mp.reply_logprobs(judge, tok, users[:1], [["red"], ["blue"]], video[:1])[:, 0]
    assert p.item() == pytest.approx(torch.sigmoid(la - lb).item(), abs=1e-5) and 0 < p.item() < 1


def test_pairs_clips_oracle_reference():
    kept, dropped = mp.pairs_of(["The red.", "red", "blue", "green"])  # pair 0 equal after normalising
    assert kept == [(1, "blue", "green")] and dropped == 1
    assert mp.clip_spans(3) == [(0, 1 / 3), (1 / 3, 2 / 3), (2 / 3, 1)]
    assert mp.oracle_verdict("colour", "red", "blue", "blue") == (2, 0.0, 1.0)
    assert mp.oracle_verdict("colour", "red", "green", "blue") == (None, 0.0, 0.0)
    rec = {"id": "x", "pair": 0, "video": "videos/x.mp4", "question": "Q?", "answer_1": "a", "answer_2": "b",
           "preference": 2, "confidence": 0.7}
    assert mp.to_reference(rec) == {"id": "x", "video": "videos/x.mp4",
                                    "conversations": [{"from": "human", "value": "<video>\nQ?"},
                                                      {"from": "gpt", "value": ""}],  # the reference's loader fills it
                                    "output_1": {"value": "a"}, "output_2": {"value": "b"}, "preference": 2}


def test_summary_counts():
    prefs = [{"id": "a", "pair": 0, "type": "colour", "preference": 1, "confidence": 0.9, "p_a": [0.9, 0.1]},
             {"id": "b", "pair": 0, "type": "count", "preference": 1, "confidence": 0.5, "p_a": [0.9, 0.9]},
             {"id": "c", "pair": 0, "type": "count", "preference": 2, "confidence": 0.6, "p_a": [0.4, 0.8]},
             {"id": "d", "pair": 0, "type": "count", "preference": 2, "confidence": 0.6, "p_a": [0.4, 0.8]}]  # no oracle line
    oracle = [{"id": "a", "pair": 0, "oracle": 1}, {"id": "b", "pair": 0, "oracle": 2}, {"id": "c", "pair": 0, "oracle": None}]
    metrics = [{"n_prompts": 2, "n_dropped_identical": 1, "seconds": 1.0}, {"n_prompts": 2, "n_dropped_identical": 0, "seconds": 2.0}]
    s = mp.summarize(prefs, oracle, metrics)
    assert s["n_prompts"] == 4 and s["n_pairs"] == 4 and s["n_dropped_identical"] == 1 and s["seconds"] == 3.0
    assert s["oracle_verdicts"] == 2 and s["agreement"] == 0.5 and s["agreement_by_type"] == {"colour": 1.0, "count": 0.0}
    assert s["orders_disagree"] == pytest.approx(1 / 4) and s["mean_confidence"] == pytest.approx(2.6 / 4)
    assert "agreement" not in mp.summarize(prefs, None, metrics)


def test_position_biased_judge_gives_no_confident_labels(world, tmp_path, monkeypatch):
    """A judge that always prefers the first-shown answer with p=0.9: averaging both orders gives p1 = 0.5."""
    monkeypatch.setattr(mp, "prob_a", lambda judge, tok, users, answers_a, answers_b, videos: torch.full((len(users),), 0.9))
    s = mp.main(args(world, tmp_path))
    prefs = lines(tmp_path / "prefs.jsonl")
    assert prefs and all(p["p1"] == pytest.approx(0.5) and p["confidence"] == pytest.approx(0.5) for p in prefs)
    assert s["orders_disagree"] == 1.0 and s["p_first_shown"] == pytest.approx(0.9)


def test_content_judge_is_confident_and_files_are_clean(world, tmp_path, monkeypatch):
    """A judge preferring the alphabetically first answer in either position labels it, with confidence 0.9."""
    def prefers_first_alphabetically(judge, tok, users, answers_a, answers_b, videos):
        assert [judging(u) for u in users] == list(zip(answers_a, answers_b))  # the answers shown, in order
        return torch.tensor([0.9 if a < b else 0.1 for a, b in zip(answers_a, answers_b)])

    monkeypatch.setattr(mp, "prob_a", prefers_first_alphabetically)
    s = mp.main(args(world, tmp_path))
    prefs = lines(tmp_path / "prefs.jsonl")
    assert len(prefs) + s["n_dropped_identical"] == 6 and s["orders_disagree"] == 0.0
    for p in prefs:
        assert p["preference"] == (1 if p["answer_1"] < p["answer_2"] else 2)
        assert p["confidence"] == pytest.approx(0.9) and p["p1"] == pytest.approx(0.9 if p["preference"] == 1 else 0.1)
        assert p["context"] and p["context_mode"] == "gt" and p["video"].startswith("videos/")
    # the oracle (ground truth) never reaches prefs.jsonl; it is in oracle.jsonl, keyed by (id, pair)
    assert {k for p in prefs for k in p} == {"id", "pair", "video", "question", "type", "answer_1", "answer_2",
                                             "preference", "confidence", "p1", "p_a", "context_mode", "context"}
    truths = {r["answer"] for _, r in data.read_records(world / "shapes" / "truth" / "rl_answers.jsonl")}
    # descriptions are long; a `gt` context is the world's description (the stand-in for a human-written one),
    # which is also the true answer of a describe question: every other field must be free of it
    assert not any(t in json.dumps({k: v for k, v in p.items() if k != "context"}) for p in prefs for t in truths if len(t) > 20)
    oracle = lines(tmp_path / "oracle.jsonl")
    assert [(o["id"], o["pair"]) for o in oracle] == [(p["id"], p["pair"]) for p in prefs]
    assert all(o["oracle"] in (1, 2, None) for o in oracle) and "agreement" in s
    # readable by data.read_prefs with the world as video root; the reference layout round-trips
    ours = data.read_prefs(tmp_path / "prefs.jsonl", world / "shapes")
    ref = data.read_prefs(tmp_path / "prefs_reference.json", world / "shapes")
    for x, y in zip(ours, ref):
        assert data.Path(x["video"]).exists() and x["video"] == y["video"]
        assert [x[k] for k in ("id", "question", "answer_1", "answer_2", "preference")] == \
               [y[k] for k in ("id", "question", "answer_1", "answer_2", "preference")]
    assert json.loads((tmp_path / "summary.json").read_text()) == s


def test_self_context_described_once_per_video(world, tmp_path, monkeypatch):
    calls, real = [], mp.generate_texts

    def counting(model, tok, users, videos, max_new_tokens, temperature, top_p, generator):
        calls.append((temperature, len(users), users[0]))
        return real(model, tok, users, videos, max_new_tokens, temperature, top_p, generator)

    monkeypatch.setattr(mp, "generate_texts", counting)
    mp.main(args(world, tmp_path, context="self", batch_size=3))
    describes = [c for c in calls if c[0] == 0.0]
    assert len(describes) == 3 and all(n == 3 and "Describe the video" in u for _, n, u in describes)  # 3 videos, 3 clips
    by_video = {}
    for p in lines(tmp_path / "prefs.jsonl"):
        assert p["context_mode"] == "self" and by_video.setdefault(p["video"], p["context"]) == p["context"]
    none = mp.main(args(world, tmp_path / "none", context="none"))
    assert none["n_pairs"] and all(p["context"] is None for p in lines(tmp_path / "none" / "prefs.jsonl"))


def test_resume_equals_uninterrupted_run(world, tmp_path, monkeypatch):
    mp.main(args(world, tmp_path / "full"))
    calls, real = [0], mp.generate_texts

    def crash_in_third_batch(*a, **kw):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(mp, "generate_texts", crash_in_third_batch)
    with pytest.raises(KeyboardInterrupt):
        mp.main(args(world, tmp_path / "cut"))
    monkeypatch.setattr(mp, "generate_texts", real)
    cut = tmp_path / "cut"
    assert [m["batch"] for m in lines(cut / "metrics.jsonl")] == [0, 1]
    # what a crash inside batch 2 could leave: a complete pair line of batch 2 and a torn line
    third = data.read_prompts(world / "shapes" / "rl.jsonl")[4]["id"]
    for name in ("prefs", "oracle"):
        with open(cut / f"{name}.jsonl", "a") as f:
            f.write(json.dumps({"id": third, "pair": 0, "oracle": 1}) + "\n" + '{"id": "rl_')
    with pytest.raises(ValueError, match="other arguments.*temperature"):
        mp.main(args(world, cut, resume=True, temperature=0.5))
    with pytest.raises(ValueError, match="other arguments.*batch_size"):  # not an IndexError on done batch 1
        mp.main(args(world, cut, resume=True, batch_size=100))
    after = []
    monkeypatch.setattr(mp, "generate_texts", lambda *a, **kw: after.append(1) or real(*a, **kw))
    mp.main(args(world, cut, resume=True))
    assert len(after) == 1  # batch 2 only: batches 0 and 1 were kept
    for name in ("prefs.jsonl", "oracle.jsonl", "prefs_reference.json"):
        assert (cut / name).read_text() == (tmp_path / "full" / name).read_text(), name
    assert [m["batch"] for m in lines(cut / "metrics.jsonl")] == [0, 1, 2]
    ids = [(p["id"], p["pair"]) for p in lines(cut / "prefs.jsonl")]
    assert len(ids) == len(set(ids))
    # batches appended out of order (torchrun's ranks append as they finish): the end puts them in prompt order
    for name in ("prefs.jsonl", "oracle.jsonl", "metrics.jsonl"):
        (cut / name).write_text("".join((cut / name).read_text().splitlines(keepends=True)[::-1]))
    mp.main(args(world, cut, resume=True))
    for name in ("prefs.jsonl", "oracle.jsonl", "prefs_reference.json"):
        assert (cut / name).read_text() == (tmp_path / "full" / name).read_text(), name
    assert [m["batch"] for m in lines(cut / "metrics.jsonl")] == [0, 1, 2]


def test_sampled_placeholder_text_cannot_become_a_second_video_slot(world, monkeypatch):
    """A sampled answer that spells "<video>" out of ordinary pieces decodes to the placeholder string; placed in
    a judging prompt it would be a second video slot, and encode refuses that, on every --resume alike."""
    tok = data.load_tokenizer(str(world / "sft"))
    policy = M.load_pretrained(str(world / "sft")).eval()
    spelled = tok("x <video> y", add_special_tokens=False, split_special_tokens=True).input_ids
    assert tok.convert_tokens_to_ids(data.VIDEO) not in spelled  # ordinary pieces only
    monkeypatch.setattr(policy, "generate", lambda ids, *a, **kw: (torch.tensor([spelled + [tok.eos_token_id]] * len(ids)), None))
    video = torch.randn(1, policy.cfg.num_frames, 3, policy.cfg.vision.image_size, policy.cfg.vision.image_size)
    [answer] = mp.generate_texts(policy, tok, [f"{data.VIDEO}\nQ?"], video, 8, 1.0, 1.0, None)
    assert answer == "x video y"
    judging_turn = lambda ans: f"{data.VIDEO}\n" + data.judge_prompt("Q?", ans, "red", "ctx")
    data.encode(tok, [(judging_turn(answer), None)], policy.cfg.n_video_tokens)  # one slot: fine
    with pytest.raises(ValueError, match="at most one <video> placeholder"):
        data.encode(tok, [(judging_turn("x <video> y"), None)], policy.cfg.n_video_tokens)


def test_video_root_for_prompts_with_bare_file_names(world, tmp_path):
    """rl.jsonl naming its videos relative to another folder (--video_root): pairs keep those names, and
    train_rm finds the videos through make_prefs' config."""
    bare = tmp_path / "rl.jsonl"
    bare.write_text("".join(json.dumps({**r, "video": r["video"].split("/", 1)[1]}) + "\n"
                            for _, r in data.read_records(world / "shapes" / "rl.jsonl")))
    with pytest.raises(FileNotFoundError, match="not found"):
        data.read_prompts(str(bare))
    a = args(world, tmp_path / "prefs", prompts=str(bare), video_root=str(world / "shapes" / "videos"), limit=2,
             truth=str(world / "shapes" / "truth" / "rl_answers.jsonl"))
    mp.main(a)
    rows = lines(tmp_path / "prefs" / "prefs.jsonl")
    assert rows and all("/" not in r["video"] for r in rows)
    train_rm.main(train_rm.Args(prefs=str(tmp_path / "prefs" / "prefs.jsonl"), sft=str(world / "sft"), out=str(tmp_path / "rm"),
                                holdout=0.0, min_confidence=0.5, epochs=1, batch_size=2, device="cpu"))  # no --video_root
    assert (tmp_path / "rm" / "model" / "config.json").exists()


def test_the_references_prompt_file_with_frame_lists_runs_through_prefs_and_the_rm(world, tmp_path):
    """The reference's PPO prompts: `uid`, frames as an `images` list, the question as the human turn. Pairs keep
    the frame list (relative), train_rm reads it back, and ppo trains on the same prompt file."""
    truth, refs = {}, []
    for _, r in list(data.read_records(world / "shapes" / "rl.jsonl"))[:2]:
        frames = data._read_frames(world / "shapes" / r["video"], 4)
        names = [f"frames/{r['id']}_{i}.png" for i in range(len(frames))]
        (tmp_path / "frames").mkdir(exist_ok=True)
        for name, f in zip(names, frames):
            cv2.imwrite(str(tmp_path / name), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
        refs.append({"uid": r["id"], "images": names, "conversations": [{"from": "human", "value": f"<image>\n{r['question']}"}],
                     "type": r["type"], "description": r["description"]})
    (tmp_path / "rl.json").write_text(json.dumps(refs))
    mp.main(args(world, tmp_path / "prefs", prompts=str(tmp_path / "rl.json"), truth=str(world / "shapes" / "truth" / "rl_answers.jsonl")))
    rows = lines(tmp_path / "prefs" / "prefs.jsonl")
    assert rows and all(isinstance(r["video"], list) and r["video"][0].startswith("frames/") for r in rows)
    s = train_rm.main(train_rm.Args(prefs=str(tmp_path / "prefs" / "prefs.jsonl"), sft=str(world / "sft"),
                                    out=str(tmp_path / "rm"), holdout=0.0, min_confidence=0.5, epochs=1, batch_size=2, device="cpu"))
    assert s["n_train"] + s["n_below_confidence"] == len(rows)
    ppo.main(ppo.Args(prompts=str(tmp_path / "rl.json"), sft=str(world / "sft"), rm=str(tmp_path / "rm" / "model"),
                      out=str(tmp_path / "ppo"), iterations=1, rollout_batch=2, minibatch=2, max_new_tokens=4))
    assert (tmp_path / "ppo" / "model" / "config.json").exists()  # PPO reads the same prompt file


def test_pairs_too_long_for_the_judge_get_no_verdict(world, tmp_path):
    """A judging turn past the judge's context window (RoPE at positions never trained) is dropped and counted;
    the pairs that fit are judged exactly as before. The context is set between the pairs' judging lengths."""
    full = mp.main(args(world, tmp_path / "full", context="none"))
    tok, cfg = data.load_tokenizer(str(world / "sft")), M.load_config(str(world / "sft"))[0]
    prefs = lines(tmp_path / "full" / "prefs.jsonl")
    length = {(p["id"], p["pair"]): max(len(data.encode(tok, [(f"{data.VIDEO}\n" + data.judge_prompt(
        p["question"], p["answer_1"], p["answer_2"]), r)], cfg.n_video_tokens, system=cfg.system)[0])
        for r in (p["answer_1"], p["answer_2"])) for p in prefs}
    window = sorted(length.values())[len(length) // 2]
    assert min(length.values()) <= window < max(length.values())  # some pairs fit, some do not
    short = tmp_path / "short_context"
    shutil.copytree(world / "sft", short)
    config = json.loads((short / "config.json").read_text())
    config["llm"]["max_position_embeddings"] = window
    (short / "config.json").write_text(json.dumps(config))
    s = mp.main(args(world, tmp_path / "cut", context="none", sft=str(short)))
    kept, want = lines(tmp_path / "cut" / "prefs.jsonl"), [p for p in prefs if length[p["id"], p["pair"]] <= window]
    fields = ("id", "pair", "answer_1", "answer_2", "preference")  # the same pairs; verdicts up to float rounding
    assert [[p[k] for k in fields] for p in kept] == [[p[k] for k in fields] for p in want]
    assert [p["p1"] for p in kept] == pytest.approx([p["p1"] for p in want], abs=1e-5)
    assert s["n_dropped_too_long"] == len(prefs) - len(kept) > 0 and full["n_dropped_too_long"] == 0
    assert s["n_dropped_identical"] == full["n_dropped_identical"]

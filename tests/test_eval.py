"""eval.py: scoring functions on hand-written cases, the prior baseline, and an end-to-end run on a tiny world."""
import json

import pytest
import torch

import data
from conftest import tiny_world
import eval as ev
import model as M
from model import VideoLLM

torch.set_num_threads(1)  # tiny tensors: threads only add sync overhead

TRUTH = "The video shows two objects. A red circle moves left. Later, a blue square appears and stays still."


def test_normalize_and_exact_match():
    assert data.normalize("  The Red  circle. ") == "red circle"
    assert data.normalize("An apple, a pear!") == "apple pear"
    assert data.score_answer("colour", "the red circle", "Red circle.") == 1.0  # paraphrase with article and punctuation
    assert data.score_answer("colour", "Yes.", "yes") == 1.0
    assert data.score_answer("colour", "red square", "red circle") == 0.0
    assert data.score_answer("colour", "there", "here") == 0.0  # articles dropped as words only, not inside words


def test_slot_f1():
    assert data.slot_f1(TRUTH, TRUTH) == 1.0
    assert data.slot_f1(TRUTH.lower().replace(".", ""), TRUTH) == 1.0  # case and punctuation do not matter
    assert data.slot_f1("", "") == 1.0
    assert data.slot_f1("I do not know.", TRUTH) == 0.0
    assert data.slot_f1(TRUTH, "nothing stated") == 0.0
    # truth slots: count, 2 objects, 2 motions, 1 appear = 6
    wrong_dir = TRUTH.replace("moves left", "moves right")  # 5 of 6 slots right on both sides
    assert data.slot_f1(wrong_dir, TRUTH) == pytest.approx(5 / 6)
    missing = "The video shows two objects. A red circle moves left."  # 3 slots, all true: P 1, R 1/2
    assert data.slot_f1(missing, TRUTH) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert data.score_answer("describe", missing, TRUTH) == data.slot_f1(missing, TRUTH)
    assert data.score_answer("colour", "Red.", "red") == 1.0
    both = TRUTH + " The video shows three objects."  # a second, contradicting count is a false fact: P 6/7
    assert data.slot_f1(both, TRUTH) == pytest.approx(2 * (6 / 7) / (6 / 7 + 1))


def test_numeric_question_types_are_named_as_text():
    """ActivityNet-QA numbers its question types (0-8): the table sorts them among named ones, as text."""
    types = [ev.qtype_of({"type": t}) for t in (3, "colour", 0)]
    assert types == ["3", "colour", "0"] and ev.ordered(types) == ["colour", "0", "3"]
    assert ev.qtype_of({"types": ["count", 2]}) == "2" and ev.qtype_of({}) == "other"
    assert ev.prior_answers([{"types": [3, 3], "turns": [("q", "two"), ("q2", "two")]}]) == {"3": "two"}  # keyed alike


def test_prior_answers_and_summary(tmp_path):
    rows = [("colour", "red"), ("colour", "blue"), ("colour", "blue"), ("count", "two"), ("count", "one")]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "type": t, "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": a}]}) + "\n" for i, (t, a) in enumerate(rows)))
    assert ev.prior_answers(data.read_conversations(path)) == {"colour": "blue", "count": "one"}  # tie: alphabetical
    with open(path, "a") as f:  # a packed multi-turn record counts each turn under its own type
        f.write(json.dumps({"id": "m", "type": "qa", "types": ["count", "colour", "count"], "conversations": [
            {"from": h, "value": v} for q, a in [("q", "two"), ("q", "red"), ("q", "two")] for h, v in [("human", q), ("gpt", a)]]}) + "\n")
    assert ev.prior_answers(data.read_conversations(path)) == {"colour": "blue", "count": "two"}
    assert ev.qtype_of(data.read_conversations(path)[-1]) == "count"  # eval asks its last question: scored as that
    s = ev.summarize(["colour", "colour", "colour", "order"], [1.0, 1.0, 0.0, 0.0])
    assert s["by_type"] == {"colour": pytest.approx(2 / 3), "order": 0.0} and s["n"] == 4
    assert list(ev.summarize(["zzz", "order", "colour"], [0, 0, 0])["by_type"]) == ["colour", "order", "zzz"]
    assert s["accuracy"] == pytest.approx(1 / 3) and s["accuracy_micro"] == 0.5  # macro vs micro


def test_model_name_merge_and_cli():
    assert ev.model_name("runs/x/sft") == ("sft", "runs/x/sft")
    assert ev.model_name("base=runs/x/sft/") == ("base", "runs/x/sft/")
    assert ev.model_name("runs/lr=1e-4/ppo") == ("ppo", "runs/lr=1e-4/ppo")
    assert ev.model_name("runs/tiny/sft/model") == ("sft", "runs/tiny/sft/model")  # a stage's checkpoint
    old = ev.merge_results(None, {"a": 1, "b": 2}, {"t": 0})
    assert ev.merge_results(old, {"b": 3, "c": 4}, {"t": 0})["models"] == {"a": 1, "b": 3, "c": 4}
    with pytest.raises(ValueError, match="another --out"):
        ev.merge_results(old, {"c": 4}, {"t": 0.2})
    old = ev.merge_results(None, {"a": 1, "a_bo6": 2, "a_bo6_logp": 3, "a_bo6_pi": 4, "ab_bo6": 5}, {"t": 0})
    assert ev.merge_results(old, {"a": 6}, {"t": 0})["models"] == {"a": 6, "ab_bo6": 5}  # a's old best-of rows go
    args = data.parse_args(ev.Args, ["--models", "a", "b=c", "--temperature", "0.2", "--limit", "5"])
    assert args.models == ["a", "b=c"] and args.temperature == 0.2 and args.limit == 5 and args.batch_size == 32


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny generated world and a random checkpoint with the world's tokenizer."""
    root = tmp_path_factory.mktemp("world")
    tok = tiny_world(root, n_sft=3, n_rl=2, n_eval=3, vocab_size=300)
    return root


def test_end_to_end_two_models_merge_and_batching(world):
    shapes, ckpt, out = world / "shapes", str(world / "sft"), world / "eval"
    base = dict(data=str(shapes / "eval.jsonl"), prior_data=str(shapes / "sft.jsonl"), out=str(out),
                max_new_tokens=6, limit=12, device="cpu")
    res = ev.main(ev.Args(models=[f"a={ckpt}", f"b={ckpt}"], batch_size=5, **base))
    assert list(res["models"]) == ["prior", "a", "b"]
    assert res["settings"]["temperature"] == 0.0 and res["settings"]["limit"] == 12
    types = {r["type"] for r in data.read_conversations(shapes / "eval.jsonl")[:12]}
    for m in res["models"].values():
        assert set(m) == {"accuracy", "accuracy_micro", "by_type", "n", "source"} and m["n"] == 12
        assert set(m["by_type"]) == types and all(0 <= v <= 1 for v in m["by_type"].values())
        assert m["accuracy"] == pytest.approx(sum(m["by_type"].values()) / len(types))
    assert res["models"]["a"] == res["models"]["b"] and res["models"]["a"]["source"] == str(ckpt)  # same checkpoint
    assert json.loads((out / "results.json").read_text()) == res
    assert json.loads((out / "config.json").read_text())["models"] == [f"a={ckpt}", f"b={ckpt}"]
    preds = [json.loads(line) for line in (out / "predictions_a.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and set(preds[0]) == {"id", "type", "video", "question", "truth", "prediction", "score"}
    assert "<video>" not in preds[0]["question"]
    prior = [json.loads(line) for line in (out / "predictions_prior.jsonl").read_text().splitlines()]
    sft = data.read_conversations(shapes / "sft.jsonl")
    answers = {(t, a) for r in sft for t, (_, a) in zip(r.get("types") or [r["type"]] * len(r["turns"]), r["turns"])}
    for p in prior:  # a training answer of the same type, or empty for a type training lacks
        assert (p["type"], p["prediction"]) in answers or p["prediction"] == ""

    # a second run in the same folder adds its model and keeps the others; one prompt per batch gives the
    # same greedy answers as 5 left-padded ones (the padding is masked out)
    res2 = ev.main(ev.Args(models=[f"c={ckpt}"], batch_size=1, **base))
    assert list(res2["models"]) == ["prior", "a", "b", "c"] and res2["models"]["c"] == res["models"]["a"]
    assert (out / "predictions_c.jsonl").read_text() == (out / "predictions_a.jsonl").read_text()

    # other decoding settings would make the table incomparable: refused
    with pytest.raises(ValueError, match="another --out"):
        ev.main(ev.Args(models=[f"d={ckpt}"], **{**base, "temperature": 0.2}))


def test_sampling_is_seeded(world):
    shapes, ckpt = world / "shapes", str(world / "sft")
    runs = [ev.main(ev.Args(models=[f"s={ckpt}"], data=str(shapes / "eval.jsonl"), prior_data=str(shapes / "sft.jsonl"),
                            out=str(world / f"sampled{i}"), temperature=0.2, max_new_tokens=4, limit=6, device="cpu"))
            for i in range(2)]
    assert (world / "sampled0" / "predictions_s.jsonl").read_text() == \
           (world / "sampled1" / "predictions_s.jsonl").read_text()
    assert runs[0]["settings"]["temperature"] == 0.2
    # under torchrun each rank's share starts at its own place in the eval: its own stream, not rank 0's again
    records = data.read_conversations(shapes / "eval.jsonl")[:6]
    args = ev.Args(temperature=1.0, max_new_tokens=6, device="cpu")
    answer = lambda first: ev.generate_answers("s", ckpt, records, args, first=first)
    assert answer(0) == answer(0) != answer(6)


def test_answer_is_cut_at_first_eos_and_scored(world, monkeypatch):
    """A stand-in model that always replies ' green</s> blue': the prediction is 'green', right on green questions."""
    tok = data.load_tokenizer(str(world / "sft"))
    green, blue = (tok(w, add_special_tokens=False).input_ids for w in (" green", " blue"))
    reply = green + [tok.eos_token_id] + blue

    def fake_generate(self, ids, mask, videos, max_new_tokens, temperature, generator=None):
        assert bool(mask[:, -1].all()) and videos.shape[0] == ids.shape[0]  # left-padded, one video per row
        return torch.tensor([reply] * ids.shape[0]), torch.zeros(ids.shape[0], len(reply))

    monkeypatch.setattr(VideoLLM, "generate", fake_generate)
    shapes = world / "shapes"
    ev.main(ev.Args(models=[f"green={world / 'sft'}"], data=str(shapes / "eval.jsonl"),
                    prior_data=str(shapes / "sft.jsonl"), out=str(world / "fake"), limit=12, device="cpu"))
    preds = [json.loads(line) for line in (world / "fake" / "predictions_green.jsonl").read_text().splitlines()]
    assert {p["prediction"] for p in preds} == {"green"}
    assert all(p["score"] == float(p["truth"] == "green") for p in preds if p["type"] != "describe")
    assert sum(p["score"] for p in preds) >= 1


def test_untyped_free_form_answers_score_word_f1(world, tmp_path, monkeypatch):
    """Records without a type (the reference's eval files): a paraphrase gets partial credit, not exact match's 0."""
    video = next((world / "shapes" / "videos").iterdir()).name
    conv = lambda q, a: {"video": f"videos/{video}", "conversations": [{"from": "human", "value": q},
                                                                       {"from": "gpt", "value": a}]}
    (world / "shapes" / "free.jsonl").write_text("\n".join(json.dumps(conv(q, a)) for q, a in
                                                          [("What happens?", "a man plays the guitar"),
                                                           ("Who sings?", "the girl")]))
    replies = ["A man is playing the guitar.", "The girl!"]
    monkeypatch.setattr(ev, "generate_answers", lambda name, path, recs, args, **k: (replies[:len(recs)], [0.0] * len(recs)))
    res = ev.main(ev.Args(models=[f"m={world / 'sft'}"], data=str(world / "shapes" / "free.jsonl"), prior_data="",
                          out=str(tmp_path / "out"), device="cpu"))
    # words {man, is, playing, guitar} against {man, plays, guitar}: P 2/4, R 2/3, F1 4/7; then an exact paraphrase
    assert res["models"]["m"]["by_type"]["other"] == pytest.approx((4 / 7 + 1) / 2)


def test_best_of_n_keeps_the_answer_the_rm_prefers(world, monkeypatch):
    """Samples cycle through red, green, blue with log pi -3, -1.2, -0.5 and normalised RM scores 2.5, 1, 0 (raw
    22.5, 15, 10 with the RM's mean 10 and std 5): the bo rows keep red (the RM's best), the logp rows green (sums
    -0.5, -0.2, -0.5; red with raw scores), the pi rows blue (log pi's best)."""
    tok = data.load_tokenizer(str(world / "sft"))
    words = [tok(" " + w, add_special_tokens=False).input_ids for w in ("red", "green", "blue")]
    width = max(map(len, words)) + 1

    def fake_generate(self, ids, mask, videos, max_new_tokens, temperature, generator=None):
        rows = [words[i % 3] + [tok.eos_token_id] * (width - len(words[i % 3])) for i in range(ids.shape[0])]
        logp = torch.zeros(ids.shape[0], width)
        logp[:, 0] = torch.tensor([(-3.0, -1.2, -0.5)[i % 3] for i in range(ids.shape[0])])
        return torch.tensor(rows), logp

    def fake_reward(self, ids, mask, videos=None):  # by the answer (the first assistant turn)
        answer = lambda row: tok.decode(row, skip_special_tokens=True).split("ASSISTANT:")[1].split("USER:")[0]
        normalised = {"red": 2.5, "green": 1.0, "blue": 0.0}
        return torch.tensor([10 + 5 * normalised[answer(row).strip()] for row in ids.tolist()])

    rm_dir = world / "rm_bo"
    M.save_checkpoint(M.load_pretrained(str(world / "sft"), new_head="reward"), tok, str(rm_dir),
                      extra_config={"stage": "rm", "score_mean": 10.0, "score_std": 5.0})
    monkeypatch.setattr(VideoLLM, "generate", fake_generate)
    monkeypatch.setattr(VideoLLM, "reward", fake_reward)
    shapes, out = world / "shapes", world / "bo"
    res = ev.main(ev.Args(models=[f"c={world / 'sft'}"], data=str(shapes / "eval.jsonl"), prior_data="", out=str(out),
                          rm=str(rm_dir), best_of=3, batch_size=6, limit=5, device="cpu"))
    assert list(res["models"]) == ["c", "c_bo3", "c_bo3_logp", "c_bo3_pi"]
    assert res["models"]["c_bo3_pi"]["source"] == f"{world / 'sft'}, best of 3 by {rm_dir}"  # which RM made the row
    pred = lambda name: {json.loads(line)["prediction"] for line in (out / f"predictions_{name}.jsonl").open()}
    assert pred("c_bo3") == {"red"} and pred("c_bo3_logp") == {"green"} and pred("c_bo3_pi") == {"blue"}
    assert all(m["n"] == 5 for m in res["models"].values())  # one kept answer per question, none dropped


def test_an_rm_whose_window_cannot_hold_the_answers_is_refused_before_sampling(world, monkeypatch):
    """--rm scores question + answer + evaluation prompt: past the RM's window RoPE reads untrained positions. The
    bound (longest question, --max_new_tokens) is checked before any model answers."""
    tok, cfg = data.load_tokenizer(str(world / "sft")), M.load_config(str(world / "sft"))[0]
    records = data.read_conversations(world / "shapes" / "eval.jsonl")[:5]
    longest = max(len(data.rm_input(tok, data.question_text(r["turns"][-1][0]), "", cfg.n_video_tokens, cfg.system))
                  for r in records)
    rm_dir = world / "rm_window"
    M.save_checkpoint(M.load_pretrained(str(world / "sft"), new_head="reward"), tok, str(rm_dir),
                      extra_config={"stage": "rm", "score_mean": 0.0, "score_std": 1.0})
    sampled = []
    def short_answers(self, ids, *a, **k):  # "red" then EOS (a random model's long answers would re-tokenize longer)
        sampled.append(ids.shape[0])
        red = tok(" red", add_special_tokens=False).input_ids + [tok.eos_token_id]
        return torch.tensor([red] * ids.shape[0]), torch.zeros(ids.shape[0], len(red))
    monkeypatch.setattr(VideoLLM, "generate", short_answers)
    base = dict(models=[f"c={world / 'sft'}"], data=str(world / "shapes" / "eval.jsonl"), prior_data="", rm=str(rm_dir),
                limit=5, device="cpu")
    with pytest.raises(ValueError, match=f"take {513} tokens as the RM reads them, over its context window of 512"):
        ev.main(ev.Args(out=str(world / "too_long"), max_new_tokens=512 - longest + 1, **base))
    first = json.loads((world / "shapes" / "eval.jsonl").read_text().splitlines()[0])  # ids 5 and "mixed-1": both
    mixed = world / "shapes" / "mixed.jsonl"  # as long, and not comparable with each other
    mixed.write_text(json.dumps({**first, "id": 5}) + "\n" + json.dumps({k: v for k, v in first.items() if k != "id"}) + "\n")
    with pytest.raises(ValueError, match="record 5: its question"):
        ev.main(ev.Args(**{**base, "data": str(mixed)}, out=str(world / "too_long"), max_new_tokens=500))
    assert not (world / "too_long").exists() and not sampled
    res = ev.main(ev.Args(out=str(world / "fits"), max_new_tokens=512 - longest, best_of=2, **base))  # fits: runs
    assert list(res["models"]) == ["c", "c_bo2", "c_bo2_logp", "c_bo2_pi"]


def test_table_is_fixed_width_in_qtypes_order():
    results = {"prior": ev.summarize(["order", "colour"], [0.5, 1.0]),
               "a_long_name": ev.summarize(["colour"], [0.25])}
    lines = ev.table(results).splitlines()
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert lines[0].split() == ["model", "colour", "order", "overall", "micro"]
    assert lines[1].split() == ["prior", "100.0", "50.0", "75.0", "75.0"]
    assert lines[2].split() == ["a_long_name", "25.0", "-", "25.0", "25.0"]  # a type the model was not asked


# ----------------------------------------------------------------------------- benchmarks and judges
def test_parse_reply_reads_the_usual_replies():
    assert ev.parse_reply("{'score': 4}") == {"score": 4.0}
    assert ev.parse_reply('Sure. {"score": 3.5} is my grade') == {"score": 3}  # JSON quoting; truncated, as the reference
    assert ev.parse_reply("{'pred': 'Yes.', 'score': 4.8}", qa=True) == {"pred": "yes", "score": 4}  # the reference's reading
    assert ev.parse_reply("Score: 4") == {"score": 4.0}
    assert ev.parse_reply("{'pred': 'yes', 'score': 5}", qa=True) == {"pred": "yes", "score": 5.0}
    assert ev.parse_reply("{'pred': 'No', 'score': '1'}", qa=True) == {"pred": "no", "score": 1.0}
    assert ev.parse_reply("pred: no, score = 2", qa=True) == {"pred": "no", "score": 2.0}
    assert ev.parse_reply("Yes. Score: 4", qa=True) == {"pred": "yes", "score": 4.0}
    for bad in ["", "The answer is good.", "{'score': 7}", "{'score': -1}", "{'score': 'high'}", "{score: }"]:
        assert ev.parse_reply(bad) is None, bad
    assert ev.parse_reply("{'score': 4}", qa=True) is None  # zero-shot QA needs the yes/no verdict too
    assert ev.parse_reply("{'pred': 'maybe', 'score': 3}", qa=True) is None
    assert ev.parse_reply("{'pred': None, 'score': 2}", qa=True) is None  # not "none", which contains "no"
    assert ev.parse_reply("Score (0-5): 3") == ev.parse_reply("Score [0-5]: 3") == {"score": 3.0}  # not the 0
    assert ev.parse_reply("Score: -1") is None  # out of range, not read as 1
    assert ev.parse_reply("Format: {'score': 0}. My grade: {'score': 4}") == {"score": 4.0}  # the last dict
    assert ev.parse_reply("Yes, they differ. pred: no, score: 1", qa=True) == {"pred": "no", "score": 1.0}


def test_rule_judge_by_hand():
    item = {"type": "describe", "truth": TRUTH, "questions": ["Describe it."]}
    missing = "The video shows two objects. A red circle moves left."  # 3 of the truth's 6 facts, none wrong
    assert ev.rule_judge("correctness", item, [missing])[0]["score"] == pytest.approx(5 * data.slot_f1(missing, TRUTH))
    assert ev.rule_judge("detail", item, [missing])[0]["score"] == pytest.approx(2.5)  # recall 3/6
    assert ev.rule_judge("context", item, [missing])[0]["score"] == 5  # precision: nothing made up
    short = {"type": "colour", "truth": "red", "questions": ["q1", "q2"]}
    assert ev.rule_judge("consistency", short, ["Red.", "red"])[0]["score"] == 5
    assert ev.rule_judge("consistency", short, ["red", "blue"])[0]["score"] == 0  # one phrasing wrong
    assert ev.rule_judge("qa", short, ["the red"])[0] == {"score": 5, "pred": "yes"}
    assert ev.rule_judge("qa", short, ["red circle"])[0] == {"score": 0, "pred": "no"}
    free = {"type": "other", "truth": "a man plays the guitar", "questions": ["q"]}  # official files: no type
    assert ev.rule_judge("correctness", free, ["man playing guitar"])[0]["score"] == pytest.approx(5 * 2 / 3)  # 2 of 3 words
    assert ev.rule_judge("qa", free, ["A man plays the guitar."])[0]["pred"] == "yes"


def test_find_video_tries_extensions(tmp_path):
    (tmp_path / "v1.avi").write_bytes(b"")
    assert ev.find_video(tmp_path, "v1") == str(tmp_path / "v1.avi")  # MSVD-style names have no extension
    assert ev.find_video(tmp_path, "v1.avi") == str(tmp_path / "v1.avi")
    with pytest.raises(FileNotFoundError, match="--videos"):
        ev.find_video(tmp_path, "v2")
    (tmp_path / "v_JspVuT6rsLA.mkv").write_bytes(b"")  # ActivityNet-QA names the YouTube id alone
    assert ev.find_video(tmp_path, "JspVuT6rsLA") == str(tmp_path / "v_JspVuT6rsLA.mkv")
    (tmp_path / "1234.mp4").write_bytes(b"")  # a numeric video_name (e.g. NExT-QA's)
    assert ev.find_video(tmp_path, 1234) == str(tmp_path / "1234.mp4")


def test_benchmark_questions_are_shared_only_when_greedy(world, monkeypatch):
    """Greedy decoding answers a question once however many items ask it; sampling asks every item's questions
    apart (as the reference's separate inference scripts): a shared sample would make Q1 and Q2 agree by fiat."""
    asked, real = [], ev.generate_answers
    monkeypatch.setattr(ev, "generate_answers", lambda name, path, recs, args, **kw: asked.append(len(recs)) or
                        real(name, path, recs, args, **kw))
    items = ev.read_benchmark(world / "shapes" / "benchmark", world / "shapes" / "videos", 3)
    slots = sum(len(it["questions"]) for it in items)
    distinct = len({(it["video"], q) for it in items for q in it["questions"]})
    assert distinct < slots  # the world's consistency Q1s repeat generic questions
    for temperature, n in ((0.0, distinct), (0.7, slots)):
        asked.clear()
        ev.main(bench_args(world, world / f"bench_t{temperature}", data="", prior_data="", temperature=temperature))
        assert asked == [n]


def bench_args(world, out, **kw):
    shapes = world / "shapes"
    return ev.Args(**{**dict(models=[f"a={world / 'sft'}"], data=str(shapes / "eval.jsonl"),
                             prior_data=str(shapes / "sft.jsonl"), out=str(out), benchmark=str(shapes / "benchmark"),
                             max_new_tokens=6, limit=3, device="cpu"), **kw})


def test_benchmark_end_to_end_rule_judge(world):
    """A random model through the whole benchmark path; then the judge can't be swapped in the same folder."""
    res = ev.main(bench_args(world, world / "bench"))
    bench = res["benchmark"]
    assert bench["judge"] == "rule" and res["settings"]["judge"] == "rule" and list(bench["models"]) == ["prior", "a"]
    n = {c: 3 for c in ev.CRITERIA} | {"correctness": 3, "detail": 3, "context": 3}
    for m in bench["models"].values():
        assert m["n"] == n and sum(m["failed"].values()) == 0  # limit 3 per file; the rule judge always answers
        assert all(0 <= m[c] <= 5 for c in ["correctness", "detail", "context", "temporal", "consistency"])
        assert 0 <= m["qa_accuracy"] <= 1
    rows = [json.loads(l) for l in (world / "bench" / "benchmark_a.jsonl").read_text().splitlines()]
    assert len(rows) == 3 * 3 + 3 + 3 + 3 and {r["task"] for r in rows} == set(ev.FILES)
    assert all(len(r["predictions"]) == len(r["questions"]) for r in rows)
    assert "rule" in ev.bench_table(bench).splitlines()[0]
    with pytest.raises(ValueError, match="another --out"):  # numbers of two judges never share a table
        ev.main(bench_args(world, world / "bench", judge="openai:http://127.0.0.1:9/v1"))


def test_a_judge_that_fails_leaves_no_output(world, tmp_path, monkeypatch):
    def unreachable(criterion, item, preds):
        raise OSError("judge endpoint: HTTP 401")
    monkeypatch.setattr(ev, "rule_judge", unreachable)
    with pytest.raises(OSError, match="401"):
        ev.main(bench_args(world, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # no predictions beside an older results.json, no config.json


def truthful_answers(world, monkeypatch):
    """Stand-in generation: every benchmark question answered with its file's answer (matched by video and
    question), so every score is known."""
    bench = world / "shapes" / "benchmark"
    truth = {}
    for file in ev.FILES.values():
        for r in data.read_benchmark(bench / file):
            for q in [r.get("Q"), r.get("Q1"), r.get("Q2"), r.get("question")]:
                truth[str(world / "shapes" / "videos" / r["video_name"]), q] = r.get("A", r.get("answer"))
    monkeypatch.setattr(ev, "generate_answers", lambda name, path, recs, args, **k: (
        [truth[r["video"], r["turns"][-1][0].replace(f"{data.VIDEO}\n", "")] for r in recs], [0.0] * len(recs)))


def test_benchmark_rule_judge_gives_full_marks_to_the_truth(world, monkeypatch):
    truthful_answers(world, monkeypatch)
    res = ev.main(bench_args(world, world / "truthful", data="", prior_data="", limit=0))
    assert list(res["models"]) == [] and list(res["benchmark"]["models"]) == ["a"]  # benchmark only, no prior
    m = res["benchmark"]["models"]["a"]
    assert [m[c] for c in ev.BENCH_COLS] == [5, 5, 5, 5, 5, 1, 5]
    assert m["n"]["consistency"] == len(data.read_benchmark(world / "shapes" / "benchmark" / "consistency_qa.json"))


class ChatServer:
    """A chat-completions endpoint on loopback answering by criterion: 'Score: 4' text for correctness, JSON
    for detail, a Python dict for context and QA, never anything readable for temporal, and for consistency
    only once reminded of the format. The very first request fails with HTTP 500 (retried)."""

    def __init__(self):
        import http.server
        import threading
        self.requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append((self.path, self.headers.get("Authorization"), body))
                prompt = body["messages"][-1]["content"]
                if len(server.requests) == 1:
                    self.send_error(500)
                    return
                reply = ("Score: 4" if ev.CRITERIA["correctness"] in prompt else
                         '{"score": 2}' if ev.CRITERIA["detail"] in prompt else
                         "{'score': 5}" if ev.CRITERIA["context"] in prompt else
                         "{'pred': 'yes', 'score': 4}" if ev.CRITERIA["qa"] in prompt else
                         "{'score': 3}" if ev.REMINDER in prompt and ev.CRITERIA["consistency"] in prompt else
                         "I would rather not say.")
                out = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_openai_judge_on_a_loopback_server(world, monkeypatch):
    truthful_answers(world, monkeypatch)
    for k in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # the request must stay on loopback
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekrit")
    server = ChatServer()
    try:
        res = ev.main(bench_args(world, world / "openai", data="", prior_data="", limit=2, judge=f"openai:{server.url}",
                                 judge_model="grader-1", judge_key_env="TEST_JUDGE_KEY", judge_retries=2))
    finally:
        server.close()
    assert res["benchmark"]["judge"] == f"openai:{server.url} model=grader-1"
    m = res["benchmark"]["models"]["a"]
    assert (m["correctness"], m["detail"], m["context"], m["consistency"], m["qa_accuracy"], m["qa_score"]) == \
           (4, 2, 5, 3, 1, 4)
    assert m["temporal"] is None and m["failed"] == {c: 2 if c == "temporal" else 0 for c in ev.CRITERIA}
    # 2 items per file: 6 generic + 2 x 3 temporal tries + 2 x 2 consistency tries + 2 QA, and the failed first request
    assert len(server.requests) == 6 + 6 + 4 + 2 + 1
    assert all(p == "/v1/chat/completions" and auth == "Bearer sekrit" and body["model"] == "grader-1"
               and body["temperature"] == 0 for p, auth, body in server.requests)
    rows = [json.loads(l) for l in (world / "openai" / "benchmark_a.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["score"] is None]
    assert len(failed) == 2 and all(r["criterion"] == "temporal" and len(r["replies"]) == 3 for r in failed)


def test_openai_judge_fails_loudly_when_the_server_is_down():
    ask = ev.openai_ask("http://127.0.0.1:9/v1", "m", "NO_SUCH_KEY_VARIABLE", timeout=2, retries=0, max_tokens=4)
    with pytest.raises(RuntimeError, match="127.0.0.1:9"):  # port 9 (discard): nothing listens
        ask("hello")


@pytest.fixture(scope="module")
def hf_judge_dir(world):
    """A tiny random LlamaForCausalLM with the world's tokenizer (no chat template): it replies garbage."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = data.load_tokenizer(str(world / "shapes" / "tokenizer"))
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    path = world / "hf_judge"
    lm.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_hf_judge_counts_unreadable_replies_as_failed(world, hf_judge_dir, monkeypatch):
    truthful_answers(world, monkeypatch)
    res = ev.main(bench_args(world, world / "hf", data="", prior_data="", limit=1, judge=f"hf:{hf_judge_dir}",
                             judge_retries=1, judge_max_tokens=5))
    assert res["benchmark"]["judge"] == f"hf:{hf_judge_dir}"
    m = res["benchmark"]["models"]["a"]
    assert m["failed"] == m["n"] == {c: 1 for c in ev.CRITERIA}  # never silently dropped, never scored as 0
    assert all(m[c] is None for c in ev.BENCH_COLS)
    rows = [json.loads(l) for l in (world / "hf" / "benchmark_a.jsonl").read_text().splitlines()]
    assert all(len(r["replies"]) == 2 and r["score"] is None for r in rows)  # asked, then reminded once
    assert "-" in ev.bench_table(res["benchmark"]).splitlines()[-1]


def test_hf_judge_uses_the_chat_template(hf_judge_dir, monkeypatch):
    import shutil
    from transformers import AutoTokenizer
    path = hf_judge_dir.parent / "hf_judge_chat"
    shutil.copytree(hf_judge_dir, path)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = "{% for m in messages %}USER: {{ m['content'] }}{% endfor %} JUDGE:"
    tok.save_pretrained(path)
    seen, real = [], tok.__class__.__call__  # the text the judge's tokenizer is given
    monkeypatch.setattr(tok.__class__, "__call__", lambda self, text, **k: seen.append(text) or real(self, text, **k))
    ask = ev.hf_ask(str(path), "cpu", max_new_tokens=3)
    assert isinstance(ask("Grade this."), str)
    assert seen == ["USER: Grade this. JUDGE:"]  # without a template: "Grade this.\nReply: "


def test_video_root_and_a_prior_that_needs_no_videos(world, tmp_path):
    """Video-ChatGPT-style files name bare video files: --video_root finds them for --data, and the prior,
    which reads answers only, never looks for its file's videos (they are elsewhere, or not on this machine)."""
    shapes = world / "shapes"
    bare = tmp_path / "eval.jsonl"
    bare.write_text("".join(json.dumps({**r, "video": r["video"].split("/", 1)[1]}) + "\n"
                            for _, r in data.read_records(shapes / "eval.jsonl")))
    (tmp_path / "sft.jsonl").write_text((shapes / "sft.jsonl").read_text())  # its videos/ folder is not here
    res = ev.main(ev.Args(models=[f"s={world / 'sft'}"], data=str(bare), video_root=str(shapes / "videos"),
                          prior_data=str(tmp_path / "sft.jsonl"), out=str(tmp_path / "out"), max_new_tokens=4,
                          limit=4, device="cpu"))
    assert list(res["models"]) == ["prior", "s"] and res["models"]["s"]["n"] == 4

"""eval.py: scoring functions on hand-written cases, the prior baseline, and an end-to-end run on a tiny world."""
import json

import pytest
import torch

import data
from conftest import tiny_world
import eval as ev
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
        assert set(m) == {"accuracy", "accuracy_micro", "by_type", "n"} and m["n"] == 12
        assert set(m["by_type"]) == types and all(0 <= v <= 1 for v in m["by_type"].values())
        assert m["accuracy"] == pytest.approx(sum(m["by_type"].values()) / len(types))
    assert res["models"]["a"] == res["models"]["b"]  # same checkpoint, greedy: same numbers
    assert json.loads((out / "results.json").read_text()) == res
    assert json.loads((out / "config.json").read_text())["models"] == [f"a={ckpt}", f"b={ckpt}"]
    preds = [json.loads(line) for line in (out / "predictions_a.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and set(preds[0]) == {"id", "type", "question", "truth", "prediction", "score"}
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


def test_answer_is_cut_at_first_eos_and_scored(world, monkeypatch):
    """A stand-in model that always replies ' green</s> blue': the prediction is 'green', right on green questions."""
    tok = data.load_tokenizer(str(world / "sft"))
    green, blue = (tok(w, add_special_tokens=False).input_ids for w in (" green", " blue"))
    reply = green + [tok.eos_token_id] + blue

    def fake_generate(self, ids, mask, videos, max_new_tokens, temperature, generator=None):
        assert bool(mask[:, -1].all()) and videos.shape[0] == ids.shape[0]  # left-padded, one video per row
        return torch.tensor([reply] * ids.shape[0]), None

    monkeypatch.setattr(VideoLLM, "generate", fake_generate)
    shapes = world / "shapes"
    ev.main(ev.Args(models=[f"green={world / 'sft'}"], data=str(shapes / "eval.jsonl"),
                    prior_data=str(shapes / "sft.jsonl"), out=str(world / "fake"), limit=12, device="cpu"))
    preds = [json.loads(line) for line in (world / "fake" / "predictions_green.jsonl").read_text().splitlines()]
    assert {p["prediction"] for p in preds} == {"green"}
    assert all(p["score"] == float(p["truth"] == "green") for p in preds if p["type"] != "describe")
    assert sum(p["score"] for p in preds) >= 1


def test_table_is_fixed_width_in_qtypes_order():
    results = {"prior": ev.summarize(["order", "colour"], [0.5, 1.0]),
               "a_long_name": ev.summarize(["colour"], [0.25])}
    lines = ev.table(results).splitlines()
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert lines[0].split() == ["model", "colour", "order", "overall", "micro"]
    assert lines[1].split() == ["prior", "100.0", "50.0", "75.0", "75.0"]
    assert lines[2].split() == ["a_long_name", "25.0", "-", "25.0", "25.0"]  # a type the model was not asked

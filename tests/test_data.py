"""The data layer: world generation, video reading, formats, tokenizer and template."""
import dataclasses
import filecmp
import json
import random
import re

import cv2
import numpy as np
import pytest
import torch

import data


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    data.generate_world(data.WorldArgs(out=str(out), n_sft=6, n_rl=4, n_eval=4, n_text=40, n_captions=3, vocab_size=400))
    return out


def test_world_is_deterministic(world, tmp_path):
    data.generate_world(data.WorldArgs(out=str(tmp_path), n_sft=6, n_rl=4, n_eval=4, n_text=40, n_captions=3, vocab_size=400))
    for f in ["sft.jsonl", "rl.jsonl", "eval.jsonl", "text.jsonl", "captions.jsonl", "truth/scenes.jsonl", "benchmark/generic_qa.json",
              "tokenizer/tokenizer.json"]:
        assert filecmp.cmp(world / f, tmp_path / f, shallow=False), f
    a = data.load_video(world / "videos/sft_00000.mp4")
    assert torch.equal(a, data.load_video(tmp_path / "videos/sft_00000.mp4"))


def test_splits_keep_answers_apart(world):
    rl = [r for _, r in data.read_records(world / "rl.jsonl")]
    assert rl and all("answer" not in r and "conversations" not in r for r in rl)  # no oracle in RL prompts
    answers = {r["id"] for _, r in data.read_records(world / "truth/rl_answers.jsonl")}
    assert answers == {r["id"] for r in rl}
    videos = {s: {r["video"] for r in data.read_conversations(world / f"{s}.jsonl")} for s in ("sft", "eval")}
    assert not videos["sft"] & videos["eval"]
    text = data.read_conversations(world / "text.jsonl")
    assert all(r["video"] is None for r in text) and {"judge"} < {r["type"] for r in text}
    for r in text + data.read_conversations(world / "sft.jsonl"):  # the judge replies with the better answer:
        if r["type"].startswith("judge"):  # one of the two shown, in A and B equally often
            user, reply = r["turns"][0]
            assert reply in re.findall(r"Answer [AB]: (.*)\n", user)
    for name in ("generic_qa", "temporal_qa", "consistency_qa", "zeroshot_qa"):
        assert data.read_benchmark(world / "benchmark" / f"{name}.json")


def test_captions_are_new_clips_and_leave_every_other_split_unchanged(world, tmp_path):
    data.generate_world(data.WorldArgs(out=str(tmp_path), n_sft=6, n_rl=4, n_eval=4, n_text=40, n_captions=0, vocab_size=400))
    for f in ["sft.jsonl", "rl.jsonl", "eval.jsonl", "text.jsonl", "truth/scenes.jsonl", "tokenizer/tokenizer.json"]:
        assert filecmp.cmp(world / f, tmp_path / f, shallow=False), f  # drawn last: nothing else moves
    assert not (tmp_path / "captions.jsonl").read_text()
    captions = data.read_conversations(world / "captions.jsonl")
    others = {r["video"] for s in ("sft", "eval") for r in data.read_conversations(world / f"{s}.jsonl")}
    others |= {str(world / r["video"]) for _, r in data.read_records(world / "rl.jsonl")}
    assert len(captions) == 3 and not {r["video"] for r in captions} & others
    for r in captions:  # one describe turn whose answer is the clip's description, and a readable clip
        (question, answer), = r["turns"]
        assert question == f"{data.VIDEO}\n{data.QUESTIONS['describe'][0]}" and data.description_slots(answer)
        assert data.load_video(r["video"]).shape == (8, 3, 32, 32)


def test_sft_packs_a_clips_short_questions_into_one_conversation(world):
    scenes = {r["id"]: r for _, r in data.read_records(world / "truth/scenes.jsonl")}
    packed = [r for r in data.read_conversations(world / "sft.jsonl") if r["type"] == "qa"]
    assert len(packed) == 6
    for r in packed:
        scene = data.Scene(**{k: v for k, v in scenes[r["id"][:-3]].items() if k in ("id", "n_frames", "size")},
                           objects=[data.Obj(**o) for o in scenes[r["id"][:-3]]["objects"]])
        truth = sorted((t, q, a) for t, q, a, _ in data.questions(scene, random.Random(0)) if t not in ("describe", "exists", "order"))
        turns = [(t, q.replace(data.VIDEO + "\n", ""), a) for t, (q, a) in zip(r["types"], r["turns"])]
        assert len(r["types"]) == len(r["turns"]) and "describe" not in r["types"]
        assert set(truth) <= set(turns)  # every deterministic question of the clip, with its true answer
        assert data.VIDEO in r["turns"][0][0] and not any(data.VIDEO in q for q, _ in r["turns"][1:])


def test_written_video_reads_back(tmp_path):
    scene = data.sample_scene(random.Random(1), "x", size=48, frames=(12, 12))
    frames = data.render(scene)
    data.write_video(tmp_path / "v.mp4", frames)
    back = data._read_frames(tmp_path / "v.mp4", 12)  # RGB
    assert len(back) == 12 and back[0].shape == (48, 48, 3)
    err = np.abs(np.stack(back).astype(int) - frames[..., ::-1].astype(int)).mean()
    assert err < 6, f"codec error {err}"
    v = data.load_video(tmp_path / "v.mp4", num_frames=8, size=32)
    assert v.shape == (8, 3, 32, 32) and v.dtype == torch.float32
    # a frame folder and a list of frame files give the same frames
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:03d}.png"), f)
    a = data.load_video(folder, 8, 48)
    b = data.load_video(sorted(str(p) for p in folder.iterdir()), 8, 48)
    assert torch.equal(a, b)
    assert (a - data.load_video(tmp_path / "v.mp4", 8, 48)).abs().mean() < 0.1


@pytest.mark.parametrize("header", [None, 4, 40, 0])  # the file's own count, too few, too many, none
def test_a_video_file_is_sampled_by_its_true_frame_count_keeping_only_the_sampled_frames(tmp_path, monkeypatch, header):
    """A long real video does not fit in memory decoded (a 2-minute 720p one is ~10 GB): only the sampled frames
    are kept. They are picked by the container's frame count, which can be wrong; the frames must be those of
    the true count all the same."""
    scene = data.sample_scene(random.Random(1), "x", size=48, frames=(12, 12))
    data.write_video(tmp_path / "v.mp4", data.render(scene))
    full = [data._read_frames(tmp_path / "v.mp4", 12)[i] for i in data._uniform(12, 5, (0.25, 1.0))]
    real, retrieved = cv2.VideoCapture, []

    class Capture:  # the real reader, with a header that says `header` frames and a count of retrieved frames
        def __init__(self, path):
            self.cap = real(path)
        def get(self, prop):
            return self.cap.get(prop) if header is None or prop != cv2.CAP_PROP_FRAME_COUNT else header
        def grab(self):
            return self.cap.grab()
        def retrieve(self):
            retrieved.append(1)
            return self.cap.retrieve()
        def release(self):
            self.cap.release()

    monkeypatch.setattr(data.cv2, "VideoCapture", Capture)
    got = data._read_frames(tmp_path / "v.mp4", 5, (0.25, 1.0))
    assert all(np.array_equal(a, b) for a, b in zip(got, full)) and len(got) == 5
    assert len(retrieved) <= 5 * (1 if header is None else 2)  # one pass, or a second when the header was wrong
    Capture.retrieve = lambda self: (False, None)  # a frame that does not decode: a ValueError naming the file
    with pytest.raises(ValueError, match="v.mp4: frame .* unreadable"):
        data._read_frames(tmp_path / "v.mp4", 5)


def test_padding_to_square_uses_clip_mean(tmp_path):
    folder = tmp_path / "wide"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.zeros((10, 40, 3), np.uint8))
    v = data.load_video(folder, 1, 40)
    assert abs(float(v[0, :, 0, 20].abs().max())) < 0.02  # top row is padding = mean colour -> ~0 after norm
    assert float(v[0, 0, 20, 20]) < -1.5  # the black image itself


def test_video_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        data.load_video(tmp_path / "missing.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match="corrupt.mp4"):
        data.load_video(tmp_path / "corrupt.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.mp4"):
        data.load_video(tmp_path / "empty.mp4")
    (tmp_path / "noframes").mkdir()
    with pytest.raises(ValueError, match="noframes"):
        data.load_video(tmp_path / "noframes")


def test_malformed_records_name_file_and_line(tmp_path):
    good = {"id": "a", "video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ"},
                                                           {"from": "gpt", "value": "A"}]}
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(good) + "\n")
    with pytest.raises(FileNotFoundError, match=r"bad.jsonl:1: video .*v.mp4 not found"):  # checked on reading
        data.read_conversations(f)
    (tmp_path / "v.mp4").touch()
    f.write_text(json.dumps(good) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON"):
        data.read_conversations(f)
    f.write_text(json.dumps(good) + "\n" + json.dumps({"id": "b"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*lacks 'conversations'"):
        data.read_conversations(f)
    f.write_text(json.dumps({**good, "conversations": good["conversations"][::-1]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected conversations alternating"):
        data.read_conversations(f)
    f.write_text(json.dumps({"video": "v.mp4", "question": "q", "answer_1": "a", "answer_2": "b",
                             "preference": 3}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: preference must be 1 or 2"):
        data.read_prefs(f)


def test_errors_in_a_json_list_name_the_line_and_record(tmp_path):
    """LLaVA files are JSON lists, indented or on one line: an error names the line the record starts on and
    its place in the list (not one number for the whole file)."""
    (tmp_path / "v.mp4").touch()
    good = {"video": "v.mp4", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    records = [good, good, {"video": "v.mp4"}, good]
    f = tmp_path / "list.json"
    f.write_text(json.dumps(records, indent=1))  # good takes 13 lines: the third record opens line 28
    with pytest.raises(ValueError, match=r"list.json:28 \(record 3\): conversation record lacks 'conversations'"):
        data.read_conversations(f)
    f.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"list.json:1 \(record 3\): conversation"):
        data.read_conversations(f)
    f.write_text(json.dumps([good, "x"]))
    with pytest.raises(ValueError, match=r"list.json:1 \(record 2\): expected a JSON object, got str"):
        data.read_conversations(f)
    f.write_text(json.dumps([good, good]))  # records without ids get one each, unique
    assert [r["id"] for r in data.read_conversations(f)] == ["list-0", "list-1"]


def test_formats_accept_reference_layouts(tmp_path):
    for name in ("fr/0.jpg", "fr/1.jpg", "v.mp4"):  # readers check that videos exist
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).touch()
    f = tmp_path / "ref.json"  # a JSON list, <image> placeholder, frames given as `images`
    f.write_text(json.dumps([{"id": "r", "images": ["fr/0.jpg", "fr/1.jpg"], "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "This."},
        {"from": "human", "value": "And?"}, {"from": "gpt", "value": "That."}]}]))
    (r,) = data.read_conversations(f)
    assert r["video"] == [str(tmp_path / "fr/0.jpg"), str(tmp_path / "fr/1.jpg")]
    assert r["turns"] == [("<image>\nWhat?", "This."), ("And?", "That.")]
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps({"video": "v.mp4", "conversations": [{"from": "human", "value": "<video>\nQ?"}],
                             "output_1": {"value": "x"}, "output_2": {"value": "y"}, "preference": 2}) + "\n")
    p.write_text(p.read_text() + json.dumps({"images": ["fr/0.jpg"], "conversations": [[  # wrapped, as the reference allows
        {"from": "human", "value": "<image>\nR?"}, {"from": "gpt", "value": ""}]], "output_1": {"value": "u"},
        "output_2": {"value": "w"}, "preference": 1}) + "\n")
    q, q2 = data.read_prefs(p)
    assert (q["question"], q["answer_1"], q["answer_2"], q["preference"]) == ("Q?", "x", "y", 2)
    assert q["video"] == str(tmp_path / "v.mp4")
    assert (q2["question"], q2["answer_1"], q2["preference"], q2["video"]) == ("R?", "u", 1, [str(tmp_path / "fr/0.jpg")])
    assert (q["id"], q2["id"]) == ("prefs-0", "prefs-1")  # the reference's pairs have no id: train_rm needs one
    # RL prompts: the reference's PPO file (uid, frames as `images`, the question as the human turn) and ours
    rl = tmp_path / "rl.json"
    rl.write_text(json.dumps([{"uid": 7, "images": ["fr/0.jpg", "fr/1.jpg"], "conversations": [
                                  {"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": ""}]},
                              {"id": "ours", "video": "v.mp4", "question": "Q?"},
                              {"uid": 8, "images": ["fr/0.jpg"], "conversations": [{"from": "gpt", "value": "A."}]}]))
    with pytest.raises(ValueError, match=r"rl.json:1 \(record 3\): prompt record lacks 'question'"):  # no human turn
        data.read_prompts(rl)
    rl.write_text(json.dumps(json.loads(rl.read_text())[:2] + [{"uid": 9, "video": "v.mp4", "conversations": [[
        {"from": "human", "value": None}, {"from": "human", "value": "<video>\nWrapped?"}]]}]))  # wrapped; a null turn
    refs, ours, wrapped = data.read_prompts(rl)
    assert wrapped["question"] == "Wrapped?"
    assert (refs["id"], refs["question"], refs["video"]) == (7, "What moves?", [str(tmp_path / "fr/0.jpg"), str(tmp_path / "fr/1.jpg")])
    assert (ours["id"], ours["question"], ours["video"]) == ("ours", "Q?", str(tmp_path / "v.mp4"))


def test_loss_mask_is_assistant_tokens_and_eos(world):
    tok = data.load_tokenizer(world / "tokenizer")
    assert tok.pad_token_id != tok.eos_token_id
    turns = [("<video>\nWhat colour is the circle?", "red"), ("And the square?", "blue square")]
    ids, labels = data.encode(tok, turns, n_video_tokens=5)
    vid = tok.convert_tokens_to_ids(data.VIDEO)
    assert ids.count(vid) == 5 and ids[0] == tok.bos_token_id
    kept = [i for i, l in zip(ids, labels) if l != -100]
    assert tok.decode(kept) == " red</s> blue square</s>"
    assert all(l in (-100, i) for i, l in zip(ids, labels))
    full = tok.decode([i for i in ids if i != vid])
    assert full == f"<s>{data.SYSTEM} USER: \nWhat colour is the circle? ASSISTANT: red</s>USER: And the square? " \
                   f"ASSISTANT: blue square</s>"
    prompt, _ = data.encode(tok, [("Q?", None)], 5)
    assert tok.decode(prompt).endswith("USER: Q? ASSISTANT:")
    ids, labels = data.encode(tok, [("Q?", "a b c d e f g h")], 5, max_len=len(prompt) + 3)
    assert len(ids) == len(prompt) + 3 and tok.eos_token_id not in ids and labels[-1] == ids[-1]  # cut: no stop taught
    with pytest.raises(ValueError, match="does not fit"):
        data.encode(tok, [("Q?", "a")], 5, max_len=len(prompt) - 1)
    # several turns: those that fit stay whole, the rest are dropped (not a cut prompt followed by EOS)
    ids, labels = data.encode(tok, turns, 5)
    for room in range(len(ids) - 1, len(ids) - 12, -1):
        cut, cut_labels = data.encode(tok, turns, 5, max_len=room)
        assert tok.decode([i for i in cut if i != vid]).endswith("ASSISTANT: red</s>") and cut[-1] == cut_labels[-1]


def test_descriptions_parse_back_to_the_scene():
    rng = random.Random(3)
    for i in range(50):
        scene = data.sample_scene(rng, "x")
        slots = data.description_slots(data.describe(scene))
        assert ("count", data.NUMBERS[len(scene.objects)]) in slots
        for o in scene.objects:
            assert ("motion", o.name, o.direction) in slots
            assert (("appears", o.name) in slots) == (o.appear > 0)
            assert (("leaves", o.name) in slots) == (o.leave < scene.n_frames)


def _reversed(scene):
    """The same frames played backwards: every motion and every appear/leave event flips."""
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up", "still": "still"}
    n = scene.n_frames
    objs = []
    for o in scene.objects:
        x, y = data._position(o, n - 1)
        objs.append(dataclasses.replace(o, direction=opposite[o.direction], x=x, y=y, appear=n - o.leave,
                                        leave=n - o.appear))
    return dataclasses.replace(scene, objects=objs)


def test_motion_and_order_need_several_frames():
    """A scene and its reversal consist of the same single frames, yet their direction and order answers
    differ: no single frame can answer them."""
    rng = random.Random(0)
    checked = 0
    for i in range(40):
        scene = data.sample_scene(rng, "x")
        back = _reversed(scene)
        a, b = data.render(scene), data.render(back)
        assert np.abs(a[::-1].astype(int) - b.astype(int)).max() <= 8  # same frames up to rounding
        qa, qb = data.questions(scene, random.Random(1)), data.questions(back, random.Random(1))
        for (t, q, x, _), (_, _, y, _) in zip(qa, qb):
            if t == "direction" and x != "still" or t == "order":
                assert x != y, (q, x, y)
                checked += 1
    assert checked > 20


def test_questions_cover_every_type_and_order_is_balanced():
    rng = random.Random(0)
    seen, first = set(), []
    for i in range(300):
        scene = data.sample_scene(rng, "x")
        for t, q, a, q2 in data.questions(scene, rng):
            seen.add(t)
            if t == "order":
                first.append(a.removeprefix("the ") in q.split(", the ")[1].split(" or")[0])
    assert seen == set(data.QTYPES)
    assert 0.35 < np.mean(first) < 0.65  # the answer is not always the first-named object


def test_rm_suffix_matches_the_two_turn_encoding(world):
    tok = data.load_tokenizer(world / "tokenizer")
    two_turns, _ = data.encode(tok, [("<video>\nQ?", "red"), (data.RM_PROMPT, None)], 3)
    answer, _ = data.encode(tok, [("<video>\nQ?", "red")], 3)
    assert two_turns == answer + data.rm_suffix(tok)


def test_clip_spans(tmp_path):
    frames = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(12)])
    folder = tmp_path / "f"
    folder.mkdir()
    for i, f in enumerate(frames):
        cv2.imwrite(str(folder / f"{i:02d}.png"), f)
    values = lambda span: [int(f[0, 0, 0]) // 10 for f in data._read_frames(folder, 4, span)]
    assert values((0, 1)) == [0, 4, 7, 11]
    assert values((0, 1 / 3)) == [0, 1, 2, 3] and values((2 / 3, 1)) == [8, 9, 10, 11]


def test_template_without_system_line(world):
    tok = data.load_tokenizer(world / "tokenizer")
    ids, labels = data.encode(tok, [("Q?", "A")], 3, system="")
    assert tok.decode(ids) == "<s>USER: Q? ASSISTANT: A</s>"
    assert data.encode(tok, [("Q?", "A")], 3)[0] == data.encode(tok, [("Q?", "A")], 3, system=data.SYSTEM)[0]


def test_question_text_drops_either_placeholder(world):
    """The reference's files say <image> (SPEC 4); an RM input built from the question must hold one placeholder."""
    tok = data.load_tokenizer(world / "tokenizer")
    for user in ("<video>\nWhat colour is it?", "<image>\nWhat colour is it?", "What colour is it?"):
        assert data.question_text(user) == "What colour is it?"
        ids = data.rm_input(tok, data.question_text(user), "red", 3)
        assert ids.count(tok.convert_tokens_to_ids(data.VIDEO)) == 3


@pytest.mark.parametrize("stage", ["sft", "eval", "make_prefs", "train_rm", "ppo"])
def test_every_stage_cli_parses_and_has_help(stage, capsys):
    module = __import__(stage)
    with pytest.raises(SystemExit) as e:
        data.parse_args(module.Args, ["--help"], description=module.__doc__)
    assert e.value.code == 0 and "--seed" in capsys.readouterr().out
    args = data.parse_args(module.Args, ["--seed", "3", "--resume", "true"] if stage != "eval" else ["--seed", "3"])
    assert args.seed == 3 and (stage == "eval" or args.resume is True)


def test_a_fresh_run_drops_an_old_resume_point(tmp_path):
    """Otherwise a new run that dies before its first save would, rerun with --resume, continue the OLD run."""
    args = data.WorldArgs(out=str(tmp_path))
    (tmp_path / "resume.pt").write_bytes(b"an earlier run's state")
    data.start_run(tmp_path, args, resume=True)
    assert (tmp_path / "resume.pt").exists()
    data.start_run(tmp_path, args, resume=False)
    assert not (tmp_path / "resume.pt").exists() and json.loads((tmp_path / "config.json").read_text())["out"] == str(tmp_path)


def test_perturbed_descriptions_change_one_fact_in_the_worlds_grammar():
    """The judge's training negatives: telling them apart must take reading the description. No "shows one
    objects", no object that changes colour between sentences, no two objects of one colour (never in the world)."""
    rng = random.Random(0)
    for i in range(300):
        truth = data.describe(data.sample_scene(rng, f"s{i}"))
        wrong = data.perturb("describe", "Describe the video in detail.", truth, rng)
        number, plural = re.search(r"shows (\w+) object(s?)\.", wrong).groups()
        assert (number != "one") == bool(plural), wrong
        named, was = set(re.findall(data._OBJ, wrong)), set(re.findall(data._OBJ, truth))
        assert len(named) == len({c for c, _ in named}) == len({s for _, s in named}), wrong
        # the count stated is the count of objects described (a count alone changed gave 30% away unread)
        assert data.NUMBERS.index(number) == len(re.findall(r"(?:^|\. )(?:A|Later, a) " + data._OBJ, wrong)), wrong
        changed = {slot for slot, *_ in data.description_slots(truth) ^ data.description_slots(wrong)}
        if len(named) == len(was):  # one motion, or one object's colour in all its mentions
            assert changed == {"motion"} or len(named - was) == 1, (truth, wrong)
        else:  # objects dropped from the end, or new ones there from the start (the world's order), the rest kept
            assert "count" in changed and (wrong.split(". ", 1)[1] in truth or truth.split(". ", 1)[1] in wrong), (truth, wrong)
            assert re.fullmatch(r"The video shows \w+ objects?\.( A [^.]+\.)*( (A|Later, a|Then the) [^.]+\.)*", wrong), wrong


def test_streamed_videos_decode_when_fetched_once_per_batch(tmp_path, monkeypatch):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((8, 8, 3), 60 * i, np.uint8))
    records = [{"id": "a", "video": str(folder)}, {"id": "b", "video": str(folder)}]  # two questions, one video
    up_front = data.load_videos(records, 2, 16, "x.jsonl")
    decoded, load_video = [], data.load_video
    monkeypatch.setattr(data, "load_video", lambda *a: decoded.append(1) or load_video(*a))
    streamed = data.load_videos(records, 2, 16, "x.jsonl", stream=True)
    assert not decoded  # nothing decoded until a batch asks
    batch = data.fetch(streamed, [str(folder)] * 3)
    assert len(decoded) == 1 and all(torch.equal(v, up_front[str(folder)]) for v in batch)
    assert data.fetch(up_front, [str(folder)])[0] is up_front[str(folder)]


@pytest.mark.parametrize("legacy", [True, False])
def test_encode_gives_the_ids_of_one_pass_over_the_conversation_with_a_llama_tokenizer(tmp_path, legacy):
    """Real checkpoints come with LLaMA's sentencepiece-style tokenizer, where a word's leading space is part of
    its token ("▁red"), and what follows a special token depends on tokenizer_config.json's `legacy` ("</s>▁USER"
    if true, "</s>USER" if false: transformers 5 builds the tokenizer from it). encode tokenizes prompts and
    answers piece by piece (labels need the boundaries) and must give exactly the ids of the whole Vicuna v1
    conversation tokenized in one pass, as the reference builds them."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast
    turns = [(f"{data.VIDEO}\nWhat colour is the circle?", "The circle is red."), ("How many objects?", "Three."),
             ("Which moves left?", "The red circle.")]
    words = [data.SYSTEM] + [f"USER: {q} ASSISTANT: {a}" for q, a in turns]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(words * 20, trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"]))
    LlamaTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": legacy}))
    tok = data.load_tokenizer(tmp_path)  # adds <video> and <pad>, as for a real LLaMA tokenizer
    assert tok(" red", add_special_tokens=False).input_ids == tok("red", add_special_tokens=False).input_ids  # "▁red"
    after_eos = tok("</s>USER", add_special_tokens=False).input_ids[1:]
    assert (after_eos == tok("USER", add_special_tokens=False).input_ids) == legacy  # the two behaviours are both tested
    ids, labels = data.encode(tok, turns, n_video_tokens=1)
    one_pass = f"{data.SYSTEM} " + "".join(f"USER: {q} ASSISTANT: {a}</s>" for q, a in turns)
    assert ids == [tok.bos_token_id] + tok(one_pass, add_special_tokens=False).input_ids
    suffix = data.rm_suffix(tok)  # what ppo appends to sampled tokens: the tail of the RM's inputs in training
    assert data.rm_input(tok, "Q?", "The circle is red.", 1)[-len(suffix):] == suffix
    answers, piece = [], []  # the labelled tokens are each answer and its EOS, nothing else
    for i, label in zip(ids, labels):
        if label != -100 and label == tok.eos_token_id:
            answers, piece = answers + [tok.decode(piece)], []
        elif label != -100:
            piece.append(i)
    assert answers == [a for _, a in turns] and not piece

"""Interruption and bad input (README "Reliability"): every stage killed with SIGKILL mid-run and rerun completes
with the results of an uninterrupted run and no torn file; bad input ends a stage with one line naming the file
or record and no output; a non-finite loss stops a stage and keeps its last resume point."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import data
from conftest import tiny_world
import eval as ev
import make_prefs as mp
import model as M
import ppo
import sft
import train_rm as rm

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent
STAGES = {"sft": sft, "make_prefs": mp, "train_rm": rm, "ppo": ppo, "eval": ev}
FULL = {"sft": "sft_run", "make_prefs": "prefs", "train_rm": "rm", "ppo": "ppo", "eval": "eval"}  # uninterrupted runs


def argv(stage, w, out, **over):
    """A tiny run of `stage` on the world w (tiny_world + w/prefs and w/rm from the uninterrupted runs)."""
    s = w / "shapes"
    opts = {
        "sft": dict(train=[s / "sft.jsonl", s / "text.jsonl"], tokenizer=s / "tokenizer", hidden=32, layers=1,
                    heads=2, kv_heads=1, vision_hidden=16, vision_layers=2, frames=4, epochs_text=2, epochs_short=1,
                    epochs_long=1, batch_size=4, warmup=2, save_every=2, max_len=512),
        "make_prefs": dict(prompts=s / "rl.jsonl", sft=w / "sft", batch_size=1, k=2, max_new_tokens=8),
        "train_rm": dict(prefs=w / "prefs" / "prefs.jsonl", video_root=s, sft=w / "sft", holdout=0.25, epochs=3,
                         batch_size=1, save_every=2),
        "ppo": dict(prompts=s / "rl.jsonl", sft=w / "sft", rm=w / "rm" / "model", iterations=10, rollout_batch=2,
                    minibatch=1, max_new_tokens=6, save_every=2, sample_every=2),
        "eval": dict(models=[w / "sft"], data=s / "eval.jsonl", prior_data=s / "sft.jsonl", batch_size=1,
                     max_new_tokens=8),
    }[stage]
    out_args = []
    for k, v in {**opts, "out": out, **over}.items():
        out_args += [f"--{k}", *map(str, v if isinstance(v, list) else [v])]
    return out_args


def run(stage, args):
    """A stage in this process, through its command line (data.cli)."""
    return data.cli(STAGES[stage].main, STAGES[stage].Args, argv=args)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, a random SFT checkpoint, and the uninterrupted run of every stage in w/<stage>
    (make_prefs' pairs and train_rm's RM feed the later stages)."""
    w = tmp_path_factory.mktemp("rel")
    tiny_world(w, n_sft=4, n_rl=6, n_eval=3)
    for stage in STAGES:
        run(stage, argv(stage, w, w / FULL[stage]))
    return w


def assert_no_torn_file(out):
    """Every file under out is whole, except temporary (*.tmp) ones and the last line of an append-only log."""
    for f in out.rglob("*"):
        if f.is_dir() or ".tmp" in f.name:
            continue
        if f.suffix == ".jsonl":
            data.read_log(f)
        elif f.suffix == ".json":
            json.loads(f.read_text())
        elif f.suffix == ".pt":
            torch.load(f)
    if (out / "model").exists():
        M.load_pretrained(str(out / "model"))


def same_weights(a, b):
    x, y = M.load_pretrained(str(a)).state_dict(), M.load_pretrained(str(b)).state_dict()
    return all(torch.allclose(x[k], y[k], atol=1e-5) for k in x)


READY = {  # when a run has written at least one resume point (eval has none: it writes everything at the end)
    "sft": lambda out, log: (out / "resume.pt").exists(),
    "train_rm": lambda out, log: (out / "resume.pt").exists(),
    "ppo": lambda out, log: (out / "resume.pt").exists(),
    "make_prefs": lambda out, log: len(data.read_log(out / "metrics.jsonl")) >= 2,
    "eval": lambda out, log: "sft:" in log.read_text(),  # the first model's progress bar: generating
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_sigkill_then_rerun_equals_uninterrupted(stage, world, tmp_path, capsys):
    out, log = tmp_path / stage, tmp_path / "stderr.txt"
    with open(log, "w") as err:
        p = subprocess.Popen([sys.executable, f"{stage}.py", *argv(stage, world, out)], cwd=REPO, stderr=err,
                             stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        t0 = time.time()
        while not READY[stage](out, log):
            assert p.poll() is None, f"{stage} ended (exit {p.returncode}) before it could be killed:\n{log.read_text()}"
            assert time.time() - t0 < 120, f"{stage} wrote no resume point in 120 s"
            time.sleep(0.002)
        p.send_signal(signal.SIGKILL)
        assert p.wait() == -signal.SIGKILL, f"{stage} finished before the kill"
    assert_no_torn_file(out)
    assert not (out / "model").exists() and not (out / "summary.json").exists() and not (out / "results.json").exists()
    capsys.readouterr()
    run(stage, argv(stage, world, out, **({} if stage == "eval" else {"resume": "true"})))
    printed = capsys.readouterr().out
    if stage == "make_prefs":  # it continued from the batches the killed run finished
        assert int(re.search(r"\((\d+) done", printed)[1]) >= 2, printed
    elif stage != "eval":
        assert int(re.search(r"resumed from .* at (?:step|iteration) (\d+)", printed)[1]) >= 2, printed
    full = world / FULL[stage]
    if stage in ("sft", "train_rm", "ppo"):
        assert same_weights(full / "model", out / "model")
        key = "iteration" if stage == "ppo" else "step"
        assert [m[key] for m in data.read_log(out / "metrics.jsonl")] == \
               [m[key] for m in data.read_log(full / "metrics.jsonl")]  # the same step count, each step once
        assert not (out / "resume.pt").exists()
    names = {"make_prefs": ["prefs.jsonl", "oracle.jsonl", "prefs_reference.json"], "eval": ["results.json"],
             "ppo": ["samples.jsonl"]}.get(stage, [])
    for name in names:
        assert (out / name).read_text() == (full / name).read_text(), name


def test_torn_log_line_is_dropped(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"st')  # what SIGKILL mid-append can leave
    assert data.read_log(log) == [{"step": 1}, {"step": 2}, {"step": 3}]
    data.trim_log(log, lambda r: r["step"] <= 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_cli_error_is_one_line_with_exit_status_1(world, tmp_path):
    r = subprocess.run([sys.executable, "train_rm.py", "--prefs", str(tmp_path / "missing.jsonl"), "--sft",
                        str(world / "sft"), "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.splitlines() == [f"train_rm: error: {tmp_path / 'missing.jsonl'}: file not found"]
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "report.py", "--eval", str(tmp_path / "no_eval"), "--out", str(tmp_path / "r.html")],
                       cwd=REPO, capture_output=True, text=True)  # the report too: one line, not a traceback
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and r.stderr.startswith("report: error: "), r.stderr


def fails(stage, args, match):
    """The stage ends with `<stage>: error: ...` (one line) matching `match`, and writes nothing to --out."""
    with pytest.raises(SystemExit) as e:
        run(stage, args)
    msg, out = str(e.value.code), Path(args[args.index("--out") + 1])
    assert msg.startswith(f"{stage}: error: ") and "\n" not in msg, msg
    assert match in msg, msg
    assert not out.exists() or not any(out.iterdir()), sorted(out.iterdir())


def conversation(video, answer="red", question="What colour is the circle?"):
    return {"id": "x", **({"video": video} if video else {}), "conversations": [
        {"from": "human", "value": f"<video>\n{question}" if video else question}, {"from": "gpt", "value": answer}]}


def write_jsonl(path, rows):
    path.write_text("".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("stage,flag", [("sft", "train"), ("make_prefs", "prompts"), ("train_rm", "prefs"),
                                        ("ppo", "prompts"), ("eval", "data")])
def test_malformed_json_line(stage, flag, world, tmp_path):
    src = {"sft": "shapes/sft.jsonl", "train_rm": "prefs/prefs.jsonl", "eval": "shapes/eval.jsonl"}.get(stage, "shapes/rl.jsonl")
    lines = (world / src).read_text().splitlines(keepends=True)
    bad = write_jsonl(tmp_path / "bad.jsonl", [lines[0], '{"id": "cut', "\n", *lines[1:]])
    fails(stage, argv(stage, world, tmp_path / "out", **{flag: bad}), f"{bad}:2: invalid JSON")


def test_missing_fields(world, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "video": "v.mp4"}])
    fails("sft", argv("sft", world, tmp_path / "out", train=bad), f"{bad}:1: conversation record lacks 'conversations'")
    pref = json.loads((world / "prefs" / "prefs.jsonl").read_text().splitlines()[0])
    del pref["preference"]
    bad = write_jsonl(tmp_path / "prefs.jsonl", [pref])
    fails("train_rm", argv("train_rm", world, tmp_path / "out", prefs=bad), f"{bad}:1: preference record lacks 'preference'")


def test_missing_video(world, tmp_path):
    moved = shutil.copy(world / "shapes" / "rl.jsonl", tmp_path)  # its videos are relative to its folder: absent
    fails("ppo", argv("ppo", world, tmp_path / "out", prompts=moved), f"{moved}:1: video {tmp_path}/videos/")
    text = world / "shapes" / "text.jsonl"  # text-only records: a clear error, not a traceback
    fails("eval", argv("eval", world, tmp_path / "out", data=text), f"{text}: record text_00000-read has no video")


def test_corrupt_empty_and_frameless_videos(world, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 50)
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "frames").mkdir()
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation("corrupt.mp4")])
    fails("sft", argv("sft", world, tmp_path / "out", train=bad), f"{bad}: record x: {tmp_path}/corrupt.mp4: unreadable")
    bad = write_jsonl(tmp_path / "eval.jsonl", [conversation("empty.mp4")])
    fails("eval", argv("eval", world, tmp_path / "out", data=bad), f"{tmp_path}/empty.mp4: unreadable or zero-frame")
    pref = json.loads((world / "prefs" / "prefs.jsonl").read_text().splitlines()[0])
    bad = write_jsonl(tmp_path / "prefs.jsonl", [{**pref, "video": "frames"}])
    fails("train_rm", argv("train_rm", world, tmp_path / "out", prefs=bad, video_root=tmp_path),
          f"{bad}: record {pref['id']}: {tmp_path}/frames: frame folder has no images")


@pytest.mark.parametrize("stage", ["sft", "train_rm", "ppo", "eval"])
def test_streamed_videos_give_the_same_run(stage, world, tmp_path, monkeypatch):
    """--stream_videos decodes each video when its batch needs it instead of all up front: same tensors, same run
    (eval with the RM's best-of-N rows too, which read the videos again)."""
    extra = dict(rm=world / "rm" / "model", best_of=2) if stage == "eval" else {}
    if stage == "eval":
        run(stage, argv(stage, world, tmp_path / "up_front", **extra))
    streamed, fetch = [], data.fetch  # what each batch got: functions that decode, not tensors decoded up front
    monkeypatch.setattr(data, "fetch", lambda videos, keys: streamed.extend(callable(videos[k]) for k in keys)
                        or fetch(videos, keys))
    run(stage, argv(stage, world, tmp_path / stage, stream_videos="true", **extra))
    assert streamed and all(streamed)
    if stage == "eval":
        assert (tmp_path / stage / "results.json").read_text() == (tmp_path / "up_front" / "results.json").read_text()
    else:
        assert same_weights(world / FULL[stage] / "model", tmp_path / stage / "model")


def test_streamed_corrupt_video_fails_at_its_batch_naming_the_record(world, tmp_path):
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video" * 50)
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation("corrupt.mp4")])
    videos = data.load_videos(data.read_conversations(bad), 4, 48, bad, stream=True)  # nothing decoded yet
    with pytest.raises(ValueError, match=f"{bad}: record x: {tmp_path}/corrupt.mp4: unreadable"):
        data.fetch(videos, [str(tmp_path / "corrupt.mp4")])
    with pytest.raises(SystemExit, match=f"sft: error: {bad}: record x: {tmp_path}/corrupt.mp4: unreadable"):
        run("sft", argv("sft", world, tmp_path / "out", train=bad, stream_videos="true"))
    assert (tmp_path / "out" / "config.json").exists()  # the run had started: the video failed at its batch


def test_too_long_and_empty_answers(world, tmp_path):
    tok = data.load_tokenizer(str(world / "sft"))
    long = " ".join(["red"] * 600)  # truncation policy: the answer is cut from the end, with no EOS taught there
    ids, labels = data.encode(tok, [("What colour is the circle?", long)], 0, max_len=64, system="")
    n_prompt = labels.count(-100)
    assert len(ids) == 64 and tok.eos_token_id not in ids and 0 < n_prompt < 64 and labels[n_prompt:] == ids[n_prompt:]
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(None, question=long)])  # a prompt that cannot fit
    fails("sft", argv("sft", world, tmp_path / "out", train=bad), f"{bad}: record x: prompt of ")
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversation(None, answer="")])
    fails("sft", argv("sft", world, tmp_path / "out", train=bad), f"{bad}:1: every turn needs a non-empty string")


def test_checkpoint_of_the_wrong_kind(world, tmp_path):
    rm_ckpt = world / "rm" / "model"
    fails("ppo", argv("ppo", world, tmp_path / "out", sft=rm_ckpt), f"{rm_ckpt} holds a 'reward' model, but a 'policy'")
    fails("eval", argv("eval", world, tmp_path / "out", models=[rm_ckpt]), "holds a 'reward' model")
    fails("train_rm", argv("train_rm", world, tmp_path / "out", sft=rm_ckpt), "holds a 'reward' model")


def test_tokenizer_that_does_not_match_the_checkpoint(world, tmp_path):
    ckpt = Path(shutil.copytree(world / "sft", tmp_path / "ckpt"))
    tok = data.load_tokenizer(str(ckpt))
    tok.add_special_tokens({"additional_special_tokens": ["<extra>"]})  # one token more than the model has
    tok.save_pretrained(ckpt)
    for stage in ("make_prefs", "train_rm", "eval"):
        args = argv(stage, world, tmp_path / "out", **({"models": [ckpt]} if stage == "eval" else {"sft": ckpt}))
        fails(stage, args, f"{ckpt}: tokenizer (bos, eos, pad, video)")
    other = tmp_path / "tok"
    tok.save_pretrained(other)
    fails("sft", argv("sft", world, tmp_path / "out", init=world / "sft", tokenizer=other), f"{other}: tokenizer")


def test_mismatched_config_and_weights(world, tmp_path):
    ckpt = Path(shutil.copytree(world / "sft", tmp_path / "ckpt"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["llm"]["intermediate_size"] = 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    fails("eval", argv("eval", world, tmp_path / "out", models=[ckpt]),
          f"cannot load {ckpt}/model.safetensors: llm.layers.0.mlp.down_proj.weight: shape")
    # a resumed run must have the arguments of the run it continues
    out = tmp_path / "sft"
    shutil.copytree(world / "sft_run", out, ignore=shutil.ignore_patterns("model"))
    with pytest.raises(SystemExit, match=r"sft: error: .*other arguments \{'lr'"):
        run("sft", argv("sft", world, out, resume="true", lr=3e-3))
    run("sft", argv("sft", world, out, resume="true", stream_videos="true"))  # how videos are read may change
    assert same_weights(world / "sft_run" / "model", out / "model")


@pytest.mark.parametrize("stage,loss_fn,nth,last", [("sft", "sft_loss", 5, 4), ("train_rm", "bt_loss", 5, 4),
                                                    ("ppo", "policy_loss", 9, 2)])  # ppo: 4 minibatch steps per iteration
def test_non_finite_loss_stops_and_keeps_the_last_resume_point(stage, loss_fn, nth, last, world, tmp_path, monkeypatch):
    module, calls = STAGES[stage], [0]
    real = getattr(module, loss_fn)

    def nan_at_nth_call(*a, **kw):
        calls[0] += 1
        out, nan = real(*a, **kw), float("nan") if calls[0] == nth else 1.0
        return (out[0] * nan, out[1]) if isinstance(out, tuple) else out * nan

    monkeypatch.setattr(module, loss_fn, nan_at_nth_call)
    out = tmp_path / stage
    with pytest.raises(SystemExit, match=f"{stage}: non-finite loss.*the last good state is {out / 'resume.pt'}"):
        run(stage, argv(stage, world, out))
    assert not (out / "model").exists()
    state = torch.load(out / "resume.pt")
    assert state.get("step", state.get("iteration")) == last  # the resume point before the bad step

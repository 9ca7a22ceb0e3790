"""report.py: a report built from real stage outputs on a tiny world, checked by parsing the HTML."""
import base64
import html.parser
import json

import cv2
import numpy as np
import pytest
import torch

import data
import eval as ev
import model as M
import ppo
import report
import train_rm
from conftest import tiny_world

torch.set_num_threads(1)


class Page(html.parser.HTMLParser):
    """Every tag with its attributes, every table row as its cells' text, and all text."""

    def __init__(self, text):
        super().__init__()
        self.tags, self.rows, self.text, self.in_cell = [], [], [], False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self.rows[-1].append("")
            self.in_cell = True

    def handle_endtag(self, tag):
        self.in_cell = self.in_cell and tag not in ("td", "th")

    def handle_data(self, d):
        self.text.append(d)
        if self.in_cell:
            self.rows[-1][-1] += d


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """What make reproduce leaves behind, in miniature: eval of two models (+ benchmark), an RM, a PPO log."""
    root = tmp_path_factory.mktemp("run")
    tok = tiny_world(root, n_sft=3, n_rl=2, n_eval=4, vocab_size=300)
    shapes, sft = root / "shapes", str(root / "sft")
    torch.manual_seed(1)
    rm = M.load_pretrained(sft, kind="policy", new_head="reward")
    M.save_checkpoint(rm, tok, str(root / "rm"), extra_config={"stage": "rm", "score_mean": 0.25, "score_std": 2.0})
    with torch.no_grad():  # the report's RM: larger random weights, so that different answers score differently
        for name, p in rm.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    M.save_checkpoint(rm, tok, str(root / "rm_sharp"), extra_config={"score_mean": 0.25, "score_std": 2.0})
    ppo.main(ppo.Args(prompts=str(shapes / "rl.jsonl"), sft=sft, rm=str(root / "rm"), out=str(root / "ppo"),
                      iterations=3, rollout_batch=2, minibatch=2, max_new_tokens=4, sample_every=10))
    ev.main(ev.Args(models=[f"sft={sft}", f"rlaif={sft}"], data=str(shapes / "eval.jsonl"),
                    prior_data=str(shapes / "sft.jsonl"), out=str(root / "eval"), benchmark=str(shapes / "benchmark"),
                    max_new_tokens=4, device="cpu"))
    return root


def test_report_is_self_contained_and_complete(run):
    out = run / "report.html"
    report.main(report.Args(eval=str(run / "eval"), rm=str(run / "rm_sharp"), metrics=str(run / "ppo" / "metrics.jsonl"),
                            out=str(out), samples=3, frames=5, frame_height=40, device="cpu"))
    page = Page(out.read_text())
    text = "".join(page.text)
    # nothing fetched from elsewhere: every image is inline, no scripts, no links to follow
    assert not [a for t, a in page.tags if t in ("script", "link", "iframe")]
    assert all(a.get("src", "").startswith("data:image/png;base64,") for t, a in page.tags if t == "img")
    # the frame strips: one per sample, a real PNG of 5 frames of 40x40 with 2-pixel gaps
    imgs = [a["src"] for t, a in page.tags if t == "img"]
    assert len(imgs) == 3
    for src in imgs:
        png = cv2.imdecode(np.frombuffer(base64.b64decode(src.split(",", 1)[1]), np.uint8), cv2.IMREAD_COLOR)
        assert png.shape == (40, 5 * 40 + 4 * 2, 3) and png.std() > 0
    # the PPO curves: one SVG per key, a point per iteration
    svgs = [a for t, a in page.tags if t == "svg"]
    polylines = [a["points"].split() for t, a in page.tags if t == "polyline"]
    assert len(svgs) == len(report.CURVES) == 3 and [len(p) for p in polylines] == [3, 3, 3]
    log = [json.loads(l) for l in (run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert all(key in r for key, _ in report.CURVES for r in log)  # the keys ppo.py writes
    assert f"{max(r['kl'] for r in log):.3g}" in text
    # the results tables: a row per model, the benchmark under its judge's name
    results = json.loads((run / "eval" / "results.json").read_text())
    eval_rows = {r[0]: r for r in page.rows if len(r) == 3 + len(results["models"]["sft"]["by_type"])}
    assert set(eval_rows) == {"model", "prior", "sft", "rlaif"}
    assert eval_rows["sft"][-1] == f"{100 * results['models']['sft']['accuracy_micro']:.1f}"
    bench_rows = {r[0]: r for r in page.rows if len(r) == 9}
    assert set(bench_rows) == {"model", "prior", "sft", "rlaif"}
    assert bench_rows["sft"][1] == f"{results['benchmark']['models']['sft']['correctness']:.2f}"
    assert "judge: rule;" in text
    # the samples: question, ground truth, and every model's answer with its ground-truth and RM scores
    preds = {n: {r["id"]: r for r in map(json.loads, (run / "eval" / f"predictions_{n}.jsonl").read_text().splitlines())}
             for n in ("prior", "sft", "rlaif")}
    shown = [r for r in preds["sft"].values() if f"{r['id']}: {r['question']}" in text]
    assert len(shown) == 3 and len({r["video"] for r in shown}) == 3 and all(r["truth"] in text for r in shown)
    answer_rows = [r for r in page.rows if len(r) == 4 and r[0] != "model"]
    assert [r[0] for r in answer_rows] == ["prior", "sft", "rlaif"] * 3
    assert [r[1] for r in answer_rows] == [preds[n][s["id"]]["prediction"] for s in shown for n in ("prior", "sft", "rlaif")]
    rm_cells = []
    # the RM scores are the ones train_rm.py's own input and scoring give, normalised as ppo.py does
    tok, rm = data.load_tokenizer(str(run / "rm_sharp")), M.load_pretrained(str(run / "rm_sharp"), kind="reward")
    for s, rows in zip(shown, [answer_rows[i:i + 3] for i in range(0, 9, 3)]):
        seqs = [data.rm_input(tok, s["question"], preds[n][s["id"]]["prediction"], rm.cfg.n_video_tokens,
                                  rm.cfg.system) for n in ("prior", "sft", "rlaif")]
        video = data.load_video(s["video"], rm.cfg.num_frames, rm.cfg.vision.image_size)
        with torch.no_grad():
            raw = train_rm.scores(rm, seqs, torch.stack([video] * 3), rm.cfg.pad_token_id)
        assert [r[3] for r in rows] == [f"{(x - 0.25) / 2.0:+.3f}" for x in raw.tolist()]
        rm_cells += [r[3] for r in rows]
    assert len(set(rm_cells)) > 3  # the scores depend on the answer: the comparison above can fail


def test_report_without_rm_or_curves(run):
    out = run / "bare.html"
    report.main(report.Args(eval=str(run / "eval"), rm="", metrics="", out=str(out), samples=2, device="cpu"))
    page = Page(out.read_text())
    assert not [a for t, a in page.tags if t == "svg"] and len([a for t, a in page.tags if t == "img"]) == 2
    assert {r[3] for r in page.rows if len(r) == 4 and r[0] != "model"} == {"-"}


def test_pick_spreads_over_types_and_videos():
    rows = [{"type": t, "video": f"v{v}"} for v in range(6) for t in ("colour", "count", "order")]
    picked = report.pick(rows, 5, seed=0)
    assert picked == sorted(picked) and len({rows[i]["video"] for i in picked}) == 5
    assert {rows[i]["type"] for i in picked} == {"colour", "count", "order"}
    assert len(report.pick(rows, 50, seed=0)) == 6  # one per video at most
    assert report.pick(rows, 5, seed=0) != report.pick(rows, 5, seed=1)


def test_run_summary_collects_the_headline_numbers(run, tmp_path):
    for ctx, agree in (("none", 0.5), ("gt", 0.9)):
        (tmp_path / ctx).mkdir()
        (tmp_path / ctx / "summary.json").write_text(json.dumps({"context": ctx, "agreement": agree, "n_pairs": 3}))
    (tmp_path / "rm.json").write_text(json.dumps({"heldout_acc": 0.75, "n_heldout": 4}))
    (tmp_path / "seconds").mkdir()
    (tmp_path / "seconds" / "sft.s").write_text("12.5\n")
    out = tmp_path / "results.json"
    report.main(report.Args(eval=str(run / "eval"), rm="", metrics="", out=str(tmp_path / "r.html"), samples=1,
                            prefs=[str(tmp_path / "none"), str(tmp_path / "gt")], rm_summary=str(tmp_path / "rm.json"),
                            seconds=str(tmp_path / "seconds"), summary=str(out), device="cpu"))
    s = json.loads(out.read_text())
    results = json.loads((run / "eval" / "results.json").read_text())
    assert set(s["models"]) == {"prior", "sft", "rlaif"}
    assert s["models"]["sft"] == {k: results["models"]["sft"][k] for k in ("accuracy", "by_type")}
    assert s["judge_agreement"] == {"none": 0.5, "gt": 0.9} and s["rm_accuracy"] == 0.75 and s["seconds"] == {"sft": 12.5}
    assert "judge, context gt" in (tmp_path / "r.html").read_text()


def test_the_summary_make_waits_for_is_written_only_with_the_page(run, tmp_path):
    """make reproduce's target is results.json: a report that fails (here, a missing PPO log) must not leave it
    behind, or the next make would skip the page for good."""
    args = dict(eval=str(run / "eval"), rm="", out=str(tmp_path / "r.html"), samples=1, summary=str(tmp_path / "s.json"),
                device="cpu")
    with pytest.raises(FileNotFoundError):
        report.main(report.Args(metrics=str(tmp_path / "missing.jsonl"), **args))
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "r.html").exists()
    report.main(report.Args(metrics="", **args))
    assert (tmp_path / "s.json").exists() and (tmp_path / "r.html").exists()

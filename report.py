"""A self-contained HTML report of a run, to look at what the numbers mean.

For a sample of eval questions (one per video): the video as a strip of frames, the question, the ground
truth, and every evaluated model's answer with its ground-truth score and its reward-model score; the PPO
curves (score, KL, answer length) drawn as inline SVG from ppo.py's metrics.jsonl; eval.py's results tables
(the benchmark's with its judge named). One file, images inline, no scripts: it opens in any browser.
Reads only files the stages wrote (eval.py's --out folder, the RM checkpoint, PPO's log).

    python report.py --eval runs/tiny/eval --rm runs/tiny/rm/model --metrics runs/tiny/ppo/metrics.jsonl \
        --out runs/tiny/report.html
"""
import base64
import html
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

import data
import model as M


@dataclass
class Args:
    eval: str = "runs/tiny/eval"  # eval.py's --out: results.json and predictions_<name>.jsonl
    rm: str = "runs/tiny/rm/model"  # reward model that scores the shown answers ("" = no RM scores)
    metrics: str = "runs/tiny/ppo/metrics.jsonl"  # ppo.py's per-iteration log, for the curves ("" = no curves)
    out: str = "runs/tiny/report.html"  # the report
    prefs: list = field(default_factory=list)  # make_prefs.py run folders (summary.json): judge agreement per context
    rm_summary: str = ""  # train_rm.py's summary.json: held-out accuracy ("" = none)
    seconds: str = ""  # folder of <stage>.s files, each a stage's wall seconds (written by make reproduce)
    summary: str = ""  # also write the run's numbers here as JSON (models, judge_agreement, rm_accuracy, seconds)
    samples: int = 8  # eval questions shown, each from a different video
    frames: int = 8  # frames in each strip, sampled uniformly
    frame_height: int = 96  # pixels; the tiny world's 48-pixel frames are enlarged without smoothing
    seed: int = 0  # which questions are shown
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


CURVES = [("score", "score (RM, after penalties)"), ("kl", "KL to the SFT policy (nats per answer)"),
          ("answer_len", "answer length (tokens)")]  # ppo.py's metrics.jsonl keys, one per iteration


def frame_strip(video, n, height):
    """data:image/png URL of n frames side by side, 2-pixel gaps, enlarged to `height` with nearest-neighbour."""
    frames = [cv2.resize(f, (round(f.shape[1] * height / f.shape[0]), height), interpolation=cv2.INTER_NEAREST)
              for f in data._read_frames(video, n)]  # RGB uint8, as the models see them before normalisation
    gap = np.full((height, 2, 3), 255, np.uint8)
    strip = np.concatenate([x for f in frames for x in (f, gap)][:-1], axis=1)
    ok, png = cv2.imencode(".png", cv2.cvtColor(strip, cv2.COLOR_RGB2BGR))
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def svg_curve(title, xs, ys, w=320, h=190, m=40):
    """A line chart as inline SVG: the series scaled into the plot box, both axes' ranges labelled."""
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: m + (x - x0) / ((x1 - x0) or 1) * (w - 2 * m)
    sy = lambda y: h - m - (y - y0) / ((y1 - y0) or 1) * (h - 2 * m)
    text = lambda x, y, s, anchor="middle": (f'<text x="{x:.0f}" y="{y:.0f}" font-size="11" '
                                             f'text-anchor="{anchor}">{html.escape(s)}</text>')
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}">'
            + text(w / 2, 16, title)
            + f'<rect x="{m}" y="{m}" width="{w - 2 * m}" height="{h - 2 * m}" fill="none" stroke="#bbb"/>'
            + f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
            + "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="1.8" fill="#1f77b4"/>' for x, y in zip(xs, ys))
            + text(m - 4, m + 4, f"{y1:.3g}", "end") + text(m - 4, h - m + 4, f"{y0:.3g}", "end")
            + text(m, h - m + 14, f"{x0:g}") + text(w - m, h - m + 14, f"{x1:g}") + text(w / 2, h - 8, "iteration")
            + "</svg>")


@torch.no_grad()
def rm_scores(path, questions, device):
    """questions: [(question, video, [answer, ...])] -> [[score, ...]]. Each answer reaches the RM exactly as
    train_rm.py trains it: the conversation, the answer's EOS, then the evaluation request (data.RM_PROMPT,
    = data.rm_suffix after the EOS), read at the last real token; normalised with the RM's own mean / std,
    as ppo.py does, so 0 is an average SFT answer."""
    rm = M.load_pretrained(path, kind="reward").to(device).eval()
    tok, extra, cfg = data.load_tokenizer(path), M.load_config(path)[1], rm.cfg
    if "score_mean" not in extra or "score_std" not in extra:
        raise ValueError(f"{path}: config.json lacks the RM's score_mean / score_std (written by train_rm.py)")
    out = []
    for question, video, answers in questions:
        seqs = [data.rm_input(tok, question, a, cfg.n_video_tokens, cfg.system) for a in answers]
        ids, mask = data.pad(seqs, cfg.pad_token_id), data.pad([[1] * len(s) for s in seqs], 0)
        v = data.load_video(video, cfg.num_frames, cfg.vision.image_size)
        raw = rm.reward(ids.to(device), mask.to(device), v.expand(len(seqs), *v.shape).to(device)).float().cpu()
        out.append(((raw - extra["score_mean"]) / extra["score_std"]).tolist())
    return out


def pick(rows, k, seed):
    """k rows from different videos, taking the question types in turn (a seeded shuffle within each type),
    so the sample shows every type; returned in file order."""
    by_type = {}
    for i in random.Random(seed).sample(range(len(rows)), len(rows)):
        by_type.setdefault(rows[i]["type"], []).append(i)
    seen, out = set(), []
    while len(out) < k and any(by_type.values()):
        for t in sorted(by_type):
            while by_type[t] and rows[by_type[t][0]]["video"] in seen:
                by_type[t].pop(0)
            if by_type[t] and len(out) < k:
                out.append(by_type[t].pop(0))
                seen.add(rows[out[-1]]["video"])
    return sorted(out)


def results_tables(results):
    """eval.py's results.json as HTML tables: accuracy per question type; the benchmarks under their judge."""
    esc, parts = html.escape, []
    models = results.get("models", {})
    if models:
        types = list(dict.fromkeys(t for m in models.values() for t in m["by_type"]))
        head = "".join(f"<th>{esc(c)}</th>" for c in ["model", *types, "overall", "micro"])
        rows = "".join(f"<tr><td>{esc(n)}</td>" + "".join(
            f"<td>{'-' if v is None else f'{100 * v:.1f}'}</td>"
            for v in [m["by_type"].get(t) for t in types] + [m["accuracy"], m["accuracy_micro"]]) + "</tr>"
            for n, m in models.items())
        parts.append(f"<table><caption>Accuracy (%) on {esc(str(results['settings']['data']))}; describe = slot F1"
                     f"</caption><tr>{head}</tr>{rows}</table>")
    bench = results.get("benchmark")
    if bench:
        cols = ["correctness", "detail", "context", "temporal", "consistency", "qa_accuracy", "qa_score"]
        fmt = lambda c, v: "-" if v is None else f"{100 * v:.1f}" if c == "qa_accuracy" else f"{v:.2f}"
        head = "".join(f"<th>{esc(c)}</th>" for c in ["model", *cols, "failed"])
        rows = "".join(f"<tr><td>{esc(n)}</td>" + "".join(f"<td>{fmt(c, m[c])}</td>" for c in cols)
                       + f"<td>{sum(m['failed'].values())}</td></tr>" for n, m in bench["models"].items())
        parts.append(f"<table><caption>Video-ChatGPT benchmark (0-5) and zero-shot QA (accuracy %, score 0-5); "
                     f"judge: <b>{esc(bench['judge'])}</b>; failed = unreadable judge replies</caption>"
                     f"<tr>{head}</tr>{rows}</table>")
    return "\n".join(parts)


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:auto;padding:1em}table{border-collapse:collapse;"
         "margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}caption{text-align:left;"
         "padding:4px 0}.sample{border-top:1px solid #ddd;padding:.5em 0}img{image-rendering:pixelated}")


def run_summary(results, prefs, rm_summary, seconds):
    """The run's headline numbers in one dict: accuracy per model and type, the judge's agreement with the
    oracle per context mode, the RM's held-out accuracy on AI labels, wall seconds per stage."""
    read = lambda p: json.loads(Path(p).read_text())
    return {"models": {n: {"accuracy": m["accuracy"], "by_type": m["by_type"]} for n, m in results.get("models", {}).items()},
            "judge_agreement": {s["context"]: s.get("agreement") for s in map(read, (Path(p, "summary.json") for p in prefs))},
            "rm_accuracy": read(rm_summary)["heldout_acc"] if rm_summary else None,
            "seconds": {f.stem: float(f.read_text()) for f in sorted(Path(seconds).glob("*.s"))} if seconds else {}}


def main(a: Args):
    esc = html.escape
    # 1. the results and every model's predictions (eval.py's files); rows are matched by question id
    results = json.loads(Path(a.eval, "results.json").read_text())
    preds = {n: {r["id"]: r for _, r in data.read_records(Path(a.eval, f"predictions_{n}.jsonl"))}
             for n in results.get("models", {}) if Path(a.eval, f"predictions_{n}.jsonl").exists()}
    names = list(preds)
    rows = [r for r in preds[names[0]].values() if all(r["id"] in p for p in preds.values())] if names else []
    if rows and "video" not in rows[0]:
        raise ValueError(f"{a.eval}: predictions without their video (an older eval.py wrote them); run eval.py again")
    rows = [r for r in rows if r["video"]]  # a text-only question has no frames to show
    shown = [rows[i] for i in pick(rows, a.samples, a.seed)]

    # 2. the RM's score of every shown answer
    questions = [(r["question"], r["video"], [preds[n][r["id"]]["prediction"] for n in names]) for r in shown]
    scores = rm_scores(a.rm, questions, a.device) if a.rm and shown else [[None] * len(names)] * len(shown)

    # 3. the page: tables, curves, samples
    body = [f"<h1>VLM-RLAIF run report</h1><p>eval folder <code>{esc(a.eval)}</code>; decoding: temperature "
            f"{results['settings']['temperature']}, at most {results['settings']['max_new_tokens']} new tokens</p>",
            "<h2>Results</h2>", results_tables(results)]
    summary = run_summary(results, a.prefs, a.rm_summary, a.seconds)
    if summary["judge_agreement"] or summary["rm_accuracy"] is not None or summary["seconds"]:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}"
        body.append("<table><caption>AI feedback: agreement (%) with the oracle on pairs that differ in "
                    "correctness, per judge context; RM held-out accuracy (%) on AI labels</caption>"
                    + "".join(f"<tr><td>judge, context {esc(c)}</td><td>{pct(v)}</td></tr>"
                              for c, v in summary["judge_agreement"].items())
                    + f"<tr><td>RM held-out</td><td>{pct(summary['rm_accuracy'])}</td></tr></table>")
        body.append("<table><caption>wall seconds per stage</caption>" + "".join(
            f"<tr><td>{esc(k)}</td><td>{v:.0f}</td></tr>" for k, v in summary["seconds"].items()) + "</table>")
    if a.metrics:
        log = [r for _, r in data.read_records(a.metrics) if "iteration" in r]
        body.append(f"<h2>PPO ({len(log)} iterations, <code>{esc(a.metrics)}</code>)</h2><div>")
        body += [svg_curve(title, [r["iteration"] for r in log], [r[key] for r in log]) for key, title in CURVES
                 if log and all(key in r for r in log)]
        body.append("</div>")
    body.append(f"<h2>Samples ({len(shown)} eval questions)</h2><p>score: against the ground truth (exact match; "
                "slot F1 for descriptions). RM: the reward model's score, normalised so that 0 is an average SFT "
                f"answer{'' if a.rm else ' (no --rm given)'}.</p>")
    for r, rm in zip(shown, scores):
        answers = "".join(f"<tr><td>{esc(n)}</td><td>{esc(preds[n][r['id']]['prediction'])}</td>"
                          f"<td>{preds[n][r['id']]['score']:.2f}</td><td>{'-' if s is None else f'{s:+.3f}'}</td></tr>"
                          for n, s in zip(names, rm))
        body.append(f'<div class="sample"><img alt="frames of {esc(str(r["video"]))}" '
                    f'src="{frame_strip(r["video"], a.frames, a.frame_height)}"><p><b>{esc(r["type"])}</b> '
                    f'<code>{esc(str(r["id"]))}</code>: {esc(r["question"])}<br>ground truth: <b>{esc(r["truth"])}</b></p>'
                    f"<table><tr><th>model</th><th>answer</th><th>score</th><th>RM</th></tr>{answers}</table></div>")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    data.write_atomic(a.out, f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>VLM-RLAIF report</title>'
                             f"<style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    print(f"report: wrote {a.out} ({len(shown)} samples, {len(names)} models)")
    if a.summary:  # written last: make reproduce's target, so it exists only once the page does
        data.write_atomic(a.summary, json.dumps(summary, indent=1))
        # the run's headline table, printed last by make reproduce
        types = [t for t in data.QTYPES if any(t in m["by_type"] for m in summary["models"].values())]
        w = max(len(n) for n in ["model", *summary["models"]])
        print(f"{'model':<{w}}" + "".join(f"{t:>10}" for t in types + ["overall"]))
        for n, m in summary["models"].items():
            print(f"{n:<{w}}" + "".join(f"{100 * v:>10.1f}" for v in [m["by_type"].get(t, 0) for t in types] + [m["accuracy"]]))
        print("judge agreement with the oracle: " + ", ".join(f"{c} {100 * v:.1f}%" for c, v in summary["judge_agreement"].items()
                                                               if v is not None)
              + (f"; RM held-out accuracy {100 * summary['rm_accuracy']:.1f}%" if summary["rm_accuracy"] is not None else "")
              + f"; wrote {a.summary}")


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

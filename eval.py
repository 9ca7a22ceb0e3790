"""Evaluate checkpoints side by side on held-out video QA, against a prior baseline.

Each model answers every question of the eval file with fixed decoding (greedy by default; the reference's
T=0.2 sampling as an option, SPEC 3). Answers are scored against the ground truth: exact match after
normalisation for short answers, slot-level F1 (count, objects, motion, appear/leave) for descriptions.
A 'prior' row answers the most frequent TRAINING answer of each question type, so every number has a floor.

    python eval.py --models runs/shapes/sft runs/shapes/ppo --data data/shapes/eval.jsonl --out runs/eval

Writes results.json (merged with any earlier run in --out), predictions_<name>.jsonl and config.json.
"""
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
from model import gather, init_distributed, load_pretrained


@dataclass
class Args:
    models: list = field(default_factory=lambda: ["runs/tiny/sft/model"])  # checkpoints; "name=path" names a row
    data: str = "data/shapes/eval.jsonl"  # eval conversations with a `type` per record (data.py's eval split)
    prior_data: str = "data/shapes/sft.jsonl"  # the prior's answers come from TRAINING data: eval answers would leak
    out: str = "runs/eval"  # results.json, predictions_<name>.jsonl, config.json
    temperature: float = 0.0  # 0 = greedy (deterministic); SPEC 3: T=0.2 sampling in the reference
    max_new_tokens: int = 64  # longest shapes description is ~40 tokens; SPEC 3: 512 in the reference
    batch_size: int = 32  # prompts generated together (left-padded)
    limit: int = 0  # evaluate only the first N records (0: all), for quick runs
    seed: int = 0  # sampling generator seed; irrelevant when greedy
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- scoring (pure)
def qtype_of(record):
    return record.get("type", "other")  # files without types (e.g. the reference's) score as one bucket


def prior_answers(records):
    """{type: most frequent answer of that type}; ties go to the alphabetically first answer, so the prior
    does not depend on the file's order."""
    counts = {}
    for r in records:  # a multi-turn record lists each turn's type in `types` (data.py's packed sft QA)
        for t, (_, answer) in zip(r.get("types") or [qtype_of(r)] * len(r["turns"]), r["turns"]):
            counts.setdefault(t, Counter())[answer.strip()] += 1
    return {t: min(c, key=lambda a: (-c[a], a)) for t, c in counts.items()}


def ordered(types):  # data.QTYPES order, then any other types alphabetically
    return [t for t in data.QTYPES if t in types] + sorted(set(types) - set(data.QTYPES))


def summarize(qtypes, scores):
    """Per-type mean scores, their macro average ("accuracy": every type weighs the same, so the many
    short-answer questions do not swamp `order`, which is rarer) and the plain mean over records."""
    by_type = {t: [s for q, s in zip(qtypes, scores) if q == t] for t in ordered(set(qtypes))}
    by_type = {t: sum(v) / len(v) for t, v in by_type.items()}
    return {"accuracy": sum(by_type.values()) / len(by_type), "accuracy_micro": sum(scores) / len(scores),
            "by_type": by_type, "n": len(scores)}


def merge_results(old, models, settings):
    """Add this run's models to an earlier results.json, replacing same-named entries. Refuses to mix numbers
    from different data or decoding settings in one table (they would not be comparable)."""
    if old and old["settings"] != settings:
        raise ValueError(f"results.json was made with settings {old['settings']}, this run uses {settings}; "
                         "use another --out")
    return {"models": {**(old or {}).get("models", {}), **models}, "settings": settings}


def table(results):
    """Fixed-width table: a row per model, a column per question type (data.QTYPES order) + overall."""
    types = ordered({t for m in results.values() for t in m["by_type"]})
    cols = types + ["overall", "micro"]
    w = max(len(n) for n in [*results, "model"])
    lines = [f"{'model':<{w}}" + "".join(f"  {c:>{max(len(c), 6)}}" for c in cols)]
    for name, m in results.items():
        vals = [m["by_type"].get(t) for t in types] + [m["accuracy"], m["accuracy_micro"]]
        lines.append(f"{name:<{w}}" + "".join(
            f"  {'-' if v is None else f'{100 * v:.1f}':>{max(len(c), 6)}}" for c, v in zip(cols, vals)))
    return "\n".join(lines)


def model_name(spec):
    """'name=path' -> (name, path); a bare path is named after its run folder (runs/x/sft/model -> sft)."""
    name, sep, path = spec.partition("=")
    if sep and "/" not in name:
        return name, path
    p = Path(spec)
    return (p.parent.name if p.name == "model" else p.name), spec


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_answers(name, path, records, args):
    model = load_pretrained(path, kind="policy").to(args.device).eval()
    tok, cfg = data.load_tokenizer(path), model.cfg
    data.check_tokenizer(tok, cfg, path)
    generator = torch.Generator(args.device).manual_seed(args.seed)  # same stream for every model
    answers, decoded = [], {}  # decoded: video path -> frames
    for i in tqdm(range(0, len(records), args.batch_size), desc=name):
        batch = records[i:i + args.batch_size]
        # earlier turns (if any) are context; the last question is asked, its answer is the truth
        prompts = [data.encode(tok, r["turns"][:-1] + [(r["turns"][-1][0], None)], cfg.n_video_tokens, system=cfg.system)[0]
                   for r in batch]
        ids = data.pad(prompts, cfg.pad_token_id, left=True)  # left: generation continues every row (SPEC 5)
        mask = data.pad([[1] * len(p) for p in prompts], 0, left=True)  # from lengths: correct whatever ids hold
        for r in batch:  # several questions share a video: decode each once
            if r["video"] not in decoded:
                decoded[r["video"]] = data.load_video(r["video"], cfg.num_frames, cfg.vision.image_size)
        videos = torch.stack([decoded[r["video"]] for r in batch])
        resp, _ = model.generate(ids.to(args.device), mask.to(args.device), videos.to(args.device),
                                 args.max_new_tokens, args.temperature, generator=generator)
        for row in resp.tolist():
            n = row.index(cfg.eos_token_id) if cfg.eos_token_id in row else len(row)
            answers.append(tok.decode(row[:n], skip_special_tokens=True).strip())
    return answers


# ----------------------------------------------------------------------------- the stage
def main(args):
    torch.manual_seed(args.seed)
    rank, world, device = init_distributed()  # torchrun: each rank answers a contiguous share of the questions
    if world > 1:
        args.device = device
    out = Path(args.out)
    named = dict(model_name(s) for s in args.models)
    if len(named) < len(args.models) or "prior" in named:
        raise ValueError(f"model names must be unique and not 'prior': {list(map(model_name, args.models))}; "
                         "name them with name=path")
    settings = {"data": args.data, "prior_data": args.prior_data, "limit": args.limit,
                "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    # results.json is merged into, so models can be added one run at a time; a settings clash fails here,
    # before any generation
    results_file = out / "results.json"
    merged = merge_results(json.loads(results_file.read_text()) if results_file.exists() else None, {}, settings)

    # 1. load the eval records and the prior's answers (most frequent per type in the TRAINING file)
    records = data.read_conversations(args.data)[:args.limit or None]
    if not records:
        raise ValueError(f"{args.data}: no records to evaluate")
    qtypes = [qtype_of(r) for r in records]
    truths = [r["turns"][-1][1] for r in records]
    prior = prior_answers(data.read_conversations(args.prior_data))
    print(f"eval: {len(records)} questions from {args.data} ("
          + ", ".join(f"{t} {qtypes.count(t)}" for t in ordered(qtypes)) + ")")

    # 2. generate: every model answers every question with the same decoding settings
    answers = {"prior": [prior.get(t, "") for t in qtypes]}  # a type unseen in training: empty answer
    for name, path in named.items():
        t0 = time.time()
        share = records[rank * len(records) // world:(rank + 1) * len(records) // world]
        answers[name] = gather(generate_answers(name, path, share, args))  # every rank's, in order
        print(f"{name}: {len(records)} answers in {time.time() - t0:.0f}s from {path}")
    if rank > 0:
        return None  # scoring and files are rank 0's

    # 3. score against the ground truth
    results, scores = {}, {}
    for name, preds in answers.items():
        scores[name] = [data.score_answer(t, p, y) for t, p, y in zip(qtypes, preds, truths)]
        results[name] = summarize(qtypes, scores[name])
        print(f"{name}: accuracy {100 * results[name]['accuracy']:.1f}% "
              f"(micro {100 * results[name]['accuracy_micro']:.1f}%)")

    # 4. report: predictions per model, results merged with earlier runs in --out, one table of all of them
    # (nothing is written before this point: an eval that fails leaves no output)
    data.start_run(out, args, resume=False)
    for name, preds in answers.items():
        rows = [{"id": r["id"], "type": t, "question": r["turns"][-1][0].replace(data.VIDEO, "").strip(),
                 "truth": y, "prediction": p, "score": s}
                for r, t, y, p, s in zip(records, qtypes, truths, preds, scores[name])]
        data.write_atomic(out / f"predictions_{name}.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    merged = merge_results(merged, results, settings)
    data.write_atomic(results_file, json.dumps(merged, indent=1))
    print("accuracy (%), describe = slot F1; overall = mean over types, micro = mean over questions")
    print(table(merged["models"]))
    print(f"wrote {results_file} and predictions_*.jsonl")
    return merged


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

"""Evaluate checkpoints side by side on held-out video QA, against a prior baseline, and on the benchmarks.

Each model answers every question of the eval file with fixed decoding (greedy by default; the reference's T=0.2
sampling as an option, SPEC 3), scored against the ground truth: exact match after normalisation, slot F1 for
descriptions, word F1 for records without one of the world's types (free-form answers, e.g. Video-ChatGPT's).
A 'prior' row answers the most frequent TRAINING answer of each question type: every number has a floor.

With --benchmark, the models also answer the Video-ChatGPT benchmark (correctness, detail, context, temporal,
consistency; 0-5) and zero-shot QA (accuracy, score) from the official files (SPEC 4), scored by a judge: `rule`
(deterministic matching: a proxy, not GPT), `hf:PATH` (local Hugging Face causal LM) or `openai:URL` (OpenAI-compatible
chat endpoint). Numbers compare only under one judge (SPEC 5): results.json records it and refuses to mix judges.
With --rm, each model also answers by the best of 6 of its samples by that reward model (rows <name>_bo6 and
<name>_bo6_logp), and by its own likelihood alone (<name>_bo6_pi, the baseline): a measurement of how far the RM
could lift the policy (README).

    python eval.py --models sft=runs/tiny/sft/model rlaif=runs/tiny/ppo/model --data data/shapes/eval.jsonl --out runs/eval
    python eval.py --models sft=runs/tiny/sft/model --benchmark data/shapes/benchmark --judge rule
    python eval.py --models sft=runs/tiny/sft/model --rm runs/tiny/rm/model --out runs/tiny/eval_bo6

Writes results.json (merged with any earlier run in --out), predictions_<name>.jsonl, config.json and, with
--benchmark, benchmark_<name>.jsonl (every judged item with the judge's replies).
"""
import ast
import json
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

import data
from model import gather, init_distributed, load_config, load_pretrained


@dataclass
class Args:
    models: list = field(default_factory=lambda: ["runs/tiny/sft/model"])  # checkpoints; "name=path" names a row
    data: str = "data/shapes/eval.jsonl"  # eval conversations with a `type` per record ("" = benchmark only)
    video_root: str = ""  # folder the --data file's video paths are relative to ("" = its folder)
    stream_videos: bool = False  # decode each video when its batch needs it, not all up front (large data sets)
    prior_data: str = "data/shapes/sft.jsonl"  # the prior's answers come from TRAINING data ("" = no prior row)
    out: str = "runs/eval"  # results.json, predictions_<name>.jsonl, benchmark_<name>.jsonl, config.json
    temperature: float = 0.0  # 0 = greedy (deterministic); SPEC 3: T=0.2 sampling in the reference
    max_new_tokens: int = 64  # longest shapes description is ~40 tokens; SPEC 3: 512 in the reference
    batch_size: int = 32  # prompts generated together (left-padded)
    limit: int = 0  # evaluate only the first N records of --data and of each benchmark file (0: all)
    seed: int = 0  # sampling generator seed; irrelevant when greedy
    rm: str = ""  # MEASUREMENT of an RM: each model also answers by the best of --best_of samples by it (README)
    best_of: int = 6  # samples per question with --rm, at temperature 1 as PPO samples
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    benchmark: str = ""  # folder with generic_qa / temporal_qa / consistency_qa / zeroshot_qa .json ("" = skip)
    videos: str = ""  # folder holding the benchmark's video_name files ("" = <benchmark>/../videos)
    judge: str = "rule"  # benchmark judge: rule | hf:PATH (local HF causal LM) | openai:URL (chat endpoint)
    judge_model: str = "gpt-3.5-turbo"  # model name sent to an openai: judge (part of the judge's name)
    judge_key_env: str = "OPENAI_API_KEY"  # environment variable with the openai: judge's key (unset: none sent)
    judge_retries: int = 2  # re-asks after an unparseable reply (then counted as failed); HTTP retries too
    judge_timeout: float = 60.0  # seconds per openai: request
    judge_max_tokens: int = 48  # a model judge's reply budget: the dict asked for, plus room for a preamble


# ----------------------------------------------------------------------------- scoring (pure)
def qtype_of(record):  # the asked (last) question's type; files without types (the reference's) score as one bucket
    return str((record.get("types") or [record.get("type", "other")])[-1])  # ActivityNet-QA's types are numbers


def prior_answers(records):
    """{type: most frequent answer of that type}; ties go to the alphabetically first (file order is irrelevant)."""
    counts = {}
    for r in records:  # a multi-turn record lists each turn's type in `types` (data.py's packed sft QA)
        for t, (_, answer) in zip(map(str, r.get("types") or [qtype_of(r)] * len(r["turns"])), r["turns"]):
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


def merge_results(old, models, settings, bench=None):
    """Add this run's models (and benchmark scores) to an earlier results.json, replacing same-named entries.
    Refuses to mix numbers from different data, decoding settings or judges (they would not be comparable)."""
    if old and old["settings"] != settings:
        raise ValueError(f"results.json was made with settings {old['settings']}, this run uses {settings}; "
                         "use another --out")
    old = old or {}
    # a model evaluated again takes its best-of-N rows with it: they came from the older checkpoint (or RM)
    stale = lambda k: any(re.fullmatch(rf"{re.escape(n)}_bo\d+(_logp|_pi)?", k) for n in models)
    merged = {"models": {**{k: v for k, v in old.get("models", {}).items() if not stale(k)}, **models},
              "settings": settings}
    if bench or "benchmark" in old:
        merged["benchmark"] = {"judge": settings["judge"],
                               "models": {**old.get("benchmark", {}).get("models", {}), **(bench or {})}}
    return merged


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


# ----------------------------------------------------------------------------- benchmarks and judges (SPEC 3, 4)
FILES = {task: f"{task}_qa.json" for task in ("generic", "temporal", "consistency", "zeroshot")}
TASK_CRITERIA = {"generic": ["correctness", "detail", "context"], "temporal": ["temporal"],
                 "consistency": ["consistency"], "zeroshot": ["qa"]}  # as the Video-ChatGPT benchmark pairs them
VIDEO_EXTS = ("", ".mp4", ".avi", ".mkv", ".mov", ".webm")


def find_video(folder, name):
    """Benchmark files name videos with or without an extension (MSVD's are .avi, ActivityNet's .mp4 or .mkv),
    and ActivityNet-QA names the YouTube id alone, whose file is v_<id>.mp4 (as the reference's qa_infer.py opens)."""
    tries = [Path(folder, f"{prefix}{name}{ext}") for prefix in ("", "v_") for ext in VIDEO_EXTS]
    if found := next((f for f in tries if f.exists()), None):
        return str(found)
    raise FileNotFoundError(f"{Path(folder, str(name))}: video not found (also tried {', '.join(VIDEO_EXTS[1:])} and "
                            "a v_ prefix); --videos must be the folder the benchmark's video_name files are in")


def read_benchmark(folder, videos, limit=0):
    """The benchmark files present in `folder` -> items {task, type, video, questions: [Q] or [Q1, Q2], truth}."""
    items = []
    for task, file in FILES.items():
        if not Path(folder, file).exists():  # a folder may hold some of the files only, e.g. zero-shot QA alone
            continue
        for r in data.read_benchmark(Path(folder, file))[:limit or None]:
            qs = [r["Q1"], r["Q2"]] if "Q1" in r else [r["Q"] if "Q" in r else r["question"]]
            items.append({"task": task, "type": qtype_of(r), "video_name": r["video_name"],
                          "video": find_video(videos, r["video_name"]), "questions": qs,
                          "truth": r["A"] if "A" in r else r["answer"]})
    if not items:
        raise FileNotFoundError(f"{folder}: none of {', '.join(FILES.values())}")
    return items


def overlap(pred, truth, qtype):
    """(precision, recall) of the facts pred states against truth's: description slots for descriptions,
    normalised words otherwise. An empty answer has precision 0: saying nothing is not being right."""
    facts = data.description_slots if qtype == "describe" else (lambda text: set(data.normalize(text).split()))
    p, t = facts(pred), facts(truth)
    hits = len(p & t)
    return (hits / len(p) if p else float(not t)), (hits / len(t) if t else 1.0)


def match(qtype, pred, truth):
    """data.score_answer for our question types; word-level F1 for files without types (free-form answers)."""
    if qtype in data.QTYPES:
        return data.score_answer(qtype, pred, truth)
    p, r = overlap(pred, truth, qtype)
    return 2 * p * r / (p + r) if p + r else 0.0


def rule_judge(criterion, item, preds):
    """A deterministic PROXY for the GPT judge (no model): correctness and temporal = match with the truth,
    detail = recall of the truth's facts, context = precision (nothing stated that the truth lacks),
    consistency = both phrasings answered right, zero-shot QA = yes iff an exact match; scaled to 0-5."""
    t, truth = item["type"], item["truth"]
    if criterion == "consistency":
        s = min(match(t, p, truth) for p in preds)
    elif criterion in ("detail", "context"):
        s = overlap(preds[0], truth, t)[criterion == "detail"]
    else:
        s = match(t, preds[0], truth)
    return {"score": 5 * s, **({"pred": "yes" if s == 1 else "no"} if criterion == "qa" else {})}, []


# The official criteria's spirit in our own words; the judge sees no video, so the given answer is the truth.
CRITERIA = {
    "correctness": "Correctness: does the model's answer state the same facts as the correct answer? Any claim "
                   "that contradicts the correct answer or is not supported by it lowers the score.",
    "detail": "Detail: does the model's answer cover every point of the correct answer, specifically rather "
              "than vaguely?",
    "context": "Context: does the model's answer fit what happens in the video, as the correct answer tells "
               "it, without describing things that are not there?",
    "temporal": "Temporal understanding: does the model's answer get the order, direction and timing of events "
                "right, as the correct answer states them?",
    "consistency": "Consistency: the same thing was asked twice in different words. Do the two answers agree "
                   "with each other and with the correct answer?",
    "qa": "Does the model's answer mean the same as the correct answer? Synonyms and paraphrases match.",
}
SCORE_FORMAT = "Reply with a Python dict and nothing else: {'score': N}, N an integer from 0 (worst) to 5 (best)."
QA_FORMAT = ("Reply with a Python dict and nothing else: {'pred': 'yes' or 'no', 'score': N}, 'yes' if the "
             "answers match, N an integer from 0 to 5 for how well they match.")
REMINDER = "Your reply could not be read. Reply with the Python dict only, for example: "


def judge_prompt(criterion, item, preds):
    qs = item["questions"]
    lines = ["You grade a model's answers to questions about a video, against the correct answer.",
             CRITERIA[criterion]]
    if criterion == "consistency":
        lines += [f"Question 1: {qs[0]}", f"Question 2: {qs[1]}", f"Correct answer: {item['truth']}",
                  f"Model's answer to question 1: {preds[0]}", f"Model's answer to question 2: {preds[1]}"]
    else:
        lines += [f"Question: {qs[0]}", f"Correct answer: {item['truth']}", f"Model's answer: {preds[0]}"]
    return "\n".join(lines + [QA_FORMAT if criterion == "qa" else SCORE_FORMAT])


def parse_reply(text, qa=False):
    """{'score': 0-5[, 'pred': 'yes'|'no']} from a judge's reply, or None. Reads the asked-for dict (Python or
    JSON quoting) anywhere in the reply, else 'score: 4' / 'pred: yes' written out, or a reply opening with yes/no."""
    found = {}
    for m in re.finditer(r"\{.*?\}", text, re.S):  # the last dict wins: a judge may quote the format first
        for load in (ast.literal_eval, json.loads):
            try:
                d = load(m.group())
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(d, dict):
                found = {str(k).lower(): v for k, v in d.items()}
                break
    # 'Score: 4', 'Score (0-5): 4', 'score = -1' (kept negative, so out of range: a failure, not a 1)
    if "score" not in found and (m := re.search(r"score\s*(?:\([^)]*\)|\[[^]]*\])?[\s:=]{0,4}(-?\d+(?:\.\d+)?)",
                                                text, re.I)):
        found["score"] = m.group(1)
    if qa and "pred" not in found and (m := re.search(r"pred\w*\W{0,4}(yes|no)\b", text, re.I)
                                       or re.search(r"^\W*(yes|no)\b", text, re.I)):  # a written-out pred first
        found["pred"] = m.group(1)
    try:
        score = float(found["score"])
    except (KeyError, TypeError, ValueError):
        return None
    # read as the reference's evaluate scripts do (Video-ChatGPT, vlm-rlaif): "yes" if the pred contains it, else
    # "no" if it contains that; the score truncated to an integer (4.8 counts 4), so means compare with theirs
    pred = str(found.get("pred") or "").lower()  # a None pred is no verdict, not "none" (which contains "no")
    pred = "yes" if "yes" in pred else "no" if "no" in pred else pred
    if not 0 <= score <= 5 or (qa and pred not in ("yes", "no")):
        return None
    return {"score": int(score), **({"pred": pred} if qa else {})}


def model_judge(ask, retries):
    """A judge from ask(prompt) -> reply text. An unparseable reply is asked again with a format reminder
    (which also changes a greedy judge's reply); after `retries` re-asks the item counts as failed."""
    def judge(criterion, item, preds):
        prompt, replies = judge_prompt(criterion, item, preds), []
        example = "{'pred': 'yes', 'score': 4}" if criterion == "qa" else "{'score': 4}"
        for attempt in range(retries + 1):
            replies.append(ask(prompt if attempt == 0 else f"{prompt}\n{REMINDER}{example}"))
            if result := parse_reply(replies[-1], qa=criterion == "qa"):
                return result, replies
        return None, replies
    return judge


def hf_ask(path, device, max_new_tokens):
    """Greedy replies from a local Hugging Face causal LM, in its chat template when the tokenizer has one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, lm = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).to(device).eval()

    @torch.no_grad()
    def ask(prompt):
        if tok.chat_template:  # an instruction-tuned judge replies best in the format it was tuned on
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
        else:
            ids = tok(f"{prompt}\nReply: ", return_tensors="pt").input_ids
        out = lm.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), do_sample=False,
                          max_new_tokens=max_new_tokens,
                          pad_token_id=tok.eos_token_id if tok.pad_token_id is None else tok.pad_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return ask


def openai_ask(url, model, key_env, timeout, retries, max_tokens):
    """Replies from an OpenAI-compatible chat-completions endpoint (a local inference server, or OpenAI's), at
    temperature 0. Network errors, timeouts, 429 and 5xx are retried with backoff; other HTTP errors fail."""
    endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/chat/completions") else "/chat/completions")
    headers = {"Content-Type": "application/json"}
    if os.environ.get(key_env):
        headers["Authorization"] = f"Bearer {os.environ[key_env]}"

    def ask(prompt):
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                           "max_tokens": max_tokens}).encode()
        for attempt in range(retries + 1):
            try:
                with urllib.request.urlopen(urllib.request.Request(endpoint, body, headers), timeout=timeout) as r:
                    return json.load(r)["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as e:  # before URLError: it is one
                if (e.code < 500 and e.code not in (408, 429)) or attempt == retries:
                    raise RuntimeError(f"judge {endpoint}: HTTP {e.code}: {e.read()[:300]!r}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == retries:
                    raise RuntimeError(f"judge {endpoint}: {e} (after {retries + 1} tries)") from None
            time.sleep(2 ** attempt)
    return ask


def make_judge(args):
    """-> (name, judge). The name goes into results.json and every table: scores of different judges differ."""
    kind, _, where = args.judge.partition(":")
    if kind == "rule" and not where:
        return "rule", rule_judge
    if kind == "hf" and where:
        return args.judge, model_judge(hf_ask(where, args.device, args.judge_max_tokens), args.judge_retries)
    if kind == "openai" and where:
        ask = openai_ask(where, args.judge_model, args.judge_key_env, args.judge_timeout, args.judge_retries,
                         args.judge_max_tokens)
        return f"{args.judge} model={args.judge_model}", model_judge(ask, args.judge_retries)
    raise ValueError(f"--judge {args.judge!r}: expected rule, hf:PATH or openai:URL")


def bench_summary(rows):
    """Means over the replies the judge gave (failed items are counted, never averaged in as zeros)."""
    rows = {c: [r for r in rows if r["criterion"] == c] for c in CRITERIA}
    ok = {c: [r for r in rs if r["score"] is not None] for c, rs in rows.items()}
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    out = {c: mean([r["score"] for r in ok[c]]) for c in CRITERIA if c != "qa"}
    out.update(qa_accuracy=mean([r["pred"] == "yes" for r in ok["qa"]]), qa_score=mean([r["score"] for r in ok["qa"]]))
    return {**out, "n": {c: len(rs) for c, rs in rows.items()}, "failed": {c: len(rows[c]) - len(ok[c]) for c in rows}}


BENCH_COLS = ["correctness", "detail", "context", "temporal", "consistency", "qa_accuracy", "qa_score"]


def bench_table(bench):
    """Fixed-width: a row per model, the five criteria (0-5), zero-shot accuracy (%) and score, failed replies."""
    w = max(len(n) for n in [*bench["models"], "model"])
    lines = [f"judge: {bench['judge']}", f"{'model':<{w}}" + "".join(f"  {c:>11}" for c in BENCH_COLS + ["failed"])]
    for name, m in bench["models"].items():
        vals = [("-" if m[c] is None else f"{100 * m[c]:.1f}" if c == "qa_accuracy" else f"{m[c]:.2f}")
                for c in BENCH_COLS]
        lines.append(f"{name:<{w}}" + "".join(f"  {v:>11}" for v in vals + [str(sum(m["failed"].values()))]))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_answers(name, path, records, args, temperature=None, first=0):
    """Each record's last question answered by the checkpoint at `path` -> (answers, log pi of each answer).
    `first`: where the records start in the whole eval (a torchrun rank's share): the sampler's seed, with --seed."""
    model = load_pretrained(path, kind="policy").to(args.device).eval()
    tok, cfg = data.load_tokenizer(path), model.cfg
    data.check_tokenizer(tok, cfg, path)
    # the same stream for every model; each rank's share its own (the same seed would repeat rank 0's draws)
    generator = torch.Generator(args.device).manual_seed(args.seed * 1_000_003 + first)
    decoded = data.load_videos(records, cfg.num_frames, cfg.vision.image_size, args.data or args.benchmark,
                               args.stream_videos)
    answers, logps = [], []
    for i in tqdm(range(0, len(records), args.batch_size), desc=name):
        batch = records[i:i + args.batch_size]
        # earlier turns (if any) are context; the last question is asked, its answer is the truth
        prompts = [data.encode(tok, r["turns"][:-1] + [(r["turns"][-1][0], None)], cfg.n_video_tokens, system=cfg.system)[0]
                   for r in batch]
        ids = data.pad(prompts, cfg.pad_token_id, left=True)  # left: generation continues every row (SPEC 5)
        mask = data.pad([[1] * len(p) for p in prompts], 0, left=True)  # from lengths: correct whatever ids hold
        videos = torch.stack(data.fetch(decoded, [str(r["video"]) for r in batch]))  # questions share videos
        resp, logp = model.generate(ids.to(args.device), mask.to(args.device), videos.to(args.device),
                                    args.max_new_tokens, args.temperature if temperature is None else temperature,
                                    generator=generator)
        logps += logp.sum(1).tolist()  # generate gives 0 after EOS
        for row in resp.tolist():
            n = row.index(cfg.eos_token_id) if cfg.eos_token_id in row else len(row)
            answers.append(tok.decode(row[:n], skip_special_tokens=True).strip())
    return answers, logps


@torch.no_grad()
def best_of_n(name, path, records, args, first=0):
    """MEASUREMENT of the RM at --rm (README): each question sampled --best_of times at temperature 1, and the
    sample kept with the highest RM score (_bo), RM + log pi(answer) (_bo_logp: the most likely answer of PPO's
    KL-regularised optimum at kl_coef 1, pi(y) exp(r(y))), or log pi alone (_bo_pi: the baseline; the RM knows
    something the policy's likelihood does not only where _bo_logp beats it)."""
    n, reps = args.best_of, [r for r in records for _ in range(args.best_of)]
    samples, logps = generate_answers(f"{name} x{n}", path, reps, args, temperature=1.0, first=first * n)
    rm, tok = load_pretrained(args.rm, kind="reward").to(args.device).eval(), data.load_tokenizer(args.rm)
    scores, decoded = [], data.load_videos(records, rm.cfg.num_frames, rm.cfg.vision.image_size, args.data,
                                           args.stream_videos)
    for i in range(0, len(reps), args.batch_size):
        batch = list(zip(reps[i:i + args.batch_size], samples[i:i + args.batch_size]))
        seqs = [data.rm_input(tok, data.question_text(r["turns"][-1][0]), a, rm.cfg.n_video_tokens,
                              rm.cfg.system) for r, a in batch]
        ids, mask = data.pad(seqs, rm.cfg.pad_token_id, left=True), data.pad([[1] * len(q) for q in seqs], 0, left=True)
        videos = torch.stack(data.fetch(decoded, [str(r["video"]) for r, _ in batch]))
        scores += rm.reward(ids.to(args.device), mask.to(args.device), videos.to(args.device)).tolist()
    extra = load_config(args.rm)[1]
    r = ((torch.tensor(scores) - extra["score_mean"]) / extra["score_std"]).view(-1, n)  # as ppo.py normalises
    pick = lambda s: [samples[i * n + j] for i, j in enumerate(s.argmax(1).tolist())]
    logp = torch.tensor(logps).view(-1, n)
    return {f"{name}_bo{n}": pick(r), f"{name}_bo{n}_logp": pick(r + logp), f"{name}_bo{n}_pi": pick(logp)}


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
    if not args.data and not args.benchmark:
        raise ValueError("nothing to evaluate: give --data, --benchmark or both")
    if args.rm and load_config(args.rm)[0].kind != "reward":  # before any generation
        raise ValueError(f"--rm {args.rm}: not a reward model (train_rm.py writes one)")
    settings = {"data": args.data, "prior_data": args.prior_data, "limit": args.limit,
                "temperature": args.temperature, "max_new_tokens": args.max_new_tokens, "seed": args.seed}
    judge_name, judge = make_judge(args) if args.benchmark else (None, None)  # a bad --judge fails here
    if args.benchmark:
        settings.update(benchmark=args.benchmark, judge=judge_name)
    # results.json is merged into (models can be added one run at a time): a settings clash fails before generating
    results_file = out / "results.json"
    merged = merge_results(json.loads(results_file.read_text()) if results_file.exists() else None, {}, settings)

    # 1. load the eval records and the prior's answers (most frequent per type in the TRAINING file;
    # --prior_data "": no prior row, e.g. for a benchmark without our training data)
    records = data.read_conversations(args.data, args.video_root or None)[:args.limit or None] if args.data else []
    if args.data and not records:
        raise ValueError(f"{args.data}: no records to evaluate")
    if bad := next((r for r in records if not r["video"]), None):
        raise ValueError(f"{args.data}: record {bad['id']} has no video; eval asks questions about videos")
    qtypes, truths = [qtype_of(r) for r in records], [r["turns"][-1][1] for r in records]
    prior = prior_answers(data.read_conversations(args.prior_data, check_videos=False)) if args.prior_data else None
    items = read_benchmark(args.benchmark, args.videos or Path(args.benchmark).parent / "videos", args.limit) \
        if args.benchmark else []  # read now: a missing benchmark video fails before any generation
    if args.rm and records:  # the longest question with the longest answer must fit the RM's window: now, not after sampling
        rm_cfg, rm_tok = load_config(args.rm)[0], data.load_tokenizer(args.rm)
        need, rid = max(((len(data.rm_input(rm_tok, data.question_text(r["turns"][-1][0]), "", rm_cfg.n_video_tokens,
                                          rm_cfg.system)) + args.max_new_tokens, r["id"]) for r in records), key=lambda x: x[0])
        if need > rm_cfg.llm.max_position_embeddings:
            raise ValueError(f"{args.data}: record {rid}: its question and an answer of --max_new_tokens {args.max_new_tokens} "
                             f"take {need} tokens as the RM reads them, over its context window of "
                             f"{rm_cfg.llm.max_position_embeddings}")
    if records:
        print(f"eval: {len(records)} questions from {args.data} ("
              + ", ".join(f"{t} {qtypes.count(t)}" for t in ordered(qtypes)) + ")")

    # 2. generate: every model answers every question with the same decoding settings
    answers = {"prior": [prior.get(t, "") for t in qtypes]} if prior and records else {}  # unseen type: ""
    source = {"prior": args.prior_data, **named}  # what made each row: recorded in results.json
    for name, path in named.items() if records else ():
        t0 = time.time()
        first = rank * len(records) // world
        share = records[first:(rank + 1) * len(records) // world]
        answers[name] = gather(generate_answers(name, path, share, args, first=first)[0])  # every rank's, in order
        print(f"{name}: {len(records)} answers in {time.time() - t0:.0f}s from {path}")
        if args.rm:  # rows that measure the RM, not the model: <name>_bo6, _bo6_logp, _bo6_pi (README)
            for k, v in best_of_n(name, path, share, args, first).items():
                answers[k], source[k] = gather(v), f"{path}, best of {args.best_of} by {args.rm}"
    if rank > 0:
        return None  # scoring and files are rank 0's

    # 3. score against the ground truth, predictions per model (all files are written in step 5: an eval that
    # fails, in the benchmark's judging too, leaves no output and no half-updated folder)
    results, files = {}, {}
    for name, preds in answers.items():
        if len(preds) != len(truths):  # zip would score a shorter list silently
            raise RuntimeError(f"{name}: {len(preds)} answers to {len(truths)} questions")
        scores = [match(t, p, y) for t, p, y in zip(qtypes, preds, truths)]  # untyped (free-form): word F1
        results[name] = m = {**summarize(qtypes, scores), "source": source[name]}
        print(f"{name}: accuracy {100 * m['accuracy']:.1f}% (micro {100 * m['accuracy_micro']:.1f}%)")
        rows = [{"id": r["id"], "type": t, "video": r["video"], "truth": y, "prediction": p, "score": s,
                 "question": data.question_text(r["turns"][-1][0])}
                for r, t, y, p, s in zip(records, qtypes, truths, preds, scores)]
        files[f"predictions_{name}.jsonl"] = rows

    # 4. the benchmarks: every model (and the prior) answers every question; the judge scores each item per criterion
    bench = {}
    if args.benchmark:
        # greedy: a question several items ask (a consistency Q1 is often a generic question too) is answered once;
        # sampling: each is asked apart, as the reference's separate inference scripts do (one shared sample would
        # make two identical phrasings agree by construction)
        key = lambda i, j, it: (it["video"], it["questions"][j]) if args.temperature == 0 else (i, j)
        questions = {}  # key -> (video, question, type)
        for i, it in enumerate(items):
            for j, q in enumerate(it["questions"]):
                questions.setdefault(key(i, j, it), (it["video"], q, it["type"]))
        index = {k: n for n, k in enumerate(questions)}
        print(f"benchmark: {len(items)} items, {len(questions)} questions to answer from {args.benchmark}; "
              f"judge {judge_name}")
        recs = [{"video": v, "turns": [(f"{data.VIDEO}\n{q}", "")]} for v, q, _ in questions.values()]
        bench_answers = {"prior": [prior.get(t, "") for *_, t in questions.values()]} if prior else {}
        bench_answers |= {name: generate_answers(name, path, recs, args)[0] for name, path in named.items()}
        for name, ans in bench_answers.items():
            rows = []
            for i, it in enumerate(tqdm(items, desc=f"judge {name}")):
                preds = [ans[index[key(i, j, it)]] for j in range(len(it["questions"]))]
                for c in TASK_CRITERIA[it["task"]]:
                    result, replies = judge(c, it, preds)
                    rows.append({**{k: v for k, v in it.items() if k != "video"}, "criterion": c, "predictions": preds,
                                 "score": None, "pred": None, **(result or {}), "replies": replies})
            files[f"benchmark_{name}.jsonl"] = rows
            bench[name] = bench_summary(rows)

    # 5. the files, then results merged with earlier runs in --out, one table of all of them
    data.start_run(out, args, resume=False)
    for name, rows in files.items():
        data.write_jsonl(out / name, rows)
    merged = merge_results(merged, results, settings, bench)
    data.write_atomic(results_file, json.dumps(merged, indent=1))
    if merged["models"]:
        print("accuracy (%), describe = slot F1; overall = mean over types, micro = mean over questions")
        print(table(merged["models"]))
    if bench:
        print("Video-ChatGPT benchmark (0-5), zero-shot QA accuracy (%) and score (0-5); failed = unreadable replies")
        print(bench_table(merged["benchmark"]))
    print(f"wrote {results_file}, predictions_*.jsonl" + (", benchmark_*.jsonl" if bench else ""))
    return merged


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

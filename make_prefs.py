"""Stage 2: context-aware AI preferences (SPEC 1, 3). The SFT model answers each RL prompt K times, then judges
pairs of its own answers while reading a detailed description of the video (the context), asked in both
orders so its position bias cancels. The labels train the reward model (train_rm.py).

    python make_prefs.py --out runs/tiny/prefs_gt --context gt      # the world's descriptions as context
    python make_prefs.py --out runs/tiny/prefs_self --context self  # the SFT model describes 3 clips itself
    python make_prefs.py --out runs/tiny/prefs_none --context none  # no context (ablation)
    python make_prefs.py --out runs/tiny/prefs_gt --resume true     # continue an interrupted run

Writes prefs.jsonl (one line per pair), prefs_reference.json (the reference code's layout, SPEC 4),
metrics.jsonl (one line per finished batch: the progress record for --resume), config.json, and, for
MEASUREMENT only, oracle.jsonl (which answer the ground truth prefers) and summary.json.
"""
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import model as M


@dataclass
class Args:
    prompts: str = "data/shapes/rl.jsonl"  # RL prompts {id, video, question, type, description}
    video_root: str = ""  # folder the prompts' video paths are relative to ("" = the prompt file's folder)
    sft: str = "runs/tiny/sft/model"  # the SFT checkpoint: samples the answers and describes the clips
    judge: str = ""  # "" = the SFT model judges its own answers (SPEC 1); else another checkpoint
    out: str = "runs/tiny/prefs_gt"  # run folder
    context: str = "gt"  # gt = the prompt's description | self = the SFT model's clip descriptions | none
    n_clips: int = 3  # self context: consecutive clips described and concatenated (SPEC 3: 3 worked best)
    k: int = 6  # answers per prompt, judged in pairs (0,1), (2,3), ... (SPEC 3: 2; 3 pairs: a better RM, EXPERIMENTS.md)
    temperature: float = 1.0  # answer sampling temperature (SPEC 3: PPO samples at 1.0 too)
    top_p: float = 1.0  # nucleus sampling for the answers
    max_new_tokens: int = 64  # per answer and per clip description (a world description is ~40 tokens)
    batch_size: int = 32  # prompts per batch; batch b is always prompts[b*B:(b+1)*B] (resume unit)
    limit: int = 0  # only the first N prompts (0: all), for quick runs
    truth: str = ""  # MEASUREMENT only: rl answers ("" = truth/rl_answers.jsonl next to --prompts)
    resume: bool = False  # continue the run in --out (same arguments) instead of starting over
    seed: int = 0  # batch b samples with a generator seeded from (seed, b): a restart on the same device changes nothing
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- pure pieces
def pairs_of(answers):
    """Consecutive pairs (0,1), (2,3), ... of one prompt's K answers, dropping pairs whose normalised texts are
    equal (no preference to learn). -> ([(pair_index, a1, a2), ...], n_dropped)."""
    pairs = [(j, answers[2 * j], answers[2 * j + 1]) for j in range(len(answers) // 2)]
    kept = [p for p in pairs if data.normalize(p[1]) != data.normalize(p[2])]
    return kept, len(pairs) - len(kept)


def clip_spans(n):
    """n consecutive clips covering the video, as fractions (SPEC 3: the reference describes clips)."""
    return [(i / n, (i + 1) / n) for i in range(n)]


def verdict(p_a_first, p_a_second):
    """Both orders averaged to cancel position bias (SPEC 5). p_a_first = P(A) with answer_1 shown as A,
    p_a_second = P(A) with answer_2 shown as A. p1 = P(answer_1 is better). -> (p1, preference, confidence)."""
    p1 = (p_a_first + (1 - p_a_second)) / 2
    return p1, 1 if p1 >= 0.5 else 2, max(p1, 1 - p1)


def oracle_verdict(qtype, a1, a2, truth):
    """MEASUREMENT only: the answer the ground truth scores higher (None on a tie). -> (1|2|None, s1, s2)."""
    s1, s2 = data.score_answer(qtype, a1, truth), data.score_answer(qtype, a2, truth)
    return (None if s1 == s2 else 1 if s1 > s2 else 2), s1, s2


def to_reference(rec):
    """One of our preference records -> the reference code's layout (SPEC 4): its RM loader puts each output in
    the place of the conversation's last (gpt) turn, so one is there. The video stays a path (it reads frame
    lists, `images`)."""
    return {"id": rec["id"], "video": rec["video"],
            "conversations": [{"from": "human", "value": f"{data.VIDEO}\n{rec['question']}"}, {"from": "gpt", "value": ""}],
            "output_1": {"value": rec["answer_1"]}, "output_2": {"value": rec["answer_2"]},
            "preference": rec["preference"]}


def summarize(prefs, oracle, metrics):
    """Run statistics from the written files (so a resumed run counts every batch once)."""
    n = len(prefs)
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    out = {"n_prompts": sum(m["n_prompts"] for m in metrics), "n_pairs": n,
           "n_dropped_identical": sum(m["n_dropped_identical"] for m in metrics),
           "n_dropped_too_long": sum(m.get("n_dropped_too_long", 0) for m in metrics),  # the judge's context
           "preference_1_rate": mean([p["preference"] == 1 for p in prefs]),
           "mean_confidence": mean([p["confidence"] for p in prefs]),
           # position bias: how often the two orders pick different answers, and the mean P(first shown)
           "orders_disagree": mean([(p["p_a"][0] >= 0.5) != (p["p_a"][1] < 0.5) for p in prefs]),
           "p_first_shown": mean([(p["p_a"][0] + p["p_a"][1]) / 2 for p in prefs]),
           "seconds": round(sum(m["seconds"] for m in metrics), 1)}
    if oracle is not None:
        # a pair has no oracle line if the truth file appeared only when an interrupted run was resumed
        by_key = {(o["id"], o["pair"]): o["oracle"] for o in oracle}
        judged = [(p["type"], p["preference"] == by_key[p["id"], p["pair"]]) for p in prefs
                  if by_key.get((p["id"], p["pair"])) is not None]
        out["oracle_verdicts"] = len(judged)
        out["agreement"] = mean([ok for _, ok in judged])
        out["agreement_by_type"] = {t: mean([ok for q, ok in judged if q == t])
                                    for t in sorted({q for q, _ in judged}, key=str)}
    return out


# ----------------------------------------------------------------------------- model calls
def left_padded(tok, users, cfg, device):
    """One-turn generation prompts in the model's template, LEFT-padded (SPEC 5): every row's last column is
    its last prompt token."""
    prompts = [data.encode(tok, [(u, None)], cfg.n_video_tokens, system=cfg.system)[0] for u in users]
    ids = data.pad(prompts, tok.pad_token_id, left=True)
    mask = data.pad([[1] * len(p) for p in prompts], 0, left=True)  # from lengths: right whatever ids hold
    return ids.to(device), mask.to(device)


def generate_texts(model, tok, users, videos, max_new_tokens, temperature, top_p, generator):
    """Answer each user turn about its video; text up to the first EOS (an answer that hits max_new_tokens
    without EOS is kept as it is)."""
    ids, mask = left_padded(tok, users, model.cfg, videos.device)
    resp, _ = model.generate(ids, mask, videos, max_new_tokens, temperature, top_p, generator)
    eos = model.cfg.eos_token_id
    return [data.plain_text(tok.decode(r[:r.index(eos)] if eos in r else r, skip_special_tokens=True).strip())
            for r in resp.tolist()]


def reply_logprobs(model, tok, users, replies, videos):
    """log P(reply | user turn) under the model for R sets of replies to the same B user turns -> (R, B): the
    sum over each reply's tokens and its EOS, exactly the tokens data.encode trains on. The user turns (video,
    context, both answers: nearly every token) run once into a KV cache that each set of replies continues,
    as generation does, so judging both answers costs one pass over the prompt, not two."""
    cfg, device = model.cfg, videos.device
    prompts = [data.encode(tok, [(u, None)], cfg.n_video_tokens, system=cfg.system)[0] for u in users]
    ids = data.pad(prompts, tok.pad_token_id, left=True).to(device)  # left: the last column is each last prompt token
    mask = data.pad([[1] * len(p) for p in prompts], 0, left=True).to(device)
    # a reply's tokens are what encode appends to the prompt (" reply" + EOS)
    answers = [[data.encode(tok, [(u, r)], cfg.n_video_tokens, system=cfg.system)[0][len(p):]
                for u, r, p in zip(users, rs, prompts)] for rs in replies]
    cache = M.KVCache(cfg.llm, len(users), ids.shape[1] + max(len(a) for rs in answers for a in rs), device,
                      model.lm_head.weight.dtype)
    first = model(ids, mask, videos, cache)[:, -1:]  # (B, 1, D): predicts each reply's first token
    out = []
    for rs in answers:
        cache.length = ids.shape[1]  # every set continues the same prompt
        reply = data.pad(rs, tok.pad_token_id).to(device)  # (B, N), right-padded
        reply_mask = data.pad([[1] * len(r) for r in rs], 0).to(device)
        hidden = torch.cat([first, model(reply, torch.cat([mask, reply_mask], 1), cache=cache)[:, :-1]], 1)  # (B, N, D)
        logp = model.logits(hidden).float().log_softmax(-1).gather(-1, reply[..., None]).squeeze(-1)  # (B, N)
        out.append((logp * reply_mask).sum(-1))
    return torch.stack(out)


def judge_fits(judge, tok, question, answer_1, answer_2, context):
    """Whether the judging turn and either reply fit the judge's context window (the other order has the same
    tokens). Past it RoPE runs on at positions never trained: a long pair gets no verdict rather than garbage."""
    user = f"{data.VIDEO}\n" + data.judge_prompt(question, answer_1, answer_2, context)
    return max(len(data.encode(tok, [(user, r)], judge.cfg.n_video_tokens, system=judge.cfg.system)[0])
               for r in (answer_1, answer_2)) <= judge.cfg.llm.max_position_embeddings


def prob_a(judge, tok, users, answers_a, answers_b, videos):
    """P(A is better) for each judging turn. The judge was trained to reply with the better answer itself
    (data.CRITERIA), so its verdict is its likelihood of replying with A's text against B's, softmax over the
    two -> (N,). (Replying with the letter was at chance for the tiny model, reading the answer is learned:
    EXPERIMENTS.md.)"""
    lp_a, lp_b = reply_logprobs(judge, tok, users, [answers_a, answers_b], videos)
    return torch.sigmoid(lp_a - lp_b).cpu()


# ----------------------------------------------------------------------------- files
def append(path, rows):
    """One write() in append mode: the lines of concurrent ranks never interleave within a batch."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, "".join(json.dumps(r) + "\n" for r in rows).encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def main(a: Args):
    torch.manual_seed(a.seed)
    rank, world, device = M.init_distributed()  # torchrun: ranks take batches in turn (b % world == rank)
    if world > 1:
        a.device = device  # this rank's GPU (or the CPU)
    out = Path(a.out)
    files = {k: out / f"{k}.jsonl" for k in ("prefs", "oracle", "metrics")}
    if a.context not in ("gt", "self", "none") or a.k < 2 or a.k % 2:
        raise ValueError(f"--context must be gt|self|none (got {a.context!r}) and --k even >= 2 (got {a.k})")
    prompts = data.read_prompts(a.prompts, a.video_root or None)[:a.limit or None]
    for p in prompts:  # a frame list (the reference's `images`) as a tuple: videos key caches below
        p["video"] = tuple(p["video"]) if isinstance(p["video"], list) else p["video"]
    ids = [p["id"] for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{a.prompts}: prompt ids must be unique (they key pairs, the oracle and resume)")
    if a.context == "gt" and (bad := next((p["id"] for p in prompts if not p.get("description")), None)):
        raise ValueError(f"{a.prompts}: prompt {bad} has no 'description'; --context gt needs one per prompt")
    truth_file = Path(a.truth or Path(a.prompts).parent / "truth" / "rl_answers.jsonl")
    truth = {r["id"]: r for _, r in data.read_records(truth_file)} if truth_file.exists() else None
    if truth is not None and (missing := [i for i in ids if i not in truth]):
        raise ValueError(f"{truth_file}: no answer for prompt {missing[0]} (and {len(missing) - 1} more)")
    root = Path(a.video_root or Path(a.prompts).parent)  # prefs keep video paths as rl.jsonl gives them: relative to root

    policy = M.load_pretrained(a.sft, kind="policy").to(a.device).eval()
    tok = data.load_tokenizer(a.sft)
    data.check_tokenizer(tok, policy.cfg, a.sft)
    judge, jtok = policy, tok
    if a.judge:
        judge, jtok = M.load_pretrained(a.judge, kind="policy").to(a.device).eval(), data.load_tokenizer(a.judge)
        data.check_tokenizer(jtok, judge.cfg, a.judge)

    # resume: a batch is done when its metrics line exists (written after its pairs); lines of other batches
    # are what an interrupted batch left behind and are dropped, then that batch runs again from its seed
    batches = [prompts[i:i + a.batch_size] for i in range(0, len(prompts), a.batch_size)]
    done = {m["batch"] for m in data.read_log(files["metrics"])} if a.resume else set()
    if rank == 0:  # the inputs are good (videos are checked to exist): write the run folder
        data.start_run(out, a, a.resume)  # first: a resume with another --batch_size or --limit fails here, cleanly
        kept_ids = {p["id"] for b in done for p in batches[b]}
        for name, path in files.items():
            keep = (lambda r: r["batch"] in done) if name == "metrics" else (lambda r: r["id"] in kept_ids)
            data.trim_log(path, keep)
    M.barrier()  # the other ranks append only once the files are trimmed
    todo = [b for b in range(len(batches)) if b not in done and b % world == rank]
    print(f"make_prefs: {len(prompts)} prompts in {len(batches)} batches ({len(done)} done; rank {rank} of {world} "
          f"takes {len(todo)}), K={a.k}, "
          f"context={a.context}, judge={a.judge or a.sft}" + ("" if truth else f"; no {truth_file}: no oracle stats"))

    frames = {}  # (path, num_frames, size, span) -> (F, 3, H, W); cleared every batch to bound memory

    def video(path, cfg, span=(0.0, 1.0)):
        key = (path, cfg.num_frames, cfg.vision.image_size, span)
        if key not in frames:
            frames[key] = data.load_video(path, cfg.num_frames, cfg.vision.image_size, span)
        return frames[key]

    # self context is computed once per video, for fixed chunks of videos (in order of first appearance), so a
    # description never depends on which batch asked first: a resumed run describes exactly as a full one
    order = {v: i for i, v in enumerate(dict.fromkeys(p["video"] for p in prompts))}
    chunk = max(1, a.batch_size // a.n_clips)
    contexts = {}

    def describe(path):
        if path not in contexts:
            c = order[path] // chunk
            paths = list(order)[c * chunk:(c + 1) * chunk]
            clips = torch.stack([video(v, policy.cfg, s) for v in paths for s in clip_spans(a.n_clips)])
            users = [f"{data.VIDEO}\n{data.QUESTIONS['describe'][0]}"] * len(clips)
            texts = generate_texts(policy, tok, users, clips.to(a.device), a.max_new_tokens, 0.0, 1.0, None)
            # joined with spaces: the judge learned to read whole-video descriptions ("The video shows ...");
            # clip markers would be text it never saw
            for i, v in enumerate(paths):
                contexts[v] = " ".join(texts[i * a.n_clips:(i + 1) * a.n_clips])
        return contexts[path]

    bar = tqdm(total=len(todo), desc="prefs", dynamic_ncols=True, disable=rank > 0)
    with torch.no_grad():
        for b in todo:
            batch = batches[b]
            t0 = time.time()
            frames.clear()
            gen = torch.Generator(a.device).manual_seed(a.seed * 1_000_003 + b)
            # 1. sample K answers per prompt from the SFT policy
            users = [f"{data.VIDEO}\n{p['question']}" for p in batch for _ in range(a.k)]
            vids = torch.stack([video(p["video"], policy.cfg) for p in batch for _ in range(a.k)]).to(a.device)
            texts = generate_texts(policy, tok, users, vids, a.max_new_tokens, a.temperature, a.top_p, gen)
            pairs, n_dropped = [], 0
            for i, p in enumerate(batch):
                kept, n = pairs_of(texts[i * a.k:(i + 1) * a.k])
                pairs += [(p, *pair) for pair in kept]
                n_dropped += n
            # 2. context: the world's description, the model's own clip descriptions, or none (ablation)
            ctx = [None if a.context == "none" else p["description"] if a.context == "gt" else describe(p["video"])
                   for p, *_ in pairs]
            fit = [judge_fits(judge, jtok, p["question"], a1, a2, c)  # else: no verdict (counted)
                   for (p, _, a1, a2), c in zip(pairs, ctx)]
            pairs, ctx = [x for x, ok in zip(pairs, fit) if ok], [c for c, ok in zip(ctx, fit) if ok]
            # 3. judge with context, in both orders: answer_1 shown as A, then answer_2 shown as A
            p_a = torch.empty(0, 2)
            if pairs:
                asked = [(p, c, shown) for (p, _, a1, a2), c in zip(pairs, ctx) for shown in ((a1, a2), (a2, a1))]
                users = [f"{data.VIDEO}\n" + data.judge_prompt(p["question"], *shown, c) for p, c, shown in asked]
                vids = torch.stack([video(p["video"], judge.cfg) for p, _, _ in asked]).to(a.device)
                p_a = prob_a(judge, jtok, users, [x for *_, (x, _) in asked], [y for *_, (_, y) in asked], vids).view(-1, 2)
            rows, oracle = [], []
            for (p, j, a1, a2), c, (pf, ps) in zip(pairs, ctx, p_a.tolist()):
                p1, pref, conf = verdict(pf, ps)
                rel = [os.path.relpath(f, root) for f in p["video"]] if isinstance(p["video"], tuple) \
                    else os.path.relpath(p["video"], root)
                rows.append({"id": p["id"], "pair": j, "video": rel,
                             "question": p["question"], "type": p.get("type"), "answer_1": a1, "answer_2": a2,
                             "preference": pref, "confidence": conf, "p1": p1, "p_a": [pf, ps],
                             "context_mode": a.context, "context": c})
                # 4. oracle, MEASUREMENT only: kept in its own file, never in prefs.jsonl
                if truth is not None:
                    t = truth[p["id"]]
                    o, s1, s2 = oracle_verdict(t.get("type") or p.get("type"), a1, a2, t["answer"])
                    oracle.append({"id": p["id"], "pair": j, "oracle": o, "score_1": s1, "score_2": s2})
            # 5. append the batch's pairs, then its metrics line: the record that the batch is complete
            append(files["prefs"], rows)
            append(files["oracle"], oracle)
            m = {"batch": b, "n_prompts": len(batch), "n_pairs": len(rows), "n_dropped_identical": n_dropped,
                 "n_dropped_too_long": fit.count(False),
                 "mean_confidence": round(sum(r["confidence"] for r in rows) / max(1, len(rows)), 4),
                 "seconds": round(time.time() - t0, 2)}
            append(files["metrics"], [m])
            bar.set_postfix(pairs=len(rows), conf=f"{m['mean_confidence']:.3f}")
            bar.update()
    bar.close()
    M.barrier()  # every rank's batches are written
    if rank > 0:
        return None

    # 6. the files in prompt order (ranks append batches as they finish, and train_rm's split and batches follow
    # the file's order: the same pairs in another order would train another RM), the reference layout and the
    # summary, from the files (so every batch counts once, whatever the restarts)
    pos = {i: n for n, i in enumerate(ids)}
    logs = {k: sorted(data.read_log(f), key=lambda r: r["batch"] if k == "metrics" else (pos[r["id"]], r["pair"]))
            for k, f in files.items() if f.exists()}
    for k, rows in logs.items():
        data.write_jsonl(files[k], rows)
    prefs = logs["prefs"]
    data.write_atomic(out / "prefs_reference.json", json.dumps([to_reference(r) for r in prefs], indent=1))
    s = {"context": a.context, "judge": a.judge or a.sft,
         **summarize(prefs, logs.get("oracle") if truth is not None else None, logs["metrics"])}
    data.write_atomic(out / "summary.json", json.dumps(s, indent=1))
    agree = "no oracle" if truth is None or s["agreement"] is None else \
        f"oracle agreement {100 * s['agreement']:.1f}% on {s['oracle_verdicts']}"
    print(f"make_prefs: {s['n_pairs']} pairs from {s['n_prompts']} prompts ({s['n_dropped_identical']} identical "
          f"and {s['n_dropped_too_long']} too long for the judge dropped), mean confidence "
          f"{s['mean_confidence'] or 0:.3f}, orders disagree {100 * (s['orders_disagree'] or 0):.1f}%, {agree}, "
          f"{s['seconds']:.0f}s -> {files['prefs']}")
    return s


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

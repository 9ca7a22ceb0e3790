"""Stage 3: the reward model (SPEC 3). Initialised from the SFT model with a new scalar head, it reads video +
question + answer + an evaluation request (NO context, as in the paper) and is trained with the Bradley-Terry
loss on the AI preferences of make_prefs.py. Scores are normalised to mean 0 / std 1 on the SFT answers.

    python train_rm.py --prefs runs/tiny/prefs_gt/prefs.jsonl --sft runs/tiny/sft/model --out runs/tiny/rm
    python train_rm.py --out runs/tiny/rm --resume true    # continue an interrupted run

Writes config.json, metrics.jsonl (per step: loss, acc; per epoch: held-out accuracy), summary.json and model/
(model.safetensors + config.json with the score normalisation + tokenizer files).
"""
import json
import math
import os
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M


@dataclass
class Args:
    prefs: str = "runs/tiny/prefs_gt/prefs.jsonl"  # preference pairs (ours or the reference's layout, SPEC 4)
    video_root: str = ""  # folder the prefs' video paths are relative to ("" = make_prefs' --video_root or prompt folder)
    stream_videos: bool = False  # decode each video when its batch needs it, not all up front (large data sets)
    sft: str = "runs/tiny/sft/model"  # SFT checkpoint the RM starts from (SPEC 3), and its tokenizer
    out: str = "runs/tiny/rm"  # run folder: config.json, metrics.jsonl, summary.json, model/
    oracle: str = ""  # MEASUREMENT only ("" = oracle.jsonl next to --prefs, if present); never trained on
    holdout: float = 0.1  # held-out fraction of pairs, split by video; capped by max_holdout (smaller wins)
    max_holdout: int = 500  # SPEC 3: 500 held out in the reference
    min_confidence: float = 0.8  # train on pairs the judge is this sure of (0.5 = all; >= 0.8: 86% right vs 76%, EXPERIMENTS.md)
    epochs: int = 2  # SPEC 3: 1 epoch on ~40k pairs; our set is small
    batch_size: int = 16  # pairs per step (SPEC 3)
    lr: float = 1e-4  # constant, no schedule (SPEC 3: 2e-5 with LoRA on a 13B; the tiny model needs more)
    grad_clip: float = 1.0  # max global gradient norm
    lora_r: int = 0  # 0 = train every weight (tiny model); SPEC 3: LoRA r=64 on real models
    lora_alpha: float = 64.0  # LoRA scaling numerator (alpha = r: scale 1; our choice)
    bf16: bool = False  # GPU path: bf16 autocast, frozen weights stored in bf16 (model.for_training)
    grad_ckpt: bool = False  # gradient checkpointing: recompute each LLM layer in backward, keep only its input
    save_every: int = 50  # steps between resume checkpoints
    resume: bool = False  # continue from out/resume.pt if present
    seed: int = 0  # split, data order and head initialisation
    device: str = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------- pure pieces
def split_videos(videos, holdout, max_holdout, seed):
    """Held-out videos (one per pair in `videos`): a seeded shuffle of the distinct videos, taken until
    min(ceil(holdout * pairs), max_holdout) pairs are held out. All pairs of one video fall on one side, so the
    held-out pairs are about videos the RM never saw (each rl video has several questions)."""
    target = min(math.ceil(holdout * len(videos)), max_holdout)
    counts, distinct = Counter(videos), sorted(set(videos))
    random.Random(seed).shuffle(distinct)
    held, n = set(), 0
    for v in distinct:
        if n >= target:
            break
        held.add(v)
        n += counts[v]
    return held


def batch_order(n, epochs, batch_size, seed):
    """The whole run as batches of pair indices, shuffled per epoch and fixed by the seed (so a resumed run
    replays exactly the same order). -> [(epoch, [i, ...]), ...]"""
    g = random.Random(seed)
    out = []
    for e in range(epochs):
        perm = g.sample(range(n), n)
        out += [(e, perm[i:i + batch_size]) for i in range(0, n, batch_size)]
    return out


def bt_loss(r1, r2, preference, n=None, mean=None):
    """Bradley-Terry: -log sigmoid(r_preferred - r_rejected), as the reference's BCE(r2 - r1, preference == 2),
    plus its centring term 1e-3 * |mean(r1 + r2)| that keeps the scores near 0 (SPEC 3). Written as a sum over
    the pairs / n, the centring as sign(mean) * sum(r1 + r2) / n (same value, same gradient), so that with data
    parallel (n, mean: the whole batch's, over the ranks) the ranks' gradients sum to the whole batch's."""
    label = (preference == 2).to(r1.dtype)
    n = len(r1) if n is None else n
    mean = float((r1 + r2).detach().mean()) if mean is None else mean
    sign = (mean > 0) - (mean < 0)  # the derivative of |mean|
    return (F.binary_cross_entropy_with_logits(r2 - r1, label, reduction="sum") + 1e-3 * sign * (r1 + r2).sum()) / n


def accuracy(r1, r2, preference):
    """Fraction of pairs where the RM scores the preferred answer higher (a tie counts for answer 1)."""
    return ((r2 > r1) == (preference == 2)).float().mean().item()


def scores(model, seqs, videos, pad_id, left=False):
    """RM scores of token sequences (one video each), padded into one batch; model.reward reads each row's
    last real token, so the padding side does not matter (tested)."""
    device = videos.device
    ids = data.pad(seqs, pad_id, left).to(device)
    mask = data.pad([[1] * len(s) for s in seqs], 0, left).to(device)
    return model.reward(ids, mask, videos).float()


def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def main(a: Args):
    torch.manual_seed(a.seed)  # the new head's initialisation
    rank, world, device = M.init_distributed()  # torchrun: one process per GPU, each on a share of every batch
    if world > 1:
        a.device = device
    out = Path(a.out)
    if a.epochs < 1 or a.batch_size < 1:
        raise ValueError(f"--epochs and --batch_size must be >= 1, got {a.epochs} and {a.batch_size}")
    tok = data.load_tokenizer(a.sft)
    model = M.load_pretrained(a.sft, kind="policy", new_head="reward").to(a.device)
    cfg = model.cfg
    data.check_tokenizer(tok, cfg, a.sft)
    if a.lora_r:
        M.add_lora(model, a.lora_r, a.lora_alpha)
    M.broadcast_parameters(model)
    # no torch.compile here: model.reward() calls forward() itself, so a compiled wrapper would not be used
    _, autocast = M.for_training(model, a.device, a.bf16, False, a.grad_ckpt)

    # 1. read the AI preferences; make_prefs keeps rl.jsonl's video paths, so they are relative to its folder
    # (named in the prefs run's config.json; a default like "data/shapes" would read another world's videos
    # silently: every world names them videos/rl_00000.mp4, ...)
    made_by = Path(a.prefs).parent / "config.json"
    made = json.loads(made_by.read_text()) if made_by.exists() else {}
    root = a.video_root or made.get("video_root") or (str(Path(made["prompts"]).parent) if made else None)
    prefs = data.read_prefs(a.prefs, root)
    if not prefs:
        raise ValueError(f"{a.prefs}: no preference pairs")
    if (bad := next((r for r in prefs if r.get("id") is None), None)) is not None:
        raise ValueError(f"{a.prefs}: a pair without 'id' (question {bad['question']!r}); pairs are matched "
                         "with the oracle and resumed by their prompt id")
    videos = data.load_videos(prefs, cfg.num_frames, cfg.vision.image_size, a.prefs, a.stream_videos)  # path -> video
    pairs = [{"id": str(r.get("id")), "pair": r.get("pair", 0), "preference": r["preference"],
              "confidence": r.get("confidence", 1.0), "video": r["video"],  # the reference's files: no confidence
              "seqs": [data.rm_input(tok, r["question"], r[f"answer_{i}"], cfg.n_video_tokens, cfg.system)
                      for i in (1, 2)]}
             for r in prefs]
    # an input past the context window would be read by RoPE at positions never trained: such pairs are left out
    fits = [max(map(len, p["seqs"])) <= cfg.llm.max_position_embeddings for p in pairs]
    pairs, n_too_long = [p for p, ok in zip(pairs, fits) if ok], fits.count(False)
    oracle_file = Path(a.oracle or Path(a.prefs).parent / "oracle.jsonl")
    oracle = {(str(r["id"]), r["pair"]): r["oracle"] for _, r in data.read_records(oracle_file)} \
        if oracle_file.exists() else {}

    # 2. held-out split by video, then the confidence filter on the training side only (so held-out numbers
    # are comparable across --min_confidence settings)
    held = split_videos([str(p["video"]) for p in pairs], a.holdout, a.max_holdout, a.seed)
    heldout = [p for p in pairs if str(p["video"]) in held]
    train_all = [p for p in pairs if str(p["video"]) not in held]
    train = [p for p in train_all if p["confidence"] >= a.min_confidence]
    if not train:
        raise ValueError(f"{a.prefs}: no training pairs left (min_confidence {a.min_confidence}, {len(heldout)} held out)")
    batches = batch_order(len(train), a.epochs, a.batch_size, a.seed)
    if rank == 0:
        data.start_run(out, a, a.resume)  # the inputs are good: the run folder may be written now

    def load(ps):  # both answers of each pair see its video: rows ordered [answer_1s..., answer_2s...]
        v = torch.stack(data.fetch(videos, [str(p["video"]) for p in ps]))
        return torch.cat([v, v]).to(a.device)

    def score_pairs(ps):  # -> r1, r2 (N,) without gradients; under torchrun each rank scores a contiguous share
        share, r = ps[rank * len(ps) // world:(rank + 1) * len(ps) // world], []
        with torch.no_grad(), autocast():
            for i in range(0, len(share), a.batch_size):
                b = share[i:i + a.batch_size]
                r.append(scores(model, [p["seqs"][0] for p in b] + [p["seqs"][1] for p in b], load(b),
                                cfg.pad_token_id).view(2, -1).cpu())
        r = torch.cat(r, 1) if r else torch.empty(2, 0)
        r = torch.tensor(M.gather(r.T.tolist())).view(-1, 2)  # (N, 2): every rank's share, in order
        return r[:, 0], r[:, 1]

    def evaluate(step, epoch):  # held-out accuracy on AI labels; agreement with the oracle (MEASUREMENT only)
        model.eval()
        r1, r2 = score_pairs(heldout)
        model.train()
        pref = torch.tensor([p["preference"] for p in heldout])
        known = [i for i, p in enumerate(heldout) if oracle.get((p["id"], p["pair"])) is not None]
        truth = torch.tensor([oracle[heldout[i]["id"], heldout[i]["pair"]] for i in known])
        return {"step": step, "epoch": epoch, "n_heldout": len(heldout),
                "heldout_acc": accuracy(r1, r2, pref) if heldout else None, "n_oracle": len(known),
                "heldout_oracle_agreement": accuracy(r1[known], r2[known], truth) if known else None}

    print(f"train_rm: {len(train)} training pairs ({len(train_all) - len(train)} below confidence "
          f"{a.min_confidence}, {n_too_long} too long for the context), {len(heldout)} held out ({len(held)} videos), "
          f"{len(batches)} steps")

    # 3. train with the Bradley-Terry loss
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, resume_file, metrics_file = 0, out / "resume.pt", out / "metrics.jsonl"
    if a.resume and resume_file.exists():
        state = torch.load(resume_file, map_location=a.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed from {resume_file} at step {step}")
    M.check_same(step, a.device, "the step to resume from")
    if rank == 0:
        data.trim_log(metrics_file, lambda r: r["step"] <= step)  # steps after the resume point run again

    model.train()
    bar = tqdm(total=len(batches), initial=step, desc="rm", dynamic_ncols=True, disable=rank > 0)
    t0, evals = time.time(), []
    while step < len(batches):
        epoch, idx = batches[step]
        mine = idx[rank::world]  # this rank's share of the batch (all of it in a plain run)
        b = [train[i] for i in mine or idx[:1]]  # an empty share: one pair at weight 0 (ranks step together)
        with autocast():
            r = scores(model, [p["seqs"][0] for p in b] + [p["seqs"][1] for p in b], load(b), cfg.pad_token_id)
        r1, r2 = r.view(2, -1)
        pref = torch.tensor([p["preference"] for p in b], device=r.device)
        n, total, correct = M.all_sum([len(mine), float((r1 + r2).detach().sum()) if mine else 0.0,
                                       accuracy(r1, r2, pref) * len(mine)], a.device).tolist()
        loss = bt_loss(r1, r2, pref, n, total / n) * (1 if mine else 0)  # this rank's share of the batch's loss
        value = float(M.all_sum(loss, a.device))  # the whole batch's loss, the same on every rank
        if not math.isfinite(value):
            raise SystemExit(f"train_rm: non-finite loss at step {step}; the last good state is "
                             f"{resume_file if resume_file.exists() else 'none (no resume point yet)'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        M.sync_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        step += 1
        rec = {"step": step, "epoch": epoch, "loss": round(value, 5), "acc": correct / n,
               "grad_norm": round(float(grad_norm), 4), "lr": a.lr, **M.gpu_peak_gb(a.device)}
        epoch_end = step == len(batches) or batches[step][0] != epoch
        if epoch_end:  # 4. held-out accuracy after every epoch (every rank scores a share)
            evals.append(evaluate(step, epoch))
        if rank > 0:
            continue  # logs and checkpoints are rank 0's
        with open(metrics_file, "a") as f:
            f.write("".join(json.dumps(r) + "\n" for r in [rec] + ([evals[-1]] if epoch_end else [])))
        bar.set_postfix(loss=f"{value:.3f}", acc=f"{rec['acc']:.2f}")
        bar.update()
        if epoch_end:
            bar.write(f"train_rm: epoch {epoch} held-out acc {pct(evals[-1]['heldout_acc'])} on {len(heldout)} pairs, "
                      f"oracle agreement {pct(evals[-1]['heldout_oracle_agreement'])} on {evals[-1]['n_oracle']}")
        if step % a.save_every == 0 and step < len(batches):
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, f"{resume_file}.tmp")
            os.replace(f"{resume_file}.tmp", resume_file)
    bar.close()

    # 5. normalise: mean 0 / std 1 over the SFT answers of the training pairs (scores are only comparable
    # within one RM, SPEC 5; PPO reads these from the checkpoint)
    model.eval()
    r1, r2 = score_pairs(train_all)
    all_scores = torch.cat([r1, r2])
    mean, std = all_scores.mean().item(), all_scores.std().item()
    if not std > 1e-6:  # NaN too: PPO and eval divide by it; an RM that scores every answer alike has learned nothing
        raise RuntimeError(f"the RM gives the {len(all_scores)} training answers one score ({mean:.4g}, std {std:.2g}): "
                           "nothing to normalise; check the pairs and --lr")
    if rank > 0:
        return None

    # 6. save the checkpoint: tokenizer first, model.safetensors, config.json last (= complete)
    final = out / "model"
    M.save_checkpoint(model, tok, str(final), extra_config={"stage": "rm", "score_mean": mean, "score_std": std,
                                                            "prompt": "rm_suffix"})
    if resume_file.exists():
        os.remove(resume_file)
    last = evals[-1]
    summary = {**{k: last[k] for k in ("n_heldout", "heldout_acc", "n_oracle", "heldout_oracle_agreement")},
               "n_train": len(train), "n_below_confidence": len(train_all) - len(train), "n_too_long": n_too_long,
               "steps": step,
               "score_mean": mean, "score_std": std, "seconds_this_session": round(time.time() - t0, 1)}
    data.write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    print(f"train_rm: saved {final} ({step} steps); held-out acc {pct(last['heldout_acc'])}, oracle agreement "
          f"{pct(last['heldout_oracle_agreement'])}; scores mean {mean:.3f} std {std:.3f} on {len(all_scores)} SFT answers")
    return summary


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

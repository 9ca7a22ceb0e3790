"""Stage 4: PPO against the frozen reward model, with a per-token KL penalty to the SFT policy (SPEC 3).

One iteration is the PPO box of Ziegler et al. (2019), as in trl / AlpacaFarm / LLaVA-RLHF (the reference's base):
  1. rollout   sample an answer to each of a batch of (video, question) prompts; one fresh forward of the
               policy, the reference and the value model over query + answer
  2. score     the reward model reads query + answer + its evaluation prompt, as it was trained (SPEC 3, 5)
  3. rewards and advantages   -kl_coef * KL at every answer token, the score at the answer's last token; GAE
  4. optimise  ppo_epochs passes of the clipped policy and value losses over shuffled minibatches
Policy and reference start from the SFT checkpoint; the value model is the reward model with a new
zero-initialised head (SPEC 3). Writes config.json, metrics.jsonl, samples.jsonl, resume.pt and model/.

    python ppo.py --sft runs/tiny/sft/model --rm runs/tiny/rm/model --out runs/tiny/ppo
    python ppo.py --out runs/tiny/ppo --resume true     # continue an interrupted run
"""
import contextlib
import json
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M


@dataclass
class Args:
    prompts: str = "data/shapes/rl.jsonl"  # RL prompts: id, video, question (answers and descriptions unused)
    video_root: str = ""  # folder that video paths are relative to ("" = the prompt file's folder)
    stream_videos: bool = False  # decode each video when its batch needs it, not all up front (large data sets)
    sft: str = "runs/tiny/sft/model"  # policy init and frozen reference (SPEC 3); its tokenizer is used
    rm: str = "runs/tiny/rm/model"  # frozen reward model, and the value model's init (SPEC 3)
    out: str = "runs/tiny/ppo"  # run folder: config.json, metrics.jsonl, samples.jsonl, model/
    iterations: int = 40  # rollout + optimise rounds: ~1 pass over the 2,400 prompts; ~6 s each on 1 CPU core
    rollout_batch: int = 64  # prompts (= answers) per iteration (SPEC 3: 256 in the reference)
    minibatch: int = 16  # answers per optimiser step (SPEC 3: 128 in the reference)
    ppo_epochs: int = 2  # passes over each rollout batch (SPEC 3: 2)
    max_new_tokens: int = 40  # answer budget; the world's longest answer is 32 tokens (SPEC 3: 896)
    temperature: float = 1.0  # sampling temperature; logprobs are recomputed with the same scaling (SPEC 3, 5)
    kl_coef: float = 1.0  # beta of the per-token KL penalty (SPEC 3: 0.1; on the tiny world 0.1 let PPO collapse onto the RM's answer biases, -5 points, EXPERIMENTS.md)
    target_kl: float = 0.0  # > 0: adapt kl_coef towards this KL per answer (Ziegler et al. 2019); 0 = fixed
    kl_horizon: int = 10000  # adaptive controller's horizon, in answers (Ziegler et al.: 10000)
    clamp_kl: bool = True  # clamp the per-token KL estimate at 0 (SPEC 3: the reference does)
    no_eos_penalty: float = -8.0  # REPLACES the score of an answer cut off without EOS (SPEC 3: -8)
    length_penalty: float = 0.0  # score -= length_penalty * answer length / max_new_tokens (SPEC 3: 10; 0 = off)
    gamma: float = 1.0  # discount (SPEC 3: 1)
    lam: float = 0.95  # GAE lambda (SPEC 3: 1 in the reference; < 1 trades a little bias for less variance)
    cliprange: float = 0.2  # policy ratio clip (SPEC 3: 0.2)
    cliprange_value: float = 0.2  # value clip around the rollout's values (SPEC 3: 0.2)
    vf_coef: float = 0.1  # value loss weight (SPEC 3: 0.1)
    lr: float = 5e-5  # peak, cosine to 10% (SPEC 3: 3e-5, 7B LoRA); tiny full fine-tune: 2e-4 overshot (measured)
    grad_clip: float = 1.0  # max global gradient norm over policy + value parameters
    target_approx_kl: float = 0.0  # > 0: end an iteration's optimisation once a minibatch's approx KL exceeds it
    lora_r: int = 0  # 0 = train every weight; > 0: LoRA on policy and value, reference = adapters off (SPEC 3)
    lora_alpha: float = 32.0  # LoRA scaling numerator
    bf16: bool = False  # GPU path: bf16 autocast; frozen weights (RM, LoRA bases) in bf16; a full FT's reference: fp32
    grad_ckpt: bool = False  # gradient checkpointing of policy and value: recompute each LLM layer in backward
    sample_every: int = 5  # iterations between sample answers (printed and appended to samples.jsonl)
    n_samples: int = 3  # sample answers shown each time
    save_every: int = 5  # iterations between resume checkpoints
    resume: bool = False  # continue from out/resume.pt if present
    seed: int = 0  # prompt order, sampling and minibatch order


# ----------------------------------------------------------------------------- PPO math: pure functions

def masked_mean(x, mask, dim=None):  # mean of x over positions where mask == 1
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x, mask):  # unbiased variance of x over positions where mask == 1
    n = mask.sum()
    return masked_mean((x - masked_mean(x, mask)) ** 2, mask) * n / (n - 1).clamp(min=1)


def masked_whiten(x, mask):  # (B, N) -> (B, N): mean 0, std 1 over the mask; 0 elsewhere
    """Padding after an answer's EOS must not shift the statistics, so only answer tokens count."""
    return (x - masked_mean(x, mask)) * torch.rsqrt(masked_var(x, mask) + 1e-8) * mask


def logprobs_from_logits(logits, labels, temperature=1.0):  # (B, N, V), (B, N) -> (B, N)
    """log p(label) under softmax(logits / temperature): the distribution the sampler drew from (SPEC 5)."""
    return F.log_softmax(logits.float() / temperature, dim=-1).gather(-1, labels[..., None]).squeeze(-1)


def entropy_from_logits(logits, temperature=1.0):  # (B, N, V) -> (B, N)
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def response_mask(responses, eos_id):  # (B, N) -> (B, N) float: 1 up to and including the first EOS
    eos = (responses == eos_id).long()
    return (eos.cumsum(1) - eos == 0).float()


def penalised_scores(rm_scores, has_eos, lengths, no_eos_penalty, length_penalty, max_new_tokens):  # (B,) -> (B,)
    """The reference's score shaping (SPEC 3): an answer cut off at the token budget gets no_eos_penalty
    INSTEAD of its RM score (the RM only ever learned to judge finished answers); then an optional penalty
    proportional to the share of the budget used (the reference adds -10 * length / max length)."""
    scores = torch.where(has_eos, rm_scores, torch.full_like(rm_scores, no_eos_penalty))
    return scores - length_penalty * lengths / max_new_tokens


def compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, clamp_kl=True):  # -> (B, N), (B, N)
    """Per-token rewards: -kl_coef * KL at every answer token, plus the score at the answer's LAST REAL
    token: its EOS, or its last token when cut off. (The reference adds the score at the last slot of the
    padded tensor, one or more steps after a short answer ended, SPEC 5.) The KL is the k1 estimate
    log p - log p_ref of the sampled token; it can be negative for one token (the true KL never is), and the
    reference clamps it at 0 so the penalty never becomes a bonus for moving away from the reference."""
    kl = logprobs - ref_logprobs  # (B, N)
    if clamp_kl:
        kl = kl.clamp(min=0.0)
    non_score_rewards = -kl_coef * kl * mask  # (B, N)
    rewards = non_score_rewards.clone()
    last = mask.sum(1).long() - 1  # (B,)
    rewards[torch.arange(len(scores), device=scores.device), last] += scores
    return rewards, non_score_rewards


def gae(rewards, values, mask, gamma, lam):  # (B, N) each -> advantages (B, N), returns (B, N)
    """Generalised advantage estimation (Schulman et al. 2016), backwards over the answer tokens. Values and
    rewards after an answer's end are zeroed, so its last real token bootstraps from 0: the episode ends
    there. returns = advantages + values (the value targets) are taken BEFORE the advantages are whitened."""
    values, rewards = values * mask, rewards * mask
    last, reversed_advantages = torch.zeros_like(rewards[:, 0]), []
    for t in reversed(range(rewards.shape[1])):
        next_values = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # (B,) TD error
        last = delta + gamma * lam * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1) * mask  # (B, N)
    return advantages, (advantages + values) * mask


def policy_loss(logprobs, old_logprobs, advantages, mask, cliprange):  # (B, N) each -> loss, stats
    """PPO's clipped surrogate (Schulman et al. 2017), averaged over answer tokens."""
    # masked before exp: after EOS both logprobs are PAD's (~ -1e9 / T, model.logits bans it), whose float32
    # difference can be +-64 or +-128 from rounding alone; exp(128) = inf, and inf * a zero advantage = NaN
    ratio = torch.exp((logprobs - old_logprobs) * mask)  # (B, N)
    losses = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(losses, clipped), mask)
    with torch.no_grad():
        stats = dict(clipfrac=masked_mean((clipped > losses).float(), mask),
                     approx_kl=0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),  # as trl / the reference
                     ratio_max=(ratio * mask).max())
    return loss, stats


def value_loss(values, old_values, returns, mask, cliprange_value):  # (B, N) each -> loss, stats
    """Squared error to the returns, pessimistic over a prediction clipped to old_values +- cliprange_value,
    so one minibatch cannot move the values far from what produced the advantages."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    losses, losses_clipped = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    return loss, dict(value_clipfrac=masked_mean((losses_clipped > losses).float(), mask).detach())


def explained_variance(values, returns, mask) -> float:  # (B, N) each
    """1 - Var[returns - values] / Var[returns] over answer tokens: 1 = the value model predicts the returns, 0 =
    no better than their mean. nan when the returns do not vary (e.g. every answer scored alike): 0/0 then."""
    var = masked_var(returns, mask)
    return float("nan") if var < 1e-8 else float(1 - masked_var(returns - values, mask) / var)


def adaptive_kl_coef(kl_coef, kl, target_kl, n_answers, horizon):
    """Ziegler et al. (2019): move kl_coef by the relative error of the measured KL per answer, clipped to
    +-20%, scaled by n_answers / horizon: too much KL raises the penalty, too little lowers it."""
    error = max(-0.2, min(0.2, kl / target_kl - 1))
    return kl_coef * (1 + error * n_answers / horizon)


def prompt_batches(n_prompts, batch_size, iterations, seed):
    """Prompt indices of every iteration: one seeded permutation of the prompt set per epoch, concatenated
    and cut into batches. Every prompt is used once per epoch; a resumed run replays the same order."""
    g, order = random.Random(seed), []
    while len(order) < batch_size * iterations:
        order += g.sample(range(n_prompts), n_prompts)
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(iterations)]


# ----------------------------------------------------------------------------- the models at work

def answer_hidden(model, ids, attention_mask, videos, n_answer):  # -> (B, N, D)
    """Hidden states at the positions that PREDICT the answer tokens: the query's last token predicts answer
    token 0, and so on. Queries are left-padded, so every row's answer starts at the same column."""
    return model(ids, attention_mask, videos)[:, -n_answer - 1:-1]


@contextlib.contextmanager
def lora_disabled(model: torch.nn.Module):
    """Adapters off inside the block: the policy becomes its frozen base = the PPO reference model."""
    loras = [m for m in model.modules() if isinstance(m, M.LoRALinear)]
    for m in loras:
        m.enabled = False
    try:
        yield model
    finally:
        for m in loras:
            m.enabled = True


@torch.no_grad()
def rollout(policy, ref, value_model, query_ids, videos, a, generator=None, world=1):
    """Sample one answer per query (lists of token ids) and evaluate it: -> dict of (B, ...) tensors.

    `logprobs` come from a fresh full forward of the policy, not from the sampler, so that the first PPO
    ratio is exactly 1 (SPEC 5); the sampler's own numbers are kept to check that the two agree.
    ref is None with LoRA: the reference is then the policy with its adapters switched off (SPEC 3). Forwards run
    in chunks of a training minibatch (a.minibatch / world rows on each rank): the same shapes as the PPO steps."""
    cfg = policy.cfg
    device = videos.device
    queries = data.pad(query_ids, cfg.pad_token_id, left=True).to(device)  # (B, Q)
    query_mask = data.pad([[1] * len(q) for q in query_ids], 0, left=True).to(device)  # (B, Q)
    responses, sampler_logprobs = policy.generate(queries, query_mask, videos, a.max_new_tokens, a.temperature,
                                                  top_p=1.0, generator=generator)  # (B, N): PAD after EOS
    mask = response_mask(responses, cfg.eos_token_id)  # (B, N)
    ids, attention_mask = torch.cat([queries, responses], 1), torch.cat([query_mask, mask.long()], 1)
    reference = policy if ref is None else ref
    parts = []
    for rows in torch.arange(len(ids), device=device).split(a.minibatch // world):  # memory: a minibatch at a time
        args = (ids[rows], attention_mask[rows], videos[rows], responses.shape[1])
        logits = policy.logits(answer_hidden(policy, *args))  # (b, N, V)
        with lora_disabled(policy) if ref is None else contextlib.nullcontext():
            ref_logits = reference.logits(answer_hidden(reference, *args))
        parts.append(dict(logprobs=logprobs_from_logits(logits, responses[rows], a.temperature),
                          ref_logprobs=logprobs_from_logits(ref_logits, responses[rows], a.temperature),
                          entropy=entropy_from_logits(logits, a.temperature),
                          values=value_model.values(answer_hidden(value_model, *args)).float()))
    out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    diff = (out["logprobs"] - sampler_logprobs).abs() * mask  # both are log_softmax(logits / T) of the same tokens
    gap, mean_gap = float(diff.max()), float(diff.sum() / mask.sum().clamp(min=1))
    # fp32 agrees to ~1e-5 on every token. bf16 rounds the cached and the full forward differently (max 0.03 on
    # CPU, unmeasured on GPU), so there only the mean is checked: a padding, position or temperature bug moves
    # every token's logprob, by far more than 0.05
    bad = (mean_gap > 0.05) if a.bf16 else (gap > 1e-3)
    if M.all_sum(float(bad), device) > 0:  # every rank stops (a lone rank's error would leave the others waiting)
        raise RuntimeError(f"sampler and recomputed logprobs differ by {gap:.2g} at most, {mean_gap:.2g} on average "
                           "(on this rank): padding, positions or temperature differ between generate and the "
                           "training forward")
    return dict(input_ids=ids, attention_mask=attention_mask, responses=responses, mask=mask, videos=videos,
                sampler_logprob_gap=gap, **out)


@torch.no_grad()
def score(reward_model, query_ids, responses, mask, videos, suffix, chunk):  # -> raw scores (B,)
    """The RM reads query + answer (through its EOS) + the evaluation prompt: exactly the token sequence it
    was trained on (data.rm_suffix), and model.reward reads it at the last real token (SPEC 5)."""
    lengths = mask.sum(1).long().tolist()
    seqs = [q + r[:n] + suffix for q, r, n in zip(query_ids, responses.tolist(), lengths)]
    ids = data.pad(seqs, reward_model.cfg.pad_token_id, left=True).to(videos.device)
    attention_mask = data.pad([[1] * len(s) for s in seqs], 0, left=True).to(videos.device)
    return torch.cat([reward_model.reward(ids[r], attention_mask[r], videos[r])
                      for r in torch.arange(len(seqs), device=videos.device).split(chunk)])


def ppo_step(policy, value_model, opt, mb, a, world=1):
    """One optimiser step on a minibatch of the rollout (a dict of (b, ...) tensors) -> stats. With data
    parallel every rank holds 1/world of the minibatch, and the step follows the mean of the ranks' losses."""
    args = (mb["input_ids"], mb["attention_mask"], mb["videos"], mb["responses"].shape[1])
    with torch.autocast(mb["input_ids"].device.type, torch.bfloat16, enabled=a.bf16):
        logits = policy.logits(answer_hidden(policy, *args))  # (b, N, V)
        values = value_model.values(answer_hidden(value_model, *args)).float()  # (b, N)
    logprobs = logprobs_from_logits(logits, mb["responses"], a.temperature)  # (b, N)
    pg_loss, pg_stats = policy_loss(logprobs, mb["logprobs"], mb["advantages"], mb["mask"], a.cliprange)
    vf_loss, vf_stats = value_loss(values, mb["values"], mb["returns"], mb["mask"], a.cliprange_value)
    # One optimiser over both models, as the reference's ActorCritic. The models share no weights, so each
    # gets only its own loss's gradient; vf_coef matters through the joint gradient-norm clip (Adam
    # normalises per parameter), where it keeps early large value gradients from shrinking the policy step.
    loss = (pg_loss + a.vf_coef * vf_loss) / world  # the ranks' gradients are summed (model.sync_gradients)
    if not math.isfinite(float(M.all_sum(loss, loss.device))):  # all ranks stop before the update: resume.pt is good
        last = os.path.join(a.out, "resume.pt")
        raise SystemExit(f"ppo: non-finite loss; the last good state is "
                         f"{last if os.path.exists(last) else 'none (no resume point yet)'}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    M.sync_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
    opt.step()
    return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "grad_norm": float(grad_norm),
            **{k: float(v) for k, v in {**pg_stats, **vf_stats}.items()}}


def main(a: Args):
    torch.manual_seed(a.seed)
    rank, world, device = M.init_distributed()  # torchrun: each rank samples and trains on a share of each rollout
    if a.rollout_batch % world or a.minibatch % world or a.rollout_batch % a.minibatch:
        raise ValueError(f"--rollout_batch must divide into minibatches of --minibatch, and both by the {world} ranks")
    if a.temperature <= 0:
        raise ValueError(f"--temperature {a.temperature}: PPO samples, and its logprobs divide by it (SPEC 3: 1.0)")
    tok = data.load_tokenizer(a.sft)

    # the four models (SPEC 3); none has dropout (model.py), eval() is for the record
    policy = M.load_pretrained(a.sft, kind="policy")
    reward_model = M.load_pretrained(a.rm, kind="reward").requires_grad_(False)
    value_model = M.load_pretrained(a.rm, kind="reward", new_head="value")  # RM body, zero head: values start at 0
    extra = M.load_config(a.rm)[1]
    if "score_mean" not in extra or "score_std" not in extra:
        raise ValueError(f"{a.rm}: config.json lacks the RM's score_mean / score_std (written by train_rm.py)")
    score_mean, score_std = extra["score_mean"], extra["score_std"]  # of the RM's scores on its training data
    same = lambda c: (c.num_frames, c.vision.image_size, c.n_video_tokens, c.video_token_id, c.pad_token_id,
                      c.eos_token_id, c.system)  # the four models read the same videos, tokens and template
    data.check_tokenizer(tok, policy.cfg, a.sft)
    if same(reward_model.cfg) != same(policy.cfg):
        raise ValueError(f"{a.sft} and {a.rm} disagree on frames, video tokens, special tokens or system line")
    if a.lora_r:
        ref = None  # the policy with its adapters off
        M.add_lora(policy, a.lora_r, a.lora_alpha)
        M.add_lora(value_model, a.lora_r, a.lora_alpha)  # adapters + the new value head
    else:
        ref = M.load_pretrained(a.sft, kind="policy").requires_grad_(False).to(device).eval()
    for m in filter(None, (policy, reward_model, value_model, ref)):
        M.broadcast_parameters(m.to(device).eval())
        # bf16: frozen weights stored in bf16, except a full fine-tune's reference: rounded, it would differ from
        # the fp32 policy before any update (KL > 0 at iteration 1: a penalty that grows with answer length)
        M.for_training(m, device, a.bf16 and m is not ref, grad_ckpt=a.grad_ckpt)
    autocast = lambda: torch.autocast(torch.device(device).type, torch.bfloat16, enabled=a.bf16)
    cfg = policy.cfg

    # the prompts: every query tokenized once, every video decoded once (bad input fails before any output)
    prompts = data.read_prompts(a.prompts, a.video_root or None)
    if not prompts:
        raise ValueError(f"{a.prompts}: no prompts")
    queries = [data.encode(tok, [(f"{data.VIDEO}\n{p['question']}", None)], cfg.n_video_tokens, system=cfg.system)[0]
               for p in prompts]
    suffix = data.rm_suffix(tok)
    # the longest answer, as the RM reads it, must fit both context windows: an error now, not at some iteration
    longest = max(range(len(queries)), key=lambda i: len(queries[i]))
    need = len(queries[longest]) + a.max_new_tokens + len(suffix)
    if need > (window := min(cfg.llm.max_position_embeddings, reward_model.cfg.llm.max_position_embeddings)):
        raise ValueError(f"{a.prompts}: prompt {prompts[longest].get('id')}: its {len(queries[longest])} tokens (video "
                         f"included) + --max_new_tokens {a.max_new_tokens} + the RM's evaluation prompt "
                         f"({len(suffix)}) = {need} exceed the context window of {window}")
    videos = data.load_videos(prompts, cfg.num_frames, cfg.vision.image_size, a.prompts, a.stream_videos)
    if rank == 0:
        data.start_run(a.out, a, a.resume)

    batches = prompt_batches(len(prompts), a.rollout_batch, a.iterations, a.seed)
    params = [p for m in (policy, value_model) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    print(f"ppo: {len(prompts)} prompts, {a.iterations} iterations of {a.rollout_batch} on {world} rank(s), "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters (policy + value)")

    # resume: weights, optimiser, iteration and kl_coef. Prompt order and sampling need no saved RNG state:
    # the order is fixed by the seed and every iteration seeds its own generator.
    it, kl_coef, resume_file = 0, a.kl_coef, os.path.join(a.out, "resume.pt")
    if a.resume and os.path.exists(resume_file):
        state = torch.load(resume_file, map_location=device)
        policy.load_state_dict(state["policy"])
        value_model.load_state_dict(state["value"])
        opt.load_state_dict(state["optimizer"])
        it, kl_coef = state["iteration"], state["kl_coef"]
        print(f"resumed from {resume_file} at iteration {it}")
    M.check_same(it, device, "the iteration to resume from")
    logs = {name: os.path.join(a.out, name) for name in ("metrics.jsonl", "samples.jsonl")}
    for path in logs.values() if rank == 0 else []:  # iterations after the resume point run again: drop their lines
        data.trim_log(path, lambda r: r["iteration"] <= it)

    bar = tqdm(total=a.iterations, initial=it, desc="ppo", dynamic_ncols=True, disable=rank > 0)
    while it < a.iterations:
        t0, idx = time.time(), batches[it]
        idx = idx[rank::world]  # this rank's share of the rollout (all of it in a plain run)
        gen = torch.Generator(device).manual_seed(a.seed * 1_000_003 + it + 100_000_007 * rank)  # answers, minibatches
        lr = a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * it / a.iterations)))  # cosine (SPEC 3)
        for g in opt.param_groups:
            g["lr"] = lr

        # 1. rollout
        query_ids = [queries[i] for i in idx]
        vids = torch.stack(data.fetch(videos, [str(prompts[i]["video"]) for i in idx])).to(device)  # (B, F, 3, H, W)
        with autocast():
            batch = rollout(policy, ref, value_model, query_ids, vids, a, gen, world)
        mask, rollout_seconds = batch["mask"], time.time() - t0  # (B, N)

        # 2. score: normalised with the RM's own statistics, then the no-EOS and length penalties
        with autocast():
            raw = score(reward_model, query_ids, batch["responses"], mask, vids, suffix, a.minibatch // world).float()
        rm_scores = (raw - score_mean) / score_std
        has_eos, lengths = (batch["responses"] == cfg.eos_token_id).any(1), mask.sum(1)
        scores = penalised_scores(rm_scores, has_eos, lengths, a.no_eos_penalty, a.length_penalty, a.max_new_tokens)

        # 3. rewards and advantages (rewards are not whitened, SPEC 3; advantages are, over answer tokens)
        rewards, non_score_rewards = compute_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask,
                                                     kl_coef, a.clamp_kl)
        advantages, returns = gae(rewards, batch["values"], mask, a.gamma, a.lam)
        batch.update(advantages=masked_whiten(advantages, mask), returns=returns)

        # 4. optimise: ppo_epochs shuffled passes over the rollout
        B = len(idx)
        minibatches = [rows for _ in range(a.ppo_epochs)
                       for rows in torch.randperm(B, generator=gen, device=device).split(a.minibatch // world)]
        stats = []
        for rows in minibatches:
            stats.append(ppo_step(policy, value_model, opt, {k: v[rows] for k, v in batch.items()
                                                             if torch.is_tensor(v)}, a, world))
            if a.target_approx_kl and float(M.all_sum(stats[-1]["approx_kl"], device)) / world > a.target_approx_kl:
                break  # the policy moved too far from the one that sampled: collect fresh answers first

        # 5. log; then the adaptive KL controller sees this iteration's KL
        mean_all = lambda x: float(M.all_sum(x.mean(), device)) / world  # over every rank's answers
        # per answer, unclamped: an unbiased estimate of KL(policy || reference), what the adaptive controller
        # targets and the log reports; the penalty in the rewards clamps each token's term at 0 (SPEC 3)
        kl = mean_all(((batch["logprobs"] - batch["ref_logprobs"]) * mask).sum(1))
        it += 1
        rec = {"iteration": it, "score": mean_all(scores), "rm_score": mean_all(rm_scores), "kl": kl,  # rest: rank 0's
               "non_score_reward": non_score_rewards.sum(1).mean(), "entropy": masked_mean(batch["entropy"], mask),
               "answer_len": lengths.mean(), "no_eos": 1 - has_eos.float().mean(),
               **{k: sum(s[k] for s in stats) / len(stats) for k in stats[0] if k != "ratio_max"},
               "ratio_max": max(s["ratio_max"] for s in stats),
               "explained_variance": explained_variance(batch["values"], returns, mask), "kl_coef": kl_coef, "lr": lr,
               "minibatch_steps": len(stats),
               "sampler_logprob_gap": batch["sampler_logprob_gap"], "rollout_seconds": rollout_seconds,
               "seconds": time.time() - t0, **M.gpu_peak_gb(device)}
        rec = {k: round(float(v), 6) if k != "iteration" else v for k, v in rec.items()}
        if a.target_kl:
            kl_coef = adaptive_kl_coef(kl_coef, kl, a.target_kl, B * world, a.kl_horizon)
        if rank > 0:
            continue  # logs and checkpoints are rank 0's
        with open(logs["metrics.jsonl"], "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.update()
        bar.write(f"ppo {it}: score {rec['score']:.3f} (rm {rec['rm_score']:.3f}) kl {kl:.3f} "
                  f"len {rec['answer_len']:.1f} no_eos {rec['no_eos']:.2f} clip {rec['clipfrac']:.3f} "
                  f"approx_kl {rec['approx_kl']:.4f} vf_loss {rec['value_loss']:.3f} "
                  f"ev {rec['explained_variance']:.2f} {rec['seconds']:.1f}s")
        if it % a.sample_every == 0 or it == 1:
            with open(logs["samples.jsonl"], "a") as f:
                for i in range(min(a.n_samples, B)):
                    answer = tok.decode(batch["responses"][i][mask[i].bool()], skip_special_tokens=True).strip()
                    row = {"iteration": it, "id": prompts[idx[i]]["id"], "question": prompts[idx[i]]["question"],
                           "answer": answer, "score": round(float(scores[i]), 4)}
                    f.write(json.dumps(row) + "\n")
                    bar.write(f"  {row['question']} -> {answer!r} ({row['score']:+.3f})")
        if it % a.save_every == 0 and it < a.iterations:
            torch.save({"policy": policy.state_dict(), "value": value_model.state_dict(),
                        "optimizer": opt.state_dict(), "iteration": it, "kl_coef": kl_coef}, resume_file + ".tmp")
            os.replace(resume_file + ".tmp", resume_file)
    bar.close()
    if rank > 0:
        return

    # 6. save the policy (LoRA merged): tokenizer first, model.safetensors, config.json last (= complete)
    final = os.path.join(a.out, "model")
    M.save_checkpoint(policy, tok, final, extra_config={"stage": "ppo"})
    if os.path.exists(resume_file):
        os.remove(resume_file)
    print(f"ppo: saved {final} ({it} iterations)")


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

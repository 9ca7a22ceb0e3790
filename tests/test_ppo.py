"""ppo.py: the PPO math against plain loops, score placement and penalties, ratio 1 on the first step of a real
rollout, an end-to-end run, and resume == an uninterrupted run."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import data
from conftest import tiny_world
import model as M
import ppo

torch.set_num_threads(1)  # tiny tensors: threads only add sync overhead


def lengths_mask(lengths, T):  # (B, T) float: 1 on the first lengths[b] positions
    return (torch.arange(T)[None] < torch.tensor(lengths)[:, None]).float()


def test_gae_equals_a_plain_loop():
    torch.manual_seed(0)
    lengths, T = [7, 3, 1, 5], 7
    rewards, values, mask = torch.randn(4, T), torch.randn(4, T), lengths_mask(lengths, T)
    for gamma, lam in [(1.0, 1.0), (1.0, 0.95), (0.9, 0.8), (0.5, 0.0)]:
        adv, ret = ppo.gae(rewards, values, mask, gamma, lam)
        for b, n in enumerate(lengths):  # one episode per row, ending at its last real token
            a = 0.0
            for t in reversed(range(n)):
                next_value = values[b, t + 1].item() if t + 1 < n else 0.0
                a = rewards[b, t].item() + gamma * next_value - values[b, t].item() + gamma * lam * a
                assert adv[b, t].item() == pytest.approx(a, abs=1e-5)
            assert (adv[b, n:] == 0).all() and (ret[b, n:] == 0).all()
        assert torch.allclose(ret, (adv + values) * mask)
    # gamma = lambda = 1: the advantage is the sum of the rewards to come minus the value
    adv, _ = ppo.gae(rewards, values, mask, 1.0, 1.0)
    to_go = (rewards * mask).flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-5)


def test_explained_variance():
    torch.manual_seed(0)
    returns, mask = torch.randn(3, 6), lengths_mask([6, 2, 4], 6)
    noise = torch.randn(3, 6).masked_fill(mask == 0, 1e6)  # masked positions must not matter
    real = returns[mask.bool()]
    assert ppo.explained_variance(returns + (1 - mask) * noise, returns, mask) == pytest.approx(1.0)
    assert ppo.explained_variance(torch.full((3, 6), real.mean().item()), returns, mask) == pytest.approx(0.0, abs=1e-6)
    values = returns + 0.5 * noise
    r, v = real, values[mask.bool()]
    assert ppo.explained_variance(values, returns, mask) == pytest.approx(1 - (r - v).var().item() / r.var().item(), rel=1e-5)
    # returns that do not vary: no answer to explain. Before, 0 / 1e-8 logged 1.0 for constant values
    assert math.isnan(ppo.explained_variance(torch.full((3, 6), -8.0), torch.full((3, 6), -8.0), mask))


def test_masked_mean_and_whiten():
    torch.manual_seed(0)
    x, mask = torch.randn(3, 6), lengths_mask([6, 2, 4], 6)
    x_padded = x.masked_fill(mask == 0, 1e6)  # masked positions must not matter
    real = x[mask.bool()]
    assert ppo.masked_mean(x_padded, mask) == pytest.approx(real.mean().item(), abs=1e-6)
    assert torch.allclose(ppo.masked_mean(x_padded, mask, dim=1),
                          torch.stack([x[0].mean(), x[1, :2].mean(), x[2, :4].mean()]))
    w = ppo.masked_whiten(x_padded, mask)
    assert (w[mask == 0] == 0).all()
    assert w[mask.bool()].mean().item() == pytest.approx(0, abs=1e-6)
    assert w[mask.bool()].std().item() == pytest.approx(1, abs=1e-6)
    assert torch.allclose(w[mask.bool()], (real - real.mean()) / real.std(), atol=1e-6)


def test_logprobs_and_entropy_from_logits_use_the_temperature():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    for T in (1.0, 0.7):
        want = F.log_softmax(logits / T, -1).gather(-1, labels[..., None]).squeeze(-1)
        assert torch.allclose(ppo.logprobs_from_logits(logits, labels, T), want, atol=1e-6)
        entropy = torch.distributions.Categorical(logits=logits / T).entropy()
        assert torch.allclose(ppo.entropy_from_logits(logits, T), entropy, atol=1e-5)
    assert not torch.allclose(ppo.logprobs_from_logits(logits, labels, 0.7), ppo.logprobs_from_logits(logits, labels))


def test_score_at_the_last_real_token_and_kl_penalty():
    eos, pad = 2, 3
    responses = torch.tensor([[7, 8, eos, pad, pad],  # EOS at 2: the score goes to index 2
                              [7, 8, 9, 10, 11],  # cut off: the score goes to the last token
                              [eos, pad, pad, pad, pad]])
    mask = ppo.response_mask(responses, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1] * 5, [1, 0, 0, 0, 0]]
    scores = torch.tensor([1.5, -2.0, 0.5])
    logprobs = torch.randn(3, 5)
    rewards, non_score = ppo.compute_rewards(scores, logprobs, logprobs.clone(), mask, kl_coef=0.1)
    want = torch.zeros(3, 5)
    want[0, 2], want[1, 4], want[2, 0] = 1.5, -2.0, 0.5
    assert torch.equal(rewards, want) and (non_score == 0).all()  # policy == reference: score only

    ref = logprobs - torch.tensor([0.5, -0.5, 1.0, 0.0, 2.0])  # k1 = log p - log p_ref per token
    rewards, non_score = ppo.compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1, clamp_kl=True)
    assert torch.allclose(non_score[1], torch.tensor([-0.05, 0.0, -0.1, 0.0, -0.2]))  # negative KL clamped
    assert torch.allclose(non_score[0], torch.tensor([-0.05, 0.0, -0.1, 0.0, 0.0]))  # nothing after EOS
    assert rewards[1, 4].item() == pytest.approx(-2.0 - 0.2)
    _, unclamped = ppo.compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1, clamp_kl=False)
    assert unclamped[1, 1].item() == pytest.approx(0.05)


def test_no_eos_penalty_replaces_the_score_and_length_penalty():
    rm = torch.tensor([1.0, 2.0, -0.5])
    has_eos, lengths = torch.tensor([True, False, True]), torch.tensor([3.0, 10.0, 5.0])
    assert ppo.penalised_scores(rm, has_eos, lengths, -8.0, 0.0, 10).tolist() == [1.0, -8.0, -0.5]
    assert torch.allclose(ppo.penalised_scores(rm, has_eos, lengths, -8.0, 10.0, 10), torch.tensor([-2.0, -18.0, -5.5]))


def test_policy_and_value_losses_clip():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros(1, 4)
    new = torch.log(torch.tensor([[1.5, 1.1, 0.5, 9.0]]))  # ratios; the last position is padding
    adv = torch.tensor([[1.0, 1.0, -1.0, 5.0]])
    loss, stats = ppo.policy_loss(new, old, adv, mask, cliprange=0.2)
    # ratio 1.5 with A > 0: clipped to 1.2; 1.1: inside; 0.5 with A < 0: clipped to 0.8 (loss 0.8, not 0.5)
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8) / 3)
    assert stats["clipfrac"].item() == pytest.approx(2 / 3)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (new[0, :3] ** 2).mean().item())
    # after EOS both logprobs are PAD's (~ -1e9), whose float32 difference can be 128 from rounding alone
    pad_new, pad_old, adv_0 = new.clone(), old.clone(), adv * mask  # whitened advantages are 0 there
    pad_new[0, 3], pad_old[0, 3] = -1e9 + 128, -1e9
    assert ppo.policy_loss(pad_new, pad_old, adv_0, mask, 0.2)[0].item() == pytest.approx(
        ppo.policy_loss(new, old, adv_0, mask, 0.2)[0].item())  # not NaN (exp(128) = inf, inf * 0)
    loss, stats = ppo.policy_loss(old, old, adv, mask, 0.2)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and loss.item() == pytest.approx(-1 / 3)

    values, old_values = torch.tensor([[1.0, 0.1, -1.0, 7.0]]), torch.zeros(1, 4)
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    loss, stats = ppo.value_loss(values, old_values, returns, mask, cliprange_value=0.2)
    # position 0: clipped prediction 0.2 is further from 2 (err 3.24 > 1): clipped; 1: inside (0.01);
    # 2: clipped -0.2 is closer to 0 (0.04 < 1): the unclipped error counts (pessimistic max)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 0.01 + 1.0) / 3)
    assert stats["value_clipfrac"].item() == pytest.approx(1 / 3)


def test_adaptive_kl_coef_and_prompt_order():
    assert ppo.adaptive_kl_coef(0.1, 12.0, 6.0, 100, 10000) == pytest.approx(0.1 * (1 + 0.2 * 0.01))  # clipped
    assert ppo.adaptive_kl_coef(0.1, 5.4, 6.0, 100, 10000) == pytest.approx(0.1 * (1 - 0.1 * 0.01))
    batches = ppo.prompt_batches(10, 4, 5, seed=3)
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))  # once per epoch
    assert batches == ppo.prompt_batches(10, 4, 5, seed=3) and batches != ppo.prompt_batches(10, 4, 5, seed=4)


# ----------------------------------------------------------------------------- with tiny models

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world, a random policy with its tokenizer (the 'SFT' checkpoint) and an RM made from it."""
    root = tmp_path_factory.mktemp("world")
    tok = tiny_world(root, n_sft=2, n_rl=3, n_eval=1, vocab_size=300)
    rm = M.load_pretrained(str(root / "sft"), kind="policy", new_head="reward")
    M.save_pretrained(rm, str(root / "rm"), extra_config={"score_mean": 0.5, "score_std": 2.0})
    tok.save_pretrained(str(root / "rm"))
    return root


def tiny_args(world, out, **kw):
    return ppo.Args(**{**dict(prompts=str(world / "shapes" / "rl.jsonl"), sft=str(world / "sft"), rm=str(world / "rm"),
                              out=str(out), iterations=2, rollout_batch=4, minibatch=2, max_new_tokens=6,
                              save_every=1, sample_every=1, n_samples=2, lr=1e-3), **kw})


def rollout_inputs(a, tok, n_video_tokens):  # the first 4 prompts: query token ids, videos (4, F, 3, H, W)
    prompts = data.read_prompts(a.prompts)[:4]
    query_ids = [data.encode(tok, [(f"{data.VIDEO}\n{p['question']}", None)], n_video_tokens)[0] for p in prompts]
    return query_ids, torch.stack([data.load_video(p["video"], 4, 48) for p in prompts])


def test_answers_that_cannot_fit_the_context_window_stop_the_run_before_any_output(world, tmp_path):
    tok, cfg = data.load_tokenizer(str(world / "sft")), M.load_config(str(world / "sft"))[0]
    longest = max(len(data.encode(tok, [(f"{data.VIDEO}\n{p['question']}", None)], cfg.n_video_tokens, system=cfg.system)[0])
                  for p in data.read_prompts(world / "shapes" / "rl.jsonl"))
    fits = 512 - longest - len(data.rm_suffix(tok))  # the tiny model's 512 positions, the RM's prompt after
    with pytest.raises(ValueError, match="= 513 exceed the context window of 512"):
        ppo.main(tiny_args(world, tmp_path / "out", max_new_tokens=fits + 1))
    assert not (tmp_path / "out").exists()
    ppo.main(tiny_args(world, tmp_path / "ok", max_new_tokens=fits, iterations=1))  # the longest that fits: runs
    assert (tmp_path / "ok" / "model" / "config.json").exists()


def test_rollout_must_divide_into_whole_minibatches(world, tmp_path):
    with pytest.raises(ValueError, match="must divide into minibatches"):  # else the last step would be smaller
        ppo.main(tiny_args(world, tmp_path / "odd", rollout_batch=4, minibatch=3))


def test_rollout_stops_when_sampler_and_recomputed_logprobs_disagree(world, tmp_path, monkeypatch):
    """A sampler whose logprobs are off by a bug (here: all shifted by 0.2) stops the rollout under both checks,
    fp32's (every token) and bf16's (the mean); one token off by 0.3, like bf16's rounding, passes bf16's check
    (the mean far below 0.05) and not fp32's. The checks are chosen by --bf16; the forwards here run in fp32."""
    a = tiny_args(world, tmp_path, max_new_tokens=8)
    policy, value_model = M.load_pretrained(a.sft, kind="policy"), M.load_pretrained(a.rm, kind="reward", new_head="value")
    query_ids, videos = rollout_inputs(a, data.load_tokenizer(a.sft), policy.cfg.n_video_tokens)
    generate = policy.generate

    def off_by(shift, first_only):
        def patched(*args, **kw):
            responses, logprobs = generate(*args, **kw)
            bump = torch.zeros_like(logprobs)
            bump[0, 0] = shift
            return responses, logprobs + (bump if first_only else shift * (logprobs != 0))
        return patched
    for bf16, shift, first_only, fails in [(False, 0.2, False, True), (True, 0.2, False, True),
                                           (True, 0.3, True, False), (False, 0.3, True, True)]:
        monkeypatch.setattr(policy, "generate", off_by(shift, first_only))
        args = (policy, policy, value_model, query_ids, videos, ppo.Args(**{**vars(a), "bf16": bf16}),
                torch.Generator().manual_seed(0))
        if fails:
            with pytest.raises(RuntimeError, match="sampler and recomputed logprobs differ"):
                ppo.rollout(*args)
        else:
            assert ppo.rollout(*args)["sampler_logprob_gap"] == pytest.approx(0.3, abs=1e-4)


def test_first_ppo_step_has_ratio_one(world, tmp_path):
    """Through the real functions: a rollout, its scores, rewards and advantages, then one PPO step. The
    policy that sampled is the policy being trained, so the ratio is 1, nothing is clipped, the KL is 0."""
    a = tiny_args(world, tmp_path)
    tok = data.load_tokenizer(a.sft)
    policy, ref = M.load_pretrained(a.sft, kind="policy"), M.load_pretrained(a.sft, kind="policy")
    rm, value_model = M.load_pretrained(a.rm, kind="reward"), M.load_pretrained(a.rm, kind="reward", new_head="value")
    query_ids, videos = rollout_inputs(a, tok, policy.cfg.n_video_tokens)
    batch = ppo.rollout(policy, ref, value_model, query_ids, videos, a, torch.Generator().manual_seed(0))
    mask = batch["mask"]
    assert batch["sampler_logprob_gap"] < 1e-4  # generate's numbers == a full forward's
    assert torch.equal(batch["logprobs"], batch["ref_logprobs"])  # policy == reference
    assert (batch["values"] == 0).all()  # zero-initialised value head (SPEC 3)

    suffix = data.rm_suffix(tok)
    raw = ppo.score(rm, query_ids, batch["responses"], mask, videos, suffix, chunk=3)
    for i, (q, r, n) in enumerate(zip(query_ids, batch["responses"].tolist(), mask.sum(1).long().tolist())):
        seq = q + r[:n] + suffix  # scored alone, without padding: the same number
        alone = rm.reward(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long), videos[i:i + 1])
        assert alone.item() == pytest.approx(raw[i].item(), abs=1e-5)
    has_eos = (batch["responses"] == tok.eos_token_id).any(1)
    scores = ppo.penalised_scores(raw, has_eos, mask.sum(1), -8.0, 0.0, a.max_new_tokens)
    rewards, non_score = ppo.compute_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask, 0.1)
    last = mask.sum(1).long() - 1
    assert (non_score == 0).all() and torch.equal(rewards[torch.arange(4), last], scores)  # KL 0: only the score,
    assert rewards.count_nonzero() == (scores != 0).sum()  # at the last real token
    advantages, returns = ppo.gae(rewards, batch["values"], mask, 1.0, 0.95)
    batch.update(advantages=ppo.masked_whiten(advantages, mask), returns=returns)

    params = [p for m in (policy, value_model) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=a.lr)
    rows = torch.tensor([2, 0])
    stats = ppo.ppo_step(policy, value_model, opt, {k: v[rows] for k, v in batch.items() if torch.is_tensor(v)}, a)
    assert stats["clipfrac"] == 0 and stats["approx_kl"] == 0 and stats["ratio_max"] == 1  # exactly
    assert stats["value_clipfrac"] == 0  # values start where the rollout's are
    assert not torch.equal(policy.lm_head.weight, ref.lm_head.weight)  # and the step did move the policy


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_end_to_end_and_resume_equals_uninterrupted(world, tmp_path, monkeypatch):
    ppo.main(tiny_args(world, tmp_path / "full"))
    full = M.load_pretrained(str(tmp_path / "full" / "model"), kind="policy")
    assert M.load_config(str(tmp_path / "full" / "model"))[1] == {"stage": "ppo"}
    assert data.load_tokenizer(str(tmp_path / "full" / "model")).pad_token_id == full.cfg.pad_token_id
    metrics = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    for key in ("score", "rm_score", "kl", "non_score_reward", "entropy", "answer_len", "no_eos", "clipfrac",
                "approx_kl", "value_loss", "explained_variance", "policy_loss", "lr", "seconds"):
        assert all(key in m for m in metrics), key
    assert metrics[0]["kl"] == 0 and metrics[0]["minibatch_steps"] == 4  # 2 epochs x 4 answers / 2
    assert metrics[1]["kl"] > 0.1  # the policy moved away from the reference, which stayed where it was
    assert metrics[0]["sampler_logprob_gap"] < 1e-4
    samples = read_jsonl(tmp_path / "full" / "samples.jsonl")
    assert len(samples) == 4 and set(samples[0]) == {"iteration", "id", "question", "answer", "score"}
    assert not (tmp_path / "full" / "resume.pt").exists()
    assert not torch.equal(full.lm_head.weight, M.load_pretrained(str(world / "sft")).lm_head.weight)

    calls, real_step = [0], ppo.ppo_step

    def crash_in_iteration_2(*args, **kw):  # after iteration 1's resume checkpoint
        calls[0] += 1
        if calls[0] == 6:
            raise KeyboardInterrupt
        return real_step(*args, **kw)

    monkeypatch.setattr(ppo, "ppo_step", crash_in_iteration_2)
    with pytest.raises(KeyboardInterrupt):
        ppo.main(tiny_args(world, tmp_path / "cut"))
    assert not (tmp_path / "cut" / "model").exists() and (tmp_path / "cut" / "resume.pt").exists()
    after = []
    monkeypatch.setattr(ppo, "ppo_step", lambda *args, **kw: after.append(1) or real_step(*args, **kw))
    ppo.main(tiny_args(world, tmp_path / "cut", resume=True))
    assert len(after) == 4  # iteration 2 only: it went on from iteration 1's resume point
    resumed = M.load_pretrained(str(tmp_path / "cut" / "model"), kind="policy")
    for (k, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(x, y, atol=1e-6), k
    cut = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert [m["iteration"] for m in cut] == [1, 2]
    assert [m["score"] for m in cut] == [m["score"] for m in metrics]  # the same prompts and answers
    assert read_jsonl(tmp_path / "cut" / "samples.jsonl") == samples


def test_lora_reference_is_the_policy_without_adapters(world, tmp_path):
    """With LoRA (ref None) the rollout's ref_logprobs are the base model's, however far the adapters moved."""
    a = tiny_args(world, tmp_path)
    base, policy = M.load_pretrained(a.sft, kind="policy"), M.load_pretrained(a.sft, kind="policy")
    M.add_lora(policy, 4, 32.0)
    for m in policy.modules():
        if isinstance(m, M.LoRALinear):
            torch.nn.init.normal_(m.lora_B, std=0.1)  # adapters that have learned something: policy != base
    value_model = M.load_pretrained(a.rm, kind="reward", new_head="value")
    query_ids, videos = rollout_inputs(a, data.load_tokenizer(a.sft), base.cfg.n_video_tokens)
    batch = ppo.rollout(policy, None, value_model, query_ids, videos, a, torch.Generator().manual_seed(0))
    mask, n = batch["mask"].bool(), batch["responses"].shape[1]
    with torch.no_grad():
        hidden = ppo.answer_hidden(base, batch["input_ids"], batch["attention_mask"], videos, n)
        base_logprobs = ppo.logprobs_from_logits(base.logits(hidden), batch["responses"])
    assert torch.allclose(batch["ref_logprobs"][mask], base_logprobs[mask], atol=1e-5)
    assert not torch.allclose(batch["logprobs"][mask], base_logprobs[mask], atol=1e-3)
    assert all(m.enabled for m in policy.modules() if isinstance(m, M.LoRALinear))  # switched back on


def test_lora_run_and_adaptive_kl_saves_a_plain_checkpoint(world, tmp_path, monkeypatch):
    """Also how main wires the math: the coefficient it uses is the one it logs, the penalties reach the
    score, the advantages a minibatch sees are whitened over the rollout's answer tokens, and its value targets
    are the returns from before that whitening."""
    a, used, seen, gaes = ppo.Args(), [], [], []
    real_rewards, real_step, real_gae = ppo.compute_rewards, ppo.ppo_step, ppo.gae
    monkeypatch.setattr(ppo, "compute_rewards", lambda *args: used.append(args[4]) or real_rewards(*args))
    monkeypatch.setattr(ppo, "gae", lambda *args: gaes.append((args[2], *real_gae(*args))) or gaes[-1][1:])
    monkeypatch.setattr(ppo, "ppo_step", lambda *args: seen.append(args[3]) or real_step(*args))
    ppo.main(tiny_args(world, tmp_path, lora_r=4, target_kl=6.0, length_penalty=10.0))
    m = read_jsonl(tmp_path / "metrics.jsonl")
    assert used == [x["kl_coef"] for x in m]
    # the tiny policy never says EOS within 6 tokens: the no-EOS penalty replaces every RM score, and the length
    # penalty takes 10 x 6 / 6 more
    assert [(x["score"], x["no_eos"], x["answer_len"]) for x in m] == [(-18.0, 1.0, 6.0)] * 2
    epoch = seen[:2]  # iteration 1, epoch 1: 2 minibatches of 2, every answer once
    adv, mask = torch.cat([mb["advantages"] for mb in epoch]), torch.cat([mb["mask"] for mb in epoch])
    assert adv[mask.bool()].mean().item() == pytest.approx(0, abs=1e-5)
    assert adv[mask.bool()].std().item() == pytest.approx(1, abs=1e-4)
    # the value targets are GAE's returns, taken before the advantages were whitened
    gae_mask, _, raw_returns = gaes[0]
    returns = torch.cat([mb["returns"] for mb in epoch])[mask.bool()].sort().values
    assert torch.equal(returns, raw_returns[gae_mask.bool()].sort().values)
    assert m[0]["kl"] == 0 and m[0]["kl_coef"] == a.kl_coef  # LoRA B starts at 0: policy == reference
    # the controller saw KL 0 < 6 in iteration 1: the coefficient falls by the clipped 20% x 4 answers / horizon
    assert m[1]["kl_coef"] == pytest.approx(a.kl_coef * (1 - 0.2 * 4 / a.kl_horizon), abs=1e-6)
    policy = M.load_pretrained(str(tmp_path / "model"), kind="policy")  # merged: a plain checkpoint
    assert not any("lora" in k for k in policy.state_dict())


def test_bf16_full_fine_tune_starts_at_the_reference(world, tmp_path):
    """The reference keeps the policy's fp32 weights under --bf16 (only frozen models are stored in bf16)."""
    ppo.main(tiny_args(world, tmp_path, bf16=True, iterations=1))
    assert read_jsonl(tmp_path / "metrics.jsonl")[0]["kl"] == 0


def test_rm_scores_are_normalised_with_the_rms_own_statistics(world, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "score", lambda rm, query_ids, *rest: torch.full((len(query_ids),), 4.5))
    ppo.main(tiny_args(world, tmp_path, iterations=1))
    m = read_jsonl(tmp_path / "metrics.jsonl")[0]
    assert m["rm_score"] == 2.0  # (4.5 - 0.5) / 2.0: the world RM's mean, std
    assert (m["score"], m["no_eos"]) == (-8.0, 1.0)  # no answer ended: the penalty replaces the RM's score


def test_reward_model_reads_what_it_was_trained_on(world):
    """A sampled answer reaches the RM as the same tokens as a text answer in training (SPEC 5)."""
    tok = data.load_tokenizer(str(world / "sft"))
    question, answer, n_video = "What colour is the circle?", "red", 20
    query = data.encode(tok, [(f"{data.VIDEO}\n{question}", None)], n_video)[0]
    trained = data.encode(tok, [(f"{data.VIDEO}\n{question}", answer), (data.RM_PROMPT, None)], n_video)[0]
    answer_ids = tok(" " + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    rows = [answer_ids, answer_ids[:-1] * 2 + [tok.eos_token_id] * 2]  # the second: EOS, then EOS again
    responses = data.pad(rows, tok.pad_token_id)
    seen = []

    class FakeRM:
        cfg = M.VLMConfig(pad_token_id=tok.pad_token_id)

        def reward(self, ids, mask, videos):
            seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask))
            assert bool(mask[:, -1].all())  # left-padded: the last column is every row's last real token
            return torch.zeros(len(ids))

    mask = ppo.response_mask(responses, tok.eos_token_id)
    ppo.score(FakeRM(), [query, query], responses, mask, torch.zeros(2, 1), data.rm_suffix(tok), chunk=2)
    assert seen[0] == trained
    assert seen[1] == query + answer_ids[:-1] * 2 + [tok.eos_token_id] + data.rm_suffix(tok)  # cut at the first EOS

"""model.py against Hugging Face references and its own invariants. CPU, fp32, tiny random weights."""
import json
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from model import (LLMConfig, LoRALinear, VideoLLM, VisionConfig, VLMConfig, add_lora, attention, load_hf_clip_vision,
                   load_hf_llama, load_pretrained, map_hf_key, merge_lora, sample_top_p, save_pretrained)
from ppo import lora_disabled
from sft import resize_vocab

TOL = 1e-4
# tiny tensors: OpenMP threads only add sync overhead (seen here: 25 s with 2 threads vs 4 s with 1)
torch.set_num_threads(1)


def tiny_cfg(kind="policy", tie=False, **llm) -> VLMConfig:
    llm = dict(dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48,
                    tie_word_embeddings=tie), **llm)
    vision = VisionConfig(image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    return VLMConfig(vision=vision, llm=LLMConfig(**llm), num_frames=3, kind=kind)


def tiny_model(seed=0, **kw) -> VideoLLM:
    torch.manual_seed(seed)
    return VideoLLM(tiny_cfg(**kw)).eval()


def prompts_with_video(cfg: VLMConfig, lengths, seed=0, left=True):
    """Rows `<bos> <video>*n text...` padded to a common length; returns input_ids, attention_mask, videos."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths) + 1 + cfg.n_video_tokens
    ids = torch.full((len(lengths), T), cfg.pad_token_id)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        row = [cfg.bos_token_id] + [cfg.video_token_id] * cfg.n_video_tokens + torch.randint(5, cfg.llm.vocab_size, (n,), generator=g).tolist()
        span = slice(T - len(row), T) if left else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    videos = torch.randn(len(lengths), cfg.num_frames, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return ids, mask, videos


# ----------------------------------------------------------------------------- against Hugging Face

@pytest.mark.parametrize("tie", [False, True])
def test_llama_matches_hf_with_gqa_and_left_padding(tmp_path, tie):
    torch.manual_seed(0)
    hf_cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    hf = LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # HF inits norms to 1; perturb them so a norm-weight mapping bug would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ours = VideoLLM.from_hf(str(tmp_path)).eval()
    assert ours.cfg.llm.rope_theta == 500.0 and ours.cfg.llm.tie_word_embeddings == tie
    assert (ours.lm_head.weight is ours.llm.embed_tokens.weight) == tie

    ids = torch.randint(5, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    ids[1, :4] = 3
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got = ours.logits(ours(ids, mask))
    real = mask.bool()
    keep = torch.ones(64, dtype=torch.bool)
    keep[[ours.cfg.video_token_id, ours.cfg.pad_token_id]] = False  # input-only tokens, banned by our logits()
    assert (got[real][:, keep] - ref[real][:, keep]).abs().max() < TOL
    assert (got[..., ~keep] == -1e9).all()


def test_clip_vision_matches_hf(tmp_path):
    torch.manual_seed(0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=16, patch_size=8)
    pixels = torch.randn(2, 3, 16, 16)
    hf_vision = CLIPVisionModel(CLIPVisionConfig(**vc)).eval()
    hf_vision.save_pretrained(tmp_path / "vision")
    full = CLIPModel(CLIPConfig(vision_config=vc, text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                                   num_attention_heads=4))).eval()
    full.save_pretrained(tmp_path / "clip")
    for folder, hf_tower in [("vision", hf_vision), ("clip", full.vision_model)]:
        cfg, sd = load_hf_clip_vision(str(tmp_path / folder))
        assert cfg.num_layers == 3 and cfg.layers_used == 2
        ours = VideoLLM(VLMConfig(vision=cfg)).vision.eval()
        ours.load_state_dict({k.removeprefix("vision."): v for k, v in sd.items()})  # strict: all keys, nothing more
        with torch.no_grad():
            ref = hf_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
            assert (ours(pixels) - ref).abs().max() < TOL


def test_llava_layout_maps_to_projector(tmp_path):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                      num_attention_heads=4)).eval()
    hf.save_pretrained(tmp_path / "llm")
    proj = {"model.mm_projector.0.weight": torch.randn(32, 64), "model.mm_projector.0.bias": torch.randn(32),
            "model.mm_projector.2.weight": torch.randn(32, 32), "model.mm_projector.2.bias": torch.randn(32)}
    torch.save(proj, tmp_path / "mm_projector.bin")
    assert map_hf_key("model.mm_projector.2.bias") == "projector.2.bias"
    assert map_hf_key("model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight") == "vision.pre_layrnorm.weight"
    assert map_hf_key("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    model = VideoLLM.from_hf(str(tmp_path / "llm"), projector_path=str(tmp_path / "mm_projector.bin"))
    assert torch.equal(model.projector[0].weight, proj["model.mm_projector.0.weight"])
    assert torch.equal(model.projector[2].bias, proj["model.mm_projector.2.bias"])
    # a full LLaVA checkpoint carries the projector next to the LLM weights
    llava = {k: v for k, v in hf.state_dict().items()} | proj
    os.makedirs(tmp_path / "llava")
    save_file(llava, tmp_path / "llava" / "model.safetensors")
    (tmp_path / "llava" / "config.json").write_text((tmp_path / "llm" / "config.json").read_text())
    model = VideoLLM.from_hf(str(tmp_path / "llava"))
    assert torch.equal(model.projector[2].weight, proj["model.mm_projector.2.weight"])
    _, sd = load_hf_llama(str(tmp_path / "llava"))
    assert all(k.startswith(("llm.", "lm_head.")) for k in sd)


# ----------------------------------------------------------------------------- video tokens

def test_pooling_after_projector_temporal_then_spatial():
    model = tiny_model()
    cfg = model.cfg
    videos = torch.randn(2, cfg.num_frames, 3, 16, 16)
    with torch.no_grad():
        out, rev = model.encode_video(videos), model.encode_video(videos.flip(1))
    assert out.shape == (2, cfg.n_video_tokens, cfg.llm.hidden_size)
    F_ = cfg.num_frames
    assert not torch.allclose(out[:, :F_], rev[:, :F_])  # temporal tokens follow frame order
    assert torch.allclose(out[:, :F_].flip(1), rev[:, :F_], atol=1e-6)
    assert torch.allclose(out[:, F_:], rev[:, F_:], atol=1e-6)  # spatial tokens are a mean over frames


def test_pooling_none_keeps_every_frame_patch_in_order_and_pools_the_same_features():
    pooled = tiny_model()
    cfg = tiny_cfg()
    cfg.pooling = "none"
    torch.manual_seed(0)
    full = VideoLLM(cfg).eval()
    P = cfg.vision.num_patches
    assert cfg.n_video_tokens == cfg.num_frames * P and pooled.cfg.n_video_tokens == cfg.num_frames + P
    videos = torch.randn(2, cfg.num_frames, 3, 16, 16)
    with torch.no_grad():
        out = full.encode_video(videos).unflatten(1, (cfg.num_frames, P))  # (B, F, P, D): frame-major
        means = pooled.encode_video(videos)
        one_frame = full.encode_video(videos[:, 1:2].expand_as(videos)).unflatten(1, (cfg.num_frames, P))
    assert torch.allclose(torch.cat([out.mean(2), out.mean(1)], 1), means, atol=1e-6)  # same weights: means of it
    assert torch.allclose(out[:, 1], one_frame[:, 0], atol=1e-6)  # token block f is frame f
    ids, mask, videos = prompts_with_video(cfg, [4, 6])  # the splice takes F * P tokens per video
    assert full(ids, mask, videos).shape == (2, ids.shape[1], cfg.llm.hidden_size)
    assert VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).pooling == "none"
    with pytest.raises(ValueError, match="pooling"):
        VLMConfig(pooling="max")


def test_attention_with_repeated_kv_heads_equals_grouped_sdpa():
    """The CUDA path (key/value heads repeated before SDPA, HF's repeat_kv) computes what the CPU path (SDPA's
    own grouping) does, under a causal + padding mask: query head i reads key/value head i // 2."""
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8)
    mask = torch.rand(2, 1, 5, 7) > 0.3
    mask[..., -1] = True
    grouped, repeated = attention(q, k, v, mask, expand_kv=False), attention(q, k, v, mask, expand_kv=True)
    assert torch.allclose(grouped, repeated, atol=1e-6)
    by_hand = F.scaled_dot_product_attention(q[:, 2:3], k[:, 1:2], v[:, 1:2], attn_mask=mask)  # query head 2 -> kv head 1
    assert torch.allclose(repeated[:, 2:3], by_hand, atol=1e-6)


def test_from_scratch_init_lets_the_video_through():
    """At init, video tokens of different clips must differ on the scale of a text embedding (std 0.02): with
    every weight at std 0.02 they differed by ~0.002 and the tiny model never learned from the video (EXPERIMENTS.md)."""
    model = tiny_model()
    videos = torch.randn(8, model.cfg.num_frames, 3, 16, 16)
    with torch.no_grad():
        spread = model.encode_video(videos).std(0).mean()  # across clips, per token and channel
        assert spread > 2 * float(model.llm.embed_tokens.weight.std())
        proj = model.llm.layers[0].self_attn
        assert float(proj.q_proj.weight.std()) == pytest.approx(32 ** -0.5, rel=0.1)  # 1/sqrt(fan_in)
        assert float(proj.o_proj.weight.std()) == pytest.approx(32 ** -0.5 / 2, rel=0.1)  # and 1/sqrt(2 * layers) into the residual


def test_video_splice_only_rows_with_video_and_count_checked():
    model = tiny_model()
    ids, mask, videos = prompts_with_video(model.cfg, [4, 6])
    text_only = torch.randint(5, 64, (1, ids.shape[1]))
    both = torch.cat([ids[:1], text_only, ids[1:]])
    with torch.no_grad():
        h = model(both, torch.cat([mask[:1], torch.ones_like(text_only), mask[1:]]), videos)
        h_alone = model(ids[1:], mask[1:], videos[1:])
        h_text = model(text_only, torch.ones_like(text_only))
    assert torch.allclose(h[2], h_alone[0], atol=1e-5) and torch.allclose(h[1], h_text[0], atol=1e-5)
    with pytest.raises(ValueError, match="video placeholder"):
        model(ids, mask, videos[:1])


# ----------------------------------------------------------------------------- generation

def test_cached_greedy_equals_full_forward_greedy():
    model = tiny_model()
    ids, mask, videos = prompts_with_video(model.cfg, [3, 7])
    resp, logp = model.generate(ids, mask, videos, max_new_tokens=8, temperature=0)
    seq, m = ids, mask
    with torch.no_grad():
        for j in range(resp.shape[1]):
            logits = model.logits(model(seq, m, videos))[:, -1]
            nxt = logits.argmax(-1)
            assert torch.equal(nxt, resp[:, j])
            assert torch.allclose(logp[:, j], F.log_softmax(logits, -1).gather(1, nxt[:, None]).squeeze(1), atol=TOL)
            seq, m = torch.cat([seq, nxt[:, None]], 1), F.pad(m, (0, 1), value=1)


def test_generate_runs_one_forward_per_new_token():
    """The prompt's pass gives the first token, each decoding step the next: N tokens, N passes (one more, after
    the last token, would only be thrown away; bench.py times this sampler against HF's generate)."""
    model = tiny_model()
    model.cfg.eos_token_id = 10_000  # an id no token has: never stops early
    passes = []
    model.llm.norm.register_forward_hook(lambda *_: passes.append(1))
    resp, logp = model.generate(*prompts_with_video(model.cfg, [3, 7]), max_new_tokens=6, temperature=1.0)
    assert resp.shape == (2, 6) and len(passes) == 6
    # sampled under inference mode, returned as normal tensors: a training forward on them can backpropagate
    assert not resp.is_inference() and not logp.is_inference()
    model.logits(model(resp, torch.ones_like(resp))).sum().backward()


def test_generate_checks_the_context_window_before_any_work():
    """Past max_position_embeddings RoPE goes on at positions never trained: garbage, so an error instead, before
    the first token (an answer stopping early at EOS must not hide a budget that cannot fit)."""
    model = tiny_model(max_position_embeddings=20)
    ids, mask, videos = prompts_with_video(model.cfg, [3, 7])  # 15 tokens: 1 + 7 video + 7 text
    model.generate(ids, mask, videos, max_new_tokens=5)  # 15 + 5 = 20: fits
    with pytest.raises(ValueError, match="15 tokens \\+ max_new_tokens 6 exceed the model's context window of 20"):
        model.generate(ids, mask, videos, max_new_tokens=6)


def test_reward_refuses_inputs_past_the_context_window():
    """An RM score read past max_position_embeddings comes from untrained RoPE positions: an error, not a number."""
    model = tiny_model(kind="reward", max_position_embeddings=20)
    assert model.reward(*prompts_with_video(model.cfg, [12, 5])).shape == (2,)  # 1 + 7 video + 12 = 20: fits
    with pytest.raises(ValueError, match="an RM input of 21 tokens exceeds the context window of 20"):
        model.reward(*prompts_with_video(model.cfg, [13, 5]))


def test_sampled_logprobs_match_recomputed_forward_and_seed_reproducible():
    model = tiny_model()
    ids, mask, videos = prompts_with_video(model.cfg, [2, 5, 4])
    out = [model.generate(ids, mask, videos, max_new_tokens=10, temperature=0.7, generator=torch.Generator().manual_seed(1))
           for _ in range(2)]
    (resp, logp), (resp2, logp2) = out
    assert torch.equal(resp, resp2) and torch.equal(logp, logp2)
    T = ids.shape[1]
    with torch.no_grad():
        h = model(torch.cat([ids, resp], 1), F.pad(mask, (0, resp.shape[1]), value=1), videos)
    logits = model.logits(h)[:, T - 1:-1] / 0.7
    ref = F.log_softmax(logits, -1).gather(2, resp[..., None]).squeeze(2)
    alive = logp != 0  # after EOS the logprob is 0 by contract
    assert (logp - ref)[alive].abs().max() < TOL


def test_tiny_top_p_is_greedy():
    model = tiny_model()
    ids, mask, videos = prompts_with_video(model.cfg, [3, 5])
    greedy, _ = model.generate(ids, mask, videos, max_new_tokens=5, temperature=0)
    nucleus, _ = model.generate(ids, mask, videos, max_new_tokens=5, temperature=1.0, top_p=1e-6,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy, nucleus)


def test_left_padding_does_not_change_output():
    model = tiny_model()
    ids, mask, videos = prompts_with_video(model.cfg, [3, 9])
    batch, batch_logp = model.generate(ids, mask, videos, max_new_tokens=6, temperature=0)
    alone, alone_logp = model.generate(ids[:1, mask[0].argmax():], mask[:1, mask[0].argmax():], videos[:1],
                                       max_new_tokens=6, temperature=0)
    assert mask[0, 0] == 0  # row 0 really was padded
    assert torch.equal(batch[0, :alone.shape[1]], alone[0])
    assert torch.allclose(batch_logp[0, :alone.shape[1]], alone_logp[0], atol=TOL)


def test_tokens_after_eos_are_pad():
    model = tiny_model(seed=3)
    ids, mask, videos = prompts_with_video(model.cfg, [3, 5])
    free, _ = model.generate(ids, mask, videos, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    model.cfg.eos_token_id = int(free[0, 2])  # make row 0 "emit EOS" by step 2
    resp, logp = model.generate(ids, mask, videos, max_new_tokens=12, temperature=1.0, generator=torch.Generator().manual_seed(0))
    for row, lp in zip(resp, logp):
        hits = (row == model.cfg.eos_token_id).nonzero()
        if len(hits):
            e = int(hits[0])
            assert (row[e + 1:] == model.cfg.pad_token_id).all() and (lp[e + 1:] == 0).all() and lp[e] < 0
    assert (resp[0] == model.cfg.eos_token_id).any()
    with pytest.raises(ValueError, match="LEFT"):
        model.generate(*prompts_with_video(model.cfg, [3, 5], left=False))


# ----------------------------------------------------------------------------- reward / value heads

def test_reward_reads_last_real_token_under_both_paddings():
    model = tiny_model(kind="reward")
    left = prompts_with_video(model.cfg, [3, 8], left=True)
    right = prompts_with_video(model.cfg, [3, 8], left=False)
    with torch.no_grad():
        r_left, r_right = model.reward(*left), model.reward(*right)
    assert r_left.shape == (2,) and torch.allclose(r_left, r_right, atol=1e-5)
    assert r_left.abs().min() > 0  # reward head is not zero-initialised...
    value = tiny_model(kind="value")
    with torch.no_grad():  # ...but the value head is (SPEC 3)
        assert torch.equal(value.values(value(*left)), torch.zeros(2, left[0].shape[1]))
    assert not hasattr(tiny_model(), "score_head")


# ----------------------------------------------------------------------------- LoRA

def test_lora_init_merge_disable_and_trainable_params():
    model = tiny_model()
    ids, mask, videos = prompts_with_video(model.cfg, [3, 6])
    with torch.no_grad():
        base = model.logits(model(ids, mask, videos))
    add_lora(model, r=4, alpha=8)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 7 * model.cfg.llm.num_layers
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {n for n, _ in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}
    with torch.no_grad():
        assert torch.allclose(model.logits(model(ids, mask, videos)), base, atol=1e-6)  # B = 0 at init
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)
        tuned = model.logits(model(ids, mask, videos))
        assert (tuned - base).abs().max() > 1e-3
        with lora_disabled(model):
            assert torch.allclose(model.logits(model(ids, mask, videos)), base, atol=1e-6)
        merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())
        assert torch.allclose(model.logits(model(ids, mask, videos)), tuned, atol=TOL)


def test_gradient_checkpointing_same_grads():
    model = tiny_model().train()
    ids, mask, videos = prompts_with_video(model.cfg, [3, 6])
    grads = []
    calls, forward = [0], model.llm.layers[0].forward
    model.llm.layers[0].forward = lambda *a, **kw: calls.__setitem__(0, calls[0] + 1) or forward(*a, **kw)
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model.logits(model(ids, mask, videos)).square().mean().backward()
        grads.append(model.llm.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(*grads, atol=1e-6)
    assert calls[0] == 1 + 2  # once without checkpointing; with it, once more in backward (recomputed)


# ----------------------------------------------------------------------------- our checkpoints

@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    model = tiny_model(kind="reward", tie=tie)
    add_lora(model, r=2, alpha=2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.normal_(std=0.1)
    save_pretrained(model, str(tmp_path), extra_config={"stage": "rm"})
    assert json.loads((tmp_path / "config.json").read_text())["extra"] == {"stage": "rm"}
    loaded = load_pretrained(str(tmp_path), kind="reward").eval()
    assert (loaded.lm_head.weight is loaded.llm.embed_tokens.weight) == tie
    ids, mask, videos = prompts_with_video(model.cfg, [3, 6])
    with torch.no_grad():
        assert torch.allclose(loaded.reward(ids, mask, videos), model.reward(ids, mask, videos), atol=1e-5)
    with pytest.raises(ValueError, match=r"holds a 'reward' model, but a 'policy'"):
        load_pretrained(str(tmp_path), kind="policy")


def test_load_rejects_mismatched_shapes_naming_the_file(tmp_path):
    save_pretrained(tiny_model(), str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["llm"]["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.safetensors.*gate_proj\.weight: shape \(48, 32\) in file"):
        load_pretrained(str(tmp_path))


def test_config_json_round_trip():
    cfg = tiny_cfg(kind="value", tie=True)
    assert VLMConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.n_video_tokens == 3 + 4


@pytest.mark.parametrize("tie", [False, True])
def test_resize_vocab_keeps_old_logits(tie):
    m = tiny_model(tie=tie)
    ids, mask, videos = prompts_with_video(m.cfg, [5, 3])
    before = m.logits(m(ids, mask, videos))
    resize_vocab(m, m.cfg.llm.vocab_size + 3)
    after = m.logits(m(ids, mask, videos))
    assert after.shape[-1] == before.shape[-1] + 3
    assert torch.allclose(after[..., :before.shape[-1]], before)
    assert (m.lm_head.weight is m.llm.embed_tokens.weight) == tie


def test_new_head_keeps_the_body(tmp_path):
    policy = tiny_model()
    save_pretrained(policy, str(tmp_path / "p"))
    rm = load_pretrained(str(tmp_path / "p"), kind="policy", new_head="reward")
    assert rm.cfg.kind == "reward" and float(rm.score_head.bias.detach()) == 0.0 and rm.score_head.weight.abs().sum() > 0
    ids, mask, videos = prompts_with_video(policy.cfg, [4, 2])
    assert torch.equal(policy(ids, mask, videos), rm(ids, mask, videos))
    save_pretrained(rm, str(tmp_path / "rm"))
    value = load_pretrained(str(tmp_path / "rm"), kind="reward", new_head="value")
    assert value.cfg.kind == "value" and value.score_head.weight.abs().sum() == 0  # zero head (SPEC 3)
    assert torch.equal(value.values(value(ids, mask, videos)), torch.zeros(2, ids.shape[1]))
    with pytest.raises(ValueError, match="'reward' model, but a 'policy'"):
        load_pretrained(str(tmp_path / "rm"), kind="policy")


def test_sampler_draws_the_given_distribution():
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0]).expand(40_000, -1)  # zeros first, between and last
    draws = sample_top_p(probs, 1.0, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6) / len(draws)
    assert (freq[probs[0] == 0] == 0).all()
    assert (freq - probs[0]).abs().max() < 0.01  # 4 standard errors at 40k draws
    nucleus = sample_top_p(probs, 0.6, torch.Generator().manual_seed(0))  # top_p 0.6 keeps {0.5, 0.3}
    assert set(nucleus.tolist()) == {1, 4}


def test_compiled_sampler_matches_eager():
    """generate(compile=True) draws the same tokens with the same logprobs as eager, also after a new batch size
    and prompt length (compiled again, those sizes symbolic), with the KV cache written in place by compiled code."""
    from torch._dynamo.utils import counters
    model = tiny_model()
    graphs = counters["stats"]["unique_graphs"]
    for lengths in ([3, 7], [4, 2, 6]):
        ids, mask, videos = prompts_with_video(model.cfg, lengths)
        kw = dict(max_new_tokens=6, temperature=1.0)
        eager = model.generate(ids, mask, videos, generator=torch.Generator().manual_seed(0), **kw)
        compiled = model.generate(ids, mask, videos, generator=torch.Generator().manual_seed(0), compile=True, **kw)
        assert torch.equal(eager[0], compiled[0])
        torch.testing.assert_close(eager[1], compiled[1])
    assert counters["stats"]["unique_graphs"] > graphs  # the compiled path really ran (no silent eager fallback)

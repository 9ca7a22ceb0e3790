"""The video LMM: CLIP ViT -> 2-layer MLP projector -> pooled video tokens spliced into a LLaMA decoder.

Everything here is plain PyTorch. Submodule names follow Hugging Face (CLIP, LLaMA, LLaVA) so real
checkpoints load by renaming keys only (`map_hf_key`). Also here: a KV-cached sampler (`generate`), the
reward/value head, hand-written LoRA, and our own checkpoint format (`save_pretrained` / `load_pretrained`).
There is no dropout anywhere: PPO needs the first policy ratio to be exactly 1 (SPEC 5).
"""
import atexit
import gc
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint


@dataclass
class VisionConfig:  # CLIP ViT; tiny defaults for the synthetic world (LLaVA-1.5: 336 / 14 / 1024 / 24 layers)
    image_size: int = 32
    patch_size: int = 8
    hidden_size: int = 64
    num_layers: int = 2  # layers of the full CLIP tower; only those up to select_layer are built
    num_heads: int = 4
    intermediate_size: int = 256
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # index into CLIP's hidden_states: -2 = penultimate layer, as LLaVA (SPEC 2)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def layers_used(self) -> int:
        # hidden_states[0] is the embedding output, hidden_states[i] the output of layer i
        return self.select_layer if self.select_layer >= 0 else self.num_layers + 1 + self.select_layer


@dataclass
class LLMConfig:  # LLaMA decoder
    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 344
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = False


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    num_frames: int = 8
    video_token_id: int = 4
    pad_token_id: int = 3
    eos_token_id: int = 2
    bos_token_id: int = 1
    kind: str = "policy"  # "policy" | "reward" | "value": what a checkpoint is, checked on load
    system: str | None = None  # the chat template's system line the model was trained with; None = Vicuna v1's
    pooling: str = "mean"  # "mean": VLM-RLAIF's temporal + spatial means (SPEC 2); "none": every frame's patches

    def __post_init__(self):
        if self.pooling not in ("mean", "none"):
            raise ValueError(f"pooling must be 'mean' or 'none', not {self.pooling!r}")

    @property
    def n_video_tokens(self) -> int:  # "mean": a temporal token per frame + a spatial token per patch; "none": F x P
        f, p = self.num_frames, self.vision.num_patches
        return f * p if self.pooling == "none" else f + p

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        rest = {k: v for k, v in d.items() if k not in ("vision", "llm")}
        return cls(vision=VisionConfig(**d["vision"]), llm=LLMConfig(**d["llm"]), **rest)


# ----------------------------------------------------------------------------- vision tower (CLIP ViT)
class CLIPAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (N, S, Dv)
        q, k, v = (rearrange(p(x), "n s (h d) -> n h s d", h=self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # every token sees every token: no mask in a ViT
        return self.out_proj(rearrange(y, "n h s d -> n s (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick-GELU, what OpenAI CLIP was trained with


class CLIPLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size) * 0.02)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels):  # (N, 3, H, W)
        patches = rearrange(self.patch_embedding(pixels), "n d gh gw -> n (gh gw) d")  # (N, P, Dv)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (N, 1, Dv)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (N, 1 + P, Dv)


class CLIPVision(nn.Module):
    """Returns CLIP's hidden_states[select_layer] without the CLS token; later layers are never built."""
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's spelling
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers_used))

    def forward(self, pixels):  # (N, 3, H, W) -> (N, P, Dv)
        x = self.pre_layrnorm(self.embeddings(pixels.to(self.pre_layrnorm.weight.dtype)))
        for layer in self.encoder.layers:
            x = layer(x)
        return x[:, 1:]  # drop CLS (SPEC 2)


# ----------------------------------------------------------------------------- language model (LLaMA)
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalise in fp32 and cast back before the weight, exactly as HF LLaMA, so bf16 results match it;
        # F.rms_norm is one call instead of five small ops (measured at decode size: 20 vs 28 us)
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, dtype):
    """cos/sin for rotary embeddings at per-row positions (B, T) -> (B, 1, T, head_dim) each."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # HF "rotate_half" layout: first half / second half pairs
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):  # x (B, H, T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys/values of every layer, preallocated for the whole generation and written in place."""
    def __init__(self, cfg: LLMConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.num_kv_heads, max_len, cfg.hidden_size // cfg.num_heads)
        # a tensor per layer, not slices of one: compiled, a write into a slice of one tensor copied it whole at
        # every step (the compiled sampler 3x slower than eager, measured); written per layer, in place
        self.k, self.v = ([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_layers)] for _ in range(2))
        self.length = 0  # slots filled, the current forward's included (VideoLLM.forward advances it first)

    def update(self, layer: int, k, v):  # k, v (B, Hkv, T, hd) -> everything cached so far (B, Hkv, S, hd)
        start, end = self.length - k.shape[2], self.length
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.n_heads, self.n_kv = layer_idx, cfg.num_heads, cfg.num_kv_heads
        hd = cfg.hidden_size // cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * hd, bias=False)
        self.k_proj, self.v_proj = (nn.Linear(cfg.hidden_size, cfg.num_kv_heads * hd, bias=False) for _ in range(2))
        self.o_proj = nn.Linear(cfg.num_heads * hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):  # x (B, T, D), mask (B, 1, T, S) bool
        # (B, T, heads * hd) -> (B, heads, T, hd); view + transpose rather than einops here: this runs for
        # every layer at every sampled token, and einops' parsing cost about 4% of the tiny model's sampling time
        q = self.q_proj(x).unflatten(-1, (self.n_heads, -1)).transpose(1, 2)
        k = self.k_proj(x).unflatten(-1, (self.n_kv, -1)).transpose(1, 2)
        v = self.v_proj(x).unflatten(-1, (self.n_kv, -1)).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd)
        return self.o_proj(attention(q, k, v, mask, expand_kv=q.is_cuda).transpose(1, 2).flatten(2))


def attention(q, k, v, mask, expand_kv: bool):  # q (B, H, T, hd), k and v (B, Hkv, S, hd), mask (B, 1, T, S) -> (B, H, T, hd)
    """Grouped-query attention: query head i uses key/value head i // (H / Hkv), as HF's repeat_kv. SDPA groups the
    heads without copying them (on CPU, copying the cache per query head was 40% of the tiny model's sampling time,
    profiled), but CUDA's fused kernels take a mask or grouped heads, not both: given both, SDPA falls back to its
    slow math kernel (PyTorch PR 181528). So on CUDA (expand_kv) the key/value heads are repeated first."""
    if expand_kv and k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj, self.up_proj = (nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaLayer(nn.Module):
    def __init__(self, cfg: LLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_4d(attention_mask, T: int):
    """Causal & key-padding boolean mask (B, 1, T, S) for the last T of S positions (earlier ones are cached)."""
    S = attention_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=attention_mask.device)[None]  # (1, S)
    mask = (k_pos <= q_pos) & attention_mask.bool()[:, None, :]  # (B, T, S)
    # a padding query would attend to nothing and SDPA would return NaN, which then leaks through 0 * NaN
    # in later layers; letting every query see itself keeps pad outputs finite (they are never used)
    return (mask | (k_pos == q_pos))[:, None]


# ----------------------------------------------------------------------------- the video LMM
class VideoLLM(nn.Module):
    """forward(input_ids, attention_mask, videos, cache) -> final-norm hidden states (B, T, D).

    Heads are separate calls so each stage pays only for what it uses: `logits(h)`, `values(h)` and `reward(...)`.
    `torch.compile(model)` works for training forwards (no cache); `generate(compile=True)` compiles its decoding steps."""
    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.cfg, lc = cfg, cfg.llm
        self.vision = CLIPVision(cfg.vision)
        self.projector = nn.Sequential(  # LLaVA mlp2x_gelu (SPEC 2)
            nn.Linear(cfg.vision.hidden_size, lc.hidden_size), nn.GELU(), nn.Linear(lc.hidden_size, lc.hidden_size))
        self.llm = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(lc.vocab_size, lc.hidden_size),
            layers=nn.ModuleList(LlamaLayer(lc, i) for i in range(lc.num_layers)),
            norm=RMSNorm(lc.hidden_size, lc.rms_norm_eps)))
        self.lm_head = nn.Linear(lc.hidden_size, lc.vocab_size, bias=False)
        if cfg.kind != "policy":
            self.score_head = nn.Linear(lc.hidden_size, 1)
        self.gradient_checkpointing = False
        self._init_weights()
        if lc.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight

    def _init_weights(self):
        """From-scratch init (loaded weights replace it). Every matrix gets std 1/sqrt(fan_in), so activations
        keep unit scale at any width, and the projections that write into a residual stream are scaled by
        1/sqrt(2 * layers) (GPT-2). GPT-2/LLaMA's fixed std 0.02 is that only near width 2,500: at our 64-128 the
        video tokens of different clips then differed by std 0.002 and the tiny model never learned from the
        video (EXPERIMENTS.md, "Where the tiny model gets stuck"). Embeddings keep std 0.02."""
        depth = {"vision.": self.cfg.vision.layers_used, "llm.": self.cfg.llm.num_layers}
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                std = m.weight[0].numel() ** -0.5  # fan_in
                if name.endswith(("o_proj", "down_proj", "out_proj", "fc2")):
                    std /= math.sqrt(2 * max(1, next(v for k, v in depth.items() if name.startswith(k))))
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.vision.embeddings.class_embedding, std=0.02)
        # score head (bias zeroed above, SPEC 3): all zeros for a value model, which starts from the RM but predicts 0
        if self.cfg.kind == "value":
            nn.init.zeros_(self.score_head.weight)
        elif self.cfg.kind != "policy":  # reward head: small normal weight, as AlpacaFarm / LLaVA-RLHF
            nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(self.cfg.llm.hidden_size + 1))

    def encode_video(self, videos):  # (B, F, 3, H, W) normalised pixels -> (B, F + P, D), unpooled (B, F * P, D)
        feats = self.vision(rearrange(videos, "b f c h w -> (b f) c h w"))  # (B*F, P, Dv)
        x = rearrange(self.projector(feats), "(b f) p d -> b f p d", b=len(videos))  # (B, F, P, D)
        if self.cfg.pooling == "none":  # a measurement option: at tiny width the means hide motion (EXPERIMENTS.md)
            return rearrange(x, "b f p d -> b (f p) d")
        # every frame projected, THEN pooled (SPEC 5); temporal tokens first (SPEC 2): one per frame, then one per patch
        return torch.cat([x.mean(dim=2), x.mean(dim=1)], dim=1)

    def embed(self, input_ids, videos=None):
        """Token embeddings with the video placeholders replaced by video tokens, in order.
        `videos` holds one video per row that has placeholders, in batch order."""
        x = self.llm.embed_tokens(input_ids)  # (B, T, D)
        if videos is None:
            return x
        is_video = input_ids == self.cfg.video_token_id  # (B, T)
        if not torch.compiler.is_compiling():  # the check syncs with the device; skip it in compiled graphs
            n, want = int(is_video.sum()), videos.shape[0] * self.cfg.n_video_tokens
            if n != want:
                raise ValueError(f"{n} video placeholder tokens in input_ids, but {videos.shape[0]} videos "
                                 f"need {want} ({self.cfg.n_video_tokens} each)")
        return x.masked_scatter(is_video[..., None], self.encode_video(videos).to(x.dtype))

    def forward(self, input_ids, attention_mask, videos=None, cache: KVCache | None = None, decoder=None):
        """input_ids (B, T); attention_mask (B, S) covers cached + new tokens (S = tokens cached before + T).
        Left and right padding both work: positions come from the mask. Returns hidden (B, T, D).
        decoder: what runs the layers (self.decoder; generate(compile=True) passes it compiled)."""
        T = input_ids.shape[1]
        x = self.embed(input_ids, videos)
        if cache is not None:
            cache.length += T  # before the layers write: each writes its keys and values at slots S - T .. S
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]  # (B, T)
        cos, sin = rope_cos_sin(position_ids, x.shape[-1] // self.cfg.llm.num_heads, self.cfg.llm.rope_theta, x.dtype)
        return (decoder or self.decoder)(x, cos, sin, attention_mask_4d(attention_mask, T), cache)

    def decoder(self, x, cos, sin, mask, cache=None):  # the LLaMA layers and the final norm: (B, T, D) -> (B, T, D)
        for layer in self.llm.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled():  # PPO trains in eval mode (no dropout)
                assert cache is None, "a KV cache under gradient checkpointing would stay empty: use torch.no_grad()"
                x = checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.llm.norm(x)

    def logits(self, hidden):  # (B, T, D) -> (B, T, V)
        """lm_head, with <video> and PAD made impossible: both are input-only. A sampled <video> would be
        spliced as video on the PPO recompute (and break the placeholder count); a sampled PAD would read as
        the end of the response. Masking here, not in generate, keeps sampling and recomputed logprobs equal.
        -1e9 rather than -inf: exp gives exactly 0 but p * log p stays 0 (an entropy with -inf gives NaN)."""
        banned = torch.tensor([self.cfg.video_token_id, self.cfg.pad_token_id], device=hidden.device)
        return self.lm_head(hidden).index_fill_(-1, banned, -1e9)  # in place: no copy of the (B, T, V) logits

    def values(self, hidden):  # (B, T, D) -> (B, T)
        return self.score_head(hidden).squeeze(-1)

    def reward(self, input_ids, attention_mask, videos=None):  # -> (B,)
        """Score at each row's LAST REAL token (last index where attention_mask == 1), whatever the padding
        side; the reference reads the last slot of a fixed-length tensor instead (SPEC 5)."""
        if input_ids.shape[1] > self.cfg.llm.max_position_embeddings:  # RoPE past the window: a garbage score
            raise ValueError(f"an RM input of {input_ids.shape[1]} tokens exceeds the context window of "
                             f"{self.cfg.llm.max_position_embeddings}")
        values = self.values(self(input_ids, attention_mask, videos))  # (B, T)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = (attention_mask.long() * positions).argmax(-1)  # (B,)
        return values.gather(1, last[:, None]).squeeze(1)

    def generate(self, input_ids, attention_mask, videos=None, max_new_tokens=64, temperature=1.0, top_p=1.0,
                 generator: torch.Generator | None = None, compile: bool = False):
        """Sample from LEFT-padded prompts with a KV cache. Returns responses (B, N) and their logprobs (B, N),
        N <= max_new_tokens (stops once every row emitted EOS); after a row's EOS: pad tokens, logprob 0.
        compile: run the decoding steps' layers through torch.compile (README, Performance). The first call compiles
        (seconds); a later call with a new batch size or cache length compiles once more, with that size symbolic.

        temperature 0 = greedy. logprobs are log_softmax(logits / T) of the chosen token (T = 1 when greedy), exactly
        what a full forward recomputes with the same scaling (SPEC 5). top_p filtering is NOT reflected in them: PPO
        samples with top_p = 1 (SPEC 3), where the two agree."""
        if not bool(attention_mask[:, -1].all()):
            raise ValueError("generate needs LEFT-padded prompts: the last column must be real tokens")
        with torch.inference_mode():  # no autograd bookkeeping at all: 13% more tokens/s than no_grad (tiny, measured)
            B, T = input_ids.shape
            cfg, w = self.cfg, self.lm_head.weight
            # past the context window RoPE runs at untrained positions (garbage): refuse now, not once an answer runs long
            if T + max_new_tokens > cfg.llm.max_position_embeddings:
                raise ValueError(f"a prompt of {T} tokens + max_new_tokens {max_new_tokens} exceed the model's context "
                                 f"window of {cfg.llm.max_position_embeddings}: shorten the prompt or lower max_new_tokens")
            cache = KVCache(cfg.llm, B, T + max_new_tokens, w.device, w.dtype)
            hidden = self(input_ids, attention_mask, videos, cache)[:, -1]  # (B, D) at every row's last prompt token
            scale = temperature if temperature > 0 else 1.0
            # one thread per fused CPU kernel: at one token per row a team of threads costs more than the work
            # (3-6% more tokens/s at 2 threads, measured); one graph (an error, not a silent fallback, if it broke);
            # compiled code is kept for later calls
            decoder = torch.compile(self.decoder, fullgraph=True, options={"cpp.threads": 1}) if compile else self.decoder
            done = torch.zeros(B, dtype=torch.bool, device=w.device)
            tokens, logprobs = [], []
            for _ in range(max_new_tokens):
                logp = F.log_softmax(self.logits(hidden).float() / scale, dim=-1)  # (B, V)
                tok = logp.argmax(-1) if temperature == 0 else sample_top_p(logp.exp(), top_p, generator)
                tokens.append(tok.masked_fill(done, cfg.pad_token_id))
                logprobs.append(logp.gather(1, tok[:, None]).squeeze(1).masked_fill(done, 0.0))
                done = done | (tok == cfg.eos_token_id)
                if bool(done.all()) or len(tokens) == max_new_tokens:  # no forward pass whose output is never read
                    break
                attention_mask = F.pad(attention_mask, (0, 1), value=1)
                hidden = self(tokens[-1][:, None], attention_mask, cache=cache, decoder=decoder)[:, -1]
        # stacked outside inference mode: normal tensors, which PPO's training forward may save for backward
        return torch.stack(tokens, 1), torch.stack(logprobs, 1)


def sample_top_p(probs, top_p: float, generator=None):  # (B, V) -> (B,)
    """Nucleus sampling: keep the smallest set of most likely tokens whose mass reaches top_p, then draw one token
    per row by inverting the cumulative distribution (the first token whose cumulative mass exceeds u * total,
    u ~ U[0, 1): a zero-probability token is never drawn). Same distribution as torch.multinomial, which on CPU
    draws an exponential per vocabulary entry: 12.7 ms against 0.6 ms here for 16 rows of 32k tokens (1 core)."""
    if top_p < 1.0:
        p, idx = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)  # mass BEFORE a token already enough: drop it
        probs = torch.zeros_like(probs).scatter(-1, idx, p)
    cdf = probs.double().cumsum(-1)  # float64: a 32k-term running sum stays exact enough
    u = torch.rand(probs.shape[0], 1, dtype=cdf.dtype, device=cdf.device, generator=generator) * cdf[:, -1:]
    # the clamp only guards u * total rounding up to total itself
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp(max=probs.shape[1] - 1)


# ----------------------------------------------------------------------------- LoRA (by hand)
class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * x A^T B^T with the base frozen. B starts at zero: output unchanged at init."""
    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # what nn.Linear and peft use
        self.scaling = alpha / r
        self.enabled = True  # ppo.lora_disabled turns the adapters off: the frozen base is the PPO reference model

    def forward(self, x):
        y = self.base(x)
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling if self.enabled else y

    def merged_weight(self):
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model: VideoLLM, r: int, alpha: float):
    """Wrap matching Linears of model.llm with LoRA and freeze every other weight except the score head
    (reward / value models train their new head together with the adapters, SPEC 3)."""
    model.requires_grad_(False)
    if hasattr(model, "score_head"):
        model.score_head.requires_grad_(True)
    for module in list(model.llm.modules()):
        for name, child in list(module.named_children()):
            if name in LORA_TARGETS and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
    return model


def merge_lora(model: nn.Module):
    """Fold every adapter into its base weight and put the plain nn.Linear back."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight.copy_(child.merged_weight())
                setattr(module, name, child.base)
    return model


# ----------------------------------------------------------------------------- our checkpoint format
def plain_state_dict(model: VideoLLM) -> dict:
    """State dict with LoRA folded in (checkpoints are always plain models) and the tied lm_head left out
    (safetensors refuses tensors that share memory; load re-ties)."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"{name}.weight"] = m.merged_weight().detach()
            for k in ("base.weight", "lora_A", "lora_B"):
                del sd[f"{name}.{k}"]
            if m.base.bias is not None:
                sd[f"{name}.bias"] = sd.pop(f"{name}.base.bias")
    if model.cfg.llm.tie_word_embeddings:
        del sd["lm_head.weight"]
    return sd


def _load_checked(model: VideoLLM, sd: dict, source: str, prefixes=("",)):
    """Copy `sd` into `model`, raising a ValueError naming `source` on unknown keys, shape mismatches, or
    model weights under `prefixes` that `sd` lacks."""
    own = {k: v for k, v in model.state_dict().items()
           if not (model.cfg.llm.tie_word_embeddings and k == "lm_head.weight")}
    problems = [f"unexpected key {k}" for k in sorted(set(sd) - set(own))]
    problems += [f"missing key {k}" for k in sorted(own) if k.startswith(prefixes) and k not in sd]
    problems += [f"{k}: shape {tuple(sd[k].shape)} in file, model expects {tuple(own[k].shape)}"
                 for k in sorted(sd) if k in own and sd[k].shape != own[k].shape]
    if problems:
        raise ValueError(f"cannot load {source}: " + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else ""))
    model.load_state_dict(sd, strict=False)


def save_pretrained(model: VideoLLM, path: str, extra_config: dict | None = None):
    """Write model.safetensors + config.json into `path` (kept: other files, e.g. the caller's tokenizer).
    Each file is written under a temporary name then os.replace'd, so a crash never leaves a torn file;
    weights go first, so a config.json always describes complete weights."""
    os.makedirs(path, exist_ok=True)
    weights = {k: v.contiguous() for k, v in plain_state_dict(model).items()}
    save_file(weights, os.path.join(path, "model.safetensors.tmp"))
    os.replace(os.path.join(path, "model.safetensors.tmp"), os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json.tmp"), "w") as f:
        json.dump({**model.cfg.to_dict(), "extra": extra_config or {}}, f, indent=2)
    os.replace(os.path.join(path, "config.json.tmp"), os.path.join(path, "config.json"))


def save_checkpoint(model: VideoLLM, tok, path: str, extra_config: dict | None = None):
    """A stage's final checkpoint folder: tokenizer files + model.safetensors + config.json, written under
    `path`.tmp and renamed when complete, so `path` is either absent or whole (an interrupted save is redone)."""
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tok.save_pretrained(tmp)
    save_pretrained(model, tmp, extra_config)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_config(path: str) -> tuple[VLMConfig, dict]:
    """(VLMConfig, extra_config dict) of one of our checkpoints."""
    with open(os.path.join(path, "config.json")) as f:
        d = json.load(f)
    return VLMConfig.from_dict({k: v for k, v in d.items() if k != "extra"}), d.get("extra", {})


def load_pretrained(path: str, kind: str | None = None, new_head: str | None = None) -> VideoLLM:
    """One of our checkpoints. kind: what it must hold ("policy", "reward", "value"), else a clear error.
    new_head: build a "reward" or "value" model from its weights with a NEW score head instead (the RM starts
    from the SFT policy; the value model from the RM with a zero head, SPEC 3)."""
    cfg, _ = load_config(path)
    if kind is not None and cfg.kind != kind:
        raise ValueError(f"{path} holds a '{cfg.kind}' model, but a '{kind}' model was expected")
    file = os.path.join(path, "model.safetensors")
    sd = load_file(file)
    if new_head is not None:
        cfg.kind = new_head
        sd = {k: v for k, v in sd.items() if not k.startswith("score_head.")}
    model = VideoLLM(cfg)
    _load_checked(model, sd, file, prefixes=("vision.", "projector.", "llm.", "lm_head.") if new_head else ("",))
    return model


# ----------------------------------------------------------------------------- Hugging Face / LLaVA loading
def map_hf_key(key: str) -> str | None:
    """HF / LLaVA parameter name -> ours (None: not ours, e.g. CLIP's text tower or rotary inv_freq)."""
    renames = [("model.mm_projector.", "projector."),  # LLaVA: mm_projector.0 / .2 = Linear, GELU, Linear
               ("model.vision_tower.vision_tower.vision_model.", "vision."),  # LLaVA with the tower inside
               ("vision_model.", "vision."),  # CLIPVisionModel / CLIPModel
               ("model.", "llm."), ("lm_head.", "lm_head.")]  # LlamaForCausalLM
    if key.endswith(("rotary_emb.inv_freq", "position_ids")):
        return None
    return next((new + key[len(old):] for old, new in renames if key.startswith(old)), None)


def read_hf_weights(path: str, prefixes: tuple, key_map=map_hf_key) -> dict:
    """Tensors of a HF folder (single or sharded safetensors, else pytorch_model.bin) or of one weight file,
    renamed to ours and kept only if the new name starts with one of `prefixes`. safetensors are read
    lazily, so e.g. fetching the projector from a 7B LLaVA checkpoint loads only the projector."""
    if os.path.isfile(path):
        files = [path]
    elif os.path.exists(index := os.path.join(path, "model.safetensors.index.json")) or \
            os.path.exists(index := os.path.join(path, "pytorch_model.bin.index.json")):
        with open(index) as f:
            files = [os.path.join(path, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = [os.path.join(path, "model.safetensors")]
    else:
        files = [os.path.join(path, "pytorch_model.bin")]
    sd = {}
    for file in files:
        if file.endswith(".safetensors"):
            with safe_open(file, "pt") as f:
                names = {k: key_map(k) for k in f.keys()}
                sd.update({new: f.get_tensor(k) for k, new in names.items() if new and new.startswith(prefixes)})
        else:
            for k, v in torch.load(file, map_location="cpu", weights_only=True).items():
                if (new := key_map(k)) and new.startswith(prefixes):
                    sd[new] = v
    return sd


def load_hf_llama(path: str) -> tuple[LLMConfig, dict]:
    """A local LlamaForCausalLM (or LLaVA-LLaMA) folder -> (LLMConfig, {llm.* / lm_head.*: tensor})."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{path}: RoPE scaling {rope} is not supported (plain RoPE only)")
    if c.get("head_dim", c["hidden_size"] // c["num_attention_heads"]) * c["num_attention_heads"] != c["hidden_size"]:
        raise ValueError(f"{path}: head_dim * num_attention_heads != hidden_size is not supported")
    if c.get("attention_bias") or c.get("mlp_bias") or c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: only bias-free SiLU LLaMA is supported")
    cfg = LLMConfig(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                    num_heads=c["num_attention_heads"], num_kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                    intermediate_size=c["intermediate_size"], rope_theta=rope.get("rope_theta", c.get("rope_theta", 10000.0)),
                    rms_norm_eps=c["rms_norm_eps"], max_position_embeddings=c["max_position_embeddings"],
                    tie_word_embeddings=c.get("tie_word_embeddings", False))
    sd = read_hf_weights(path, ("llm.", "lm_head."))
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    return cfg, sd


def load_hf_clip_vision(path: str, select_layer: int = -2) -> tuple[VisionConfig, dict]:
    """A local CLIPVisionModel or CLIPModel folder -> (VisionConfig, {vision.*: tensor}); the layers after
    select_layer and post_layernorm are dropped, as we never run them."""
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    c = c.get("vision_config", c)  # CLIPModel nests the vision tower's config
    if c.get("hidden_act", "quick_gelu") != "quick_gelu":
        raise ValueError(f"{path}: only quick_gelu CLIP towers are supported")
    cfg = VisionConfig(image_size=c["image_size"], patch_size=c["patch_size"], hidden_size=c["hidden_size"],
                       num_layers=c["num_hidden_layers"], num_heads=c["num_attention_heads"],
                       intermediate_size=c["intermediate_size"], layer_norm_eps=c.get("layer_norm_eps", 1e-5),
                       select_layer=select_layer)
    used = ("vision.embeddings.", "vision.pre_layrnorm.",
            *(f"vision.encoder.layers.{i}." for i in range(cfg.layers_used)))
    return cfg, read_hf_weights(path, used, _clip_key)


def _clip_key(key: str) -> str | None:
    # transformers >= 5 saves a CLIPVisionModel without the "vision_model." prefix that v4 and CLIPModel use
    if key.startswith(("embeddings.", "pre_layrnorm.", "encoder.")):
        key = "vision_model." + key
    return map_hf_key(key)


def from_hf(llm_path: str, vision_path: str | None = None, projector_path: str | None = None, *,
            num_frames: int = 8, video_token_id: int = 4, pad_token_id: int = 3, eos_token_id: int = 2,
            bos_token_id: int = 1, kind: str = "policy", select_layer: int = -2) -> VideoLLM:
    """Assemble a VideoLLM from local HF parts. No vision_path: a random tiny CLIP (VisionConfig defaults).
    Projector from projector_path (LLaVA mm_projector.bin or any file/folder with mm_projector keys), else
    from llm_path if it is a full LLaVA checkpoint, else random. Token ids must match the caller's tokenizer."""
    llm_cfg, llm_sd = load_hf_llama(llm_path)
    vis_cfg, vis_sd = load_hf_clip_vision(vision_path, select_layer) if vision_path else (VisionConfig(select_layer=select_layer), {})
    cfg = VLMConfig(vision=vis_cfg, llm=llm_cfg, num_frames=num_frames, video_token_id=video_token_id,
                    pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=bos_token_id, kind=kind)
    model = VideoLLM(cfg)
    _load_checked(model, llm_sd, llm_path, prefixes=("llm.", "lm_head."))
    if vis_sd:
        _load_checked(model, vis_sd, vision_path, prefixes=("vision.",))
    proj_source = projector_path or llm_path
    proj_sd = read_hf_weights(proj_source, ("projector.",))
    if proj_sd or projector_path:
        _load_checked(model, proj_sd, proj_source, prefixes=("projector.",))
    return model


VideoLLM.from_hf = staticmethod(from_hf)  # the entry point the stages call: VideoLLM.from_hf(...)


# ----------------------------------------------------------------------------- the large-model path
def for_training(model: VideoLLM, device, bf16=False, compile=False, grad_ckpt=False):
    """Options for large models, applied after LoRA / freezing: gradient checkpointing of the LLM layers; bf16
    autocast, with the FROZEN weights stored in bf16 (they need no fp32 copy: half their memory); torch.compile
    of forward(). -> (the module to call for training forwards, a function returning the autocast context)."""
    model.gradient_checkpointing = grad_ckpt
    if bf16:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(torch.bfloat16)
    autocast = lambda: torch.autocast(torch.device(device).type, torch.bfloat16, enabled=bf16)
    return (torch.compile(model) if compile else model), autocast


def gpu_peak_gb(device) -> dict:
    """{"gpu_peak_gb": the most GPU memory tensors have held so far} for a metrics line on CUDA; {} elsewhere."""
    if torch.device(device).type != "cuda":
        return {}
    return {"gpu_peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3)}


# ----------------------------------------------------------------------------- data parallel (torchrun)
def init_distributed():
    """Under torchrun (WORLD_SIZE set): join the process group (NCCL on GPU, gloo on CPU) and take this rank's
    GPU. -> (rank, world_size, device); (0, 1, cuda or cpu) in a plain run."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1, "cuda" if torch.cuda.is_available() else "cpu"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    if not dist.is_initialized():  # once per process (a test runs several stages in one)
        # 2 hours, not 10 (NCCL) or 30 (gloo) minutes: the others wait while rank 0 writes a 7B resume point
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(hours=2))
        # at exit, free gloo's finished work while Python is whole (else a rank aborted 2 runs in 16; 0 in 30 now)
        atexit.register(lambda: (dist.destroy_process_group(), gc.collect()))
    return dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if torch.cuda.is_available() else "cpu"


def all_sum(x, device):
    """A number or tensor summed over the ranks (float64 tensor; itself in a plain run)."""
    t = torch.as_tensor(x, dtype=torch.float64, device=device).detach().clone()
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def check_same(x, device, what):
    """Every rank must hold the same number x, e.g. the resume step (a node that cannot see --out's resume.pt
    would start over, its collectives paired up wrongly). Every rank sees the same sums, so all of them raise."""
    total, squares, n = all_sum([x, x * x, 1], device).tolist()
    if squares * n != total * total:  # equality in Cauchy-Schwarz: only when every x is the same
        raise ValueError(f"the ranks disagree on {what} (mean {total / n:g}, this rank {x}); "
                         "under multi-node torchrun --out must be on a file system every node sees")


def sync_gradients(params):
    """Data parallel by hand: after every rank's backward on its shard, sum each gradient over the ranks (each rank's
    loss is its share of the global batch's loss, so the sum is the global gradient): DDP's all-reduce, unbucketed.
    DDP's wrapper is not used: it tracks only parameters reached inside forward(), but our heads are separate calls
    and text-only batches skip the vision tower. A parameter no rank used keeps grad None, as in one process."""
    if not dist.is_initialized():
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(used)
    for p in [p for p, u in zip(params, used.tolist()) if u]:  # every parameter some rank used
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def gather(items: list) -> list:
    """Every rank's list, concatenated in rank order (the list itself in a plain run)."""
    if not dist.is_initialized():
        return items
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [x for part in parts for x in part]


def barrier():  # wait for every rank (no-op in a plain run)
    if dist.is_initialized():
        dist.barrier()


def broadcast_parameters(model):
    """Every rank starts from rank 0's weights (DDP does the same when it wraps a model)."""
    if dist.is_initialized():
        for t in model.state_dict().values():
            dist.broadcast(t, 0)

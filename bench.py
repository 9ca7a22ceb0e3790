"""Benchmark model.py against Hugging Face transformers on identical random weights (`make bench`).

For each configuration (the tiny default and a ~100M-parameter LLaMA-shaped one) a random LlamaForCausalLM
and CLIPVisionModel are saved to a temporary folder and loaded into ours with `VideoLLM.from_hf`, so both
sides hold the same weights (checked: their logits agree). Then, side by side:
  1. generation tokens/s: our KV-cache sampler vs transformers' `generate` vs naive no-cache decoding
     (text-only left-padded prompts, sampling at temperature 1, top_p 1, no top_k, no EOS stop on either side)
  2. training step time (forward + backward + AdamW) on video batches: ours vs LlamaForCausalLM + CLIPVisionModel
  3. the same sampling and training steps under torch.compile (HF's sampling: its static cache, compiled)
  4. peak memory of 1 and 2, each in a fresh process
Timings are medians of interleaved repetitions (ours, HF, ours, HF, ...), so a busy machine slows both
alike. The last lines read `ratio <name> <value>`; value > 1 means ours is faster or smaller.
Not part of `make test` (tests/test_bench.py runs a miniature version).
"""
import ctypes
import gc
import json
import multiprocessing
import os
import re
import statistics
import tempfile
import time
from copy import deepcopy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

import data
import model as M

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()  # HF's save/load progress bars would bury the figures

# the tiny default is sft.py's from-scratch model (vocab: the world's tokenizer); "100m" is LLaMA-shaped
# (32k vocabulary, SwiGLU width 8/3 d, GQA) with a small CLIP, 112M LLM parameters; "mini" is for the smoke test
SHAPES = {
    "tiny": dict(llm=dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=344),
                 vision=dict(image_size=48, patch_size=12, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256),
                 frames=8, prompt_len=40, train_batch=16, train_len=120, reps=5),
    "100m": dict(llm=dict(vocab_size=32000, hidden_size=768, num_layers=10, num_heads=12, num_kv_heads=4, intermediate_size=2048),
                 vision=dict(image_size=96, patch_size=16, hidden_size=384, num_layers=6, num_heads=6, intermediate_size=1536),
                 frames=8, prompt_len=60, train_batch=4, train_len=128, reps=3),
    "mini": dict(llm=dict(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48),
                 vision=dict(image_size=16, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64),
                 frames=2, prompt_len=8, train_batch=2, train_len=16, reps=1),
}


@dataclass
class Args:
    sizes: list = field(default_factory=lambda: ["tiny", "100m"])  # configurations to run (tiny, 100m, mini)
    threads: int = 2  # torch threads, the same for every contender (the targets are for 2 CPU cores)
    reps: int = 0  # interleaved timed repetitions per contender after one warm-up (0 = the shape's: tiny 5, 100m 3); medians
    batch: int = 16  # generation: prompts per batch
    new_tokens: int = 64  # generation: tokens sampled per prompt
    naive: list = field(default_factory=lambda: ["tiny"])  # sizes that also time naive no-cache decoding (slow)
    compile: list = field(default_factory=lambda: ["tiny"])  # sizes that also time torch.compile'd sampling and training steps (~1 min to compile)
    memory: bool = True  # measure peak memory (one fresh process per measurement)
    json_out: str = ""  # also write every figure to this JSON file ("" = print only)


# ----------------------------------------------------------------------------- the two implementations

def save_hf(shape: dict, folder: str):
    """Random HF LLaMA and CLIP vision tower of the shape, saved to folder/llm and folder/vision."""
    l, v = shape["llm"], shape["vision"]
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=l["vocab_size"], hidden_size=l["hidden_size"], intermediate_size=l["intermediate_size"],
        num_hidden_layers=l["num_layers"], num_attention_heads=l["num_heads"], num_key_value_heads=l["num_kv_heads"],
        max_position_embeddings=512)).save_pretrained(f"{folder}/llm")
    CLIPVisionModel(CLIPVisionConfig(
        image_size=v["image_size"], patch_size=v["patch_size"], hidden_size=v["hidden_size"],
        num_hidden_layers=v["num_layers"], num_attention_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"])).save_pretrained(f"{folder}/vision")


def load_ours(shape: dict, folder: str) -> M.VideoLLM:
    model = M.VideoLLM.from_hf(f"{folder}/llm", f"{folder}/vision", num_frames=shape["frames"])
    torch.manual_seed(1)
    for p in model.projector.parameters():  # from_hf leaves the projector random: make it non-trivial and seeded
        torch.nn.init.normal_(p, std=0.02)
    model.cfg.eos_token_id = model.cfg.llm.vocab_size  # an id no token has: every row samples all new tokens
    return model


class HFVideoLLM(torch.nn.Module):
    """The same network assembled from transformers' classes the way LLaVA does: CLIPVisionModel features,
    our projector weights (a plain nn.Sequential), the same pooling and splice, LlamaForCausalLM on embeddings.
    The CLIP layers after the one we read are removed: LLaVA runs them for nothing, which we would count."""

    def __init__(self, ours: M.VideoLLM, folder: str):
        super().__init__()
        self.cfg = ours.cfg
        self.clip = CLIPVisionModel.from_pretrained(f"{folder}/vision")
        tower = getattr(self.clip, "vision_model", self.clip)  # transformers 4 nests the tower, 5 does not
        del tower.encoder.layers[ours.cfg.vision.layers_used:]
        self.projector = deepcopy(ours.projector)
        self.llama = LlamaForCausalLM.from_pretrained(f"{folder}/llm")
        self.llama.generation_config.eos_token_id = None  # no EOS stop, as ours

    def forward(self, ids, mask, labels, videos):  # -> HF's output: .logits, and .loss for the labels
        B = videos.shape[0]
        feats = self.clip(pixel_values=videos.flatten(0, 1)).last_hidden_state[:, 1:]
        x = self.projector(feats).unflatten(0, (B, -1))  # (B, F, P, D)
        tokens = torch.cat([x.mean(2), x.mean(1)], 1)
        emb = self.llama.get_input_embeddings()(ids)
        emb = emb.masked_scatter((ids == self.cfg.video_token_id)[..., None], tokens)
        return self.llama(inputs_embeds=emb, attention_mask=mask, labels=labels)

    def loss(self, ids, mask, labels, videos):
        return self(ids, mask, labels, videos).loss


def ours_loss(model: M.VideoLLM, ids, mask, labels, videos):
    """Our training loss as sft.py computes it: next-token cross-entropy where there is a label, with logits
    computed only there (HF's LlamaForCausalLM computes them at every position, video and padding included)."""
    hidden = model(ids, mask, videos)[:, :-1]
    targets = labels[:, 1:]
    keep = targets != -100
    return F.cross_entropy(model.logits(hidden[keep]).float(), targets[keep])


@torch.no_grad()
def naive_generate(model: M.VideoLLM, ids, mask, new_tokens: int, generator):
    """Sampling without a cache: every step runs the whole sequence again."""
    for _ in range(new_tokens):
        logits = model.logits(model(ids, mask)[:, -1])
        tok = torch.multinomial(F.softmax(logits.float(), -1), 1, generator=generator)
        ids, mask = torch.cat([ids, tok], 1), F.pad(mask, (0, 1), value=1)
    return ids


# ----------------------------------------------------------------------------- inputs

def prompts(cfg: M.VLMConfig, batch: int, length: int, seed=0):
    """Text-only prompts, LEFT-padded, lengths between length/2 and length (as a PPO batch of questions)."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(length // 2, length + 1, (batch,), generator=g)
    ids = torch.full((batch, length), cfg.pad_token_id)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i, n in enumerate(lens.tolist()):
        ids[i, length - n:] = torch.randint(5, cfg.llm.vocab_size, (n,), generator=g)
        ids[i, length - n] = cfg.bos_token_id
        mask[i, length - n:] = 1
    return ids, mask


def train_batch(cfg: M.VLMConfig, batch: int, length: int, seed=0):
    """`<bos> <video>*n text` rows, RIGHT-padded to `length` (as sft.py's batches); labels on the text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), cfg.pad_token_id)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for i in range(batch):
        n = int(torch.randint(3 * length // 4, length + 1, (1,), generator=g))
        text = torch.randint(5, cfg.llm.vocab_size, (n - 1 - cfg.n_video_tokens,), generator=g)
        ids[i, :n] = torch.cat([torch.tensor([cfg.bos_token_id] + [cfg.video_token_id] * cfg.n_video_tokens), text])
        mask[i, :n] = 1
    labels = ids.masked_fill((ids == cfg.video_token_id) | (mask == 0), -100)
    labels[:, 0] = -100
    size = cfg.vision.image_size
    videos = torch.randn(batch, cfg.num_frames, 3, size, size, generator=g)
    return ids, mask, labels, videos


# ----------------------------------------------------------------------------- workloads

def workloads(ours: M.VideoLLM, hf: HFVideoLLM, shape: dict, a: Args, compiled: bool = False) -> dict:
    """name -> a function running one repetition; for training both sides compute the same loss. compiled: each
    side's compiled path (ours: generate(compile=True); HF: its static cache and a compiled forward, with its
    default options, on a copy of its LLaMA, so the training steps' copy stays as it is)."""
    ids, mask = prompts(ours.cfg, a.batch, shape["prompt_len"])
    sample = dict(temperature=1.0, top_p=1.0)
    llama, hf_cache = hf.llama, {}
    if compiled:
        llama, hf_cache = deepcopy(hf.llama), dict(cache_implementation="static")
        llama.forward = torch.compile(llama.forward)

    def gen_ours():
        return ours.generate(ids, mask, None, a.new_tokens, generator=torch.Generator().manual_seed(0), compile=compiled,
                             **sample)[0]

    def gen_hf():
        out = llama.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, max_new_tokens=a.new_tokens,
                             min_new_tokens=a.new_tokens, pad_token_id=ours.cfg.pad_token_id, **hf_cache, **sample)
        return out[:, ids.shape[1]:]

    def gen_naive():
        return naive_generate(ours, ids, mask, a.new_tokens, torch.Generator().manual_seed(0))[:, ids.shape[1]:]

    batch = train_batch(ours.cfg, shape["train_batch"], shape["train_len"])

    def trainer(module, loss_fn):
        loss_fn = torch.compile(loss_fn) if compiled else loss_fn
        opt = torch.optim.AdamW(module.parameters(), lr=1e-5)

        def step():
            loss = loss_fn(*batch)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)  # after the step: between steps no gradient is held (the memory baseline)
            return loss.detach()
        return step

    return dict(gen_ours=gen_ours, gen_hf=gen_hf, gen_naive=gen_naive,
                train_ours=trainer(ours, lambda *b: ours_loss(ours, *b)), train_hf=trainer(hf, hf.loss))


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(fns: dict, reps: int) -> dict:
    """One warm-up call each, then reps rounds of A B A B ...; -> name -> median seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------- peak memory in a fresh process

def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", open("/proc/self/status").read()).group(1))


def _peak_child(size: str, folder: str, name: str, a: Args, queue):
    torch.set_num_threads(a.threads)
    ours = load_ours(SHAPES[size], folder)
    hf = HFVideoLLM(ours, folder)
    fn = workloads(ours, hf, SHAPES[size], a)[name]
    if name.endswith("ours"):  # keep only the contender measured
        del hf
    else:
        del ours
    fn()  # warm-up: the optimizer state exists from here on, as in a training run
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back to the OS so reuse does not hide growth
    open("/proc/self/clear_refs", "w").write("5")  # resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
    base = _rss_kb("VmRSS")
    fn()
    queue.put((_rss_kb("VmHWM") - base) / 1024)


def peak_mb(size: str, folder: str, name: str, a: Args) -> float:
    """Peak resident memory growth (MB) of one repetition above the loaded weights (and, for training, the
    optimizer state of the warm-up step), in a fresh process. Its glibc gets a fixed mmap threshold: with the
    default adaptive one, whether freed blocks went back to the OS varied from run to run (identical runs
    measured 74 and 99 MB), with a fixed one they repeat within ~1 MB."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_peak_child, args=(size, folder, name, a, queue))
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by the child's glibc at start (spawn copies the environment)
    try:
        p.start()
    finally:
        del os.environ["MALLOC_MMAP_THRESHOLD_"]
    p.join()
    if p.exitcode != 0:  # e.g. killed for memory: say so, not wait forever for its figure
        raise SystemExit(f"bench: the memory measurement of {size}/{name} failed (exit code {p.exitcode})")
    return queue.get(timeout=60)


# ----------------------------------------------------------------------------- main

def main(a: Args):
    torch.set_num_threads(a.threads)
    cpu = re.search(r"model name\s*:\s*(.*)", open("/proc/cpuinfo").read())
    print(f"bench: {cpu.group(1) if cpu else 'unknown CPU'}, {os.cpu_count()} cores, load average "
          f"{os.getloadavg()[0]:.1f} at start; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{a.threads} threads for every contender; generation batch {a.batch} x {a.new_tokens} new tokens")
    ratios, figures = {}, {}
    for size in a.sizes:
        shape = SHAPES[size]
        reps = a.reps or shape["reps"]
        with tempfile.TemporaryDirectory() as folder:
            # 1. identical weights: HF saves, ours loads; the logits on one video batch must agree
            save_hf(shape, folder)
            ours = load_ours(shape, folder)
            hf = HFVideoLLM(ours, folder)
            n_params = sum(p.numel() for p in ours.parameters()) / 1e6
            with torch.no_grad():
                ids, mask, labels, videos = train_batch(ours.cfg, shape["train_batch"], shape["train_len"])
                ref, got = hf(ids, mask, labels, videos).logits, ours.logits(ours(ids, mask, videos))
                allowed = got[0, 0] > -1e9  # ours bans <video> and PAD as outputs (model.logits)
                diff = float((ref - got)[mask.bool()][:, allowed].abs().max())
            if diff > 1e-4:
                raise SystemExit(f"bench: {size}: logits differ by {diff:.2e}: the weights are not the same")
            print(f"\n== {size}: {n_params:.1f}M parameters, max logit difference ours vs HF {diff:.1e}, "
                  f"medians of {reps} interleaved repetitions")

            # 2. eager timings, interleaved
            w = workloads(ours, hf, shape, a)
            for name in ["gen_ours", "gen_hf"] + ["gen_naive"] * (size in a.naive):  # each really samples new_tokens per row
                if w[name]().shape != (a.batch, a.new_tokens):
                    raise SystemExit(f"bench: {name} did not sample {a.new_tokens} tokens per row")
            gen = interleaved({k: w[k] for k in ["gen_ours", "gen_hf"] + ["gen_naive"] * (size in a.naive)}, reps)
            train = interleaved({k: w[k] for k in ("train_ours", "train_hf")}, reps)
            tokens = a.batch * a.new_tokens
            for k, t in gen.items():
                figures[f"{size}/{k}_tok_s"] = tokens / t
                print(f"generation {k[4:]:>16}: {tokens / t:8.0f} tokens/s ({t:.3f} s per batch)")
            for k, t in train.items():
                figures[f"{size}/{k}_s"] = t
                print(f"train step {k[6:]:>6}: {1000 * t:8.1f} ms (batch {shape['train_batch']} x {shape['train_len']})")
            ratios[f"gen_vs_hf_{size}"] = gen["gen_hf"] / gen["gen_ours"]
            if "gen_naive" in gen:
                ratios[f"gen_vs_naive_{size}"] = gen["gen_naive"] / gen["gen_ours"]
            ratios[f"train_vs_hf_{size}"] = train["train_hf"] / train["train_ours"]

            # 3. torch.compile'd sampling and training steps (the first call compiles; its time is reported apart)
            if size in a.compile:
                wc = workloads(ours, hf, shape, a, compiled=True)
                # the samplers before the training steps are compiled: once those had run, everything in this
                # process ran 30-40% slower and ours compiled / HF fell from 2.21-2.25 to 1.95-2.07 (measured)
                for k in ("gen_ours", "gen_hf"):
                    figures[f"{size}/{k}_compile_s"] = timed(wc[k])
                    if wc[k]().shape != (a.batch, a.new_tokens):
                        raise SystemExit(f"bench: compiled {k} did not sample {a.new_tokens} tokens per row")
                # two pairs, each interleaved: ours compiled against `generate` as HF runs it by default (eager: the
                # 2x target's comparison, README) and against HF's own compiled path
                vs_eager = interleaved(dict(ours=wc["gen_ours"], hf=w["gen_hf"]), reps)
                vs_compiled = interleaved(dict(ours=wc["gen_ours"], hf=wc["gen_hf"]), reps)
                for name, t in [("ours compiled", vs_eager["ours"]), ("hf (same rounds)", vs_eager["hf"]),
                                ("ours compiled", vs_compiled["ours"]), ("hf compiled", vs_compiled["hf"])]:
                    print(f"generation {name:>16}: {tokens / t:8.0f} tokens/s ({t:.3f} s per batch)")
                figures.update({f"{size}/gen_compiled_tok_s": tokens / vs_eager["ours"],
                                f"{size}/gen_hf_beside_compiled_tok_s": tokens / vs_eager["hf"],
                                f"{size}/gen_hf_compiled_tok_s": tokens / vs_compiled["hf"]})
                print(f"generation compilation: ours {figures[f'{size}/gen_ours_compile_s']:.0f} s, "
                      f"HF {figures[f'{size}/gen_hf_compile_s']:.0f} s")
                ratios[f"gen_compiled_vs_hf_{size}"] = vs_eager["hf"] / vs_eager["ours"]
                ratios[f"gen_compiled_vs_hf_compiled_{size}"] = vs_compiled["hf"] / vs_compiled["ours"]
                for k in ("train_ours", "train_hf"):
                    figures[f"{size}/{k}_compile_s"] = timed(wc[k])
                # not interleaved with the eager steps: alternating them, the two thread pools' spinning slowed
                # the eager step 3.3x at 2 threads (measured); so compiled/eager compares two blocks of time
                comp = interleaved({k: wc[k] for k in ("train_ours", "train_hf")}, reps)
                for k, t in comp.items():
                    figures[f"{size}/{k}_compiled_s"] = t
                    print(f"train step {k[6:]:>6}, compiled: {1000 * t:8.1f} ms (compilation {figures[f'{size}/{k}_compile_s']:.0f} s)")
                ratios[f"train_compiled_vs_hf_compiled_{size}"] = comp["train_hf"] / comp["train_ours"]
                ratios[f"train_compiled_vs_eager_{size}"] = train["train_ours"] / comp["train_ours"]
                del wc  # its closures hold the models and HF's compiled copy
            del ours, hf, w

            # 4. peak memory, one fresh process per measurement
            if a.memory:
                for k in ("gen_ours", "gen_hf", "train_ours", "train_hf"):
                    figures[f"{size}/{k}_peak_mb"] = peak_mb(size, folder, k, a)
                    print(f"peak memory {k:>10}: {figures[f'{size}/{k}_peak_mb']:7.1f} MB above the weights")
                for k in ("gen", "train"):
                    ratios[f"mem_{k}_vs_hf_{size}"] = max(figures[f"{size}/{k}_hf_peak_mb"], 0.1) / max(figures[f"{size}/{k}_ours_peak_mb"], 0.1)

    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")
    for name, value in ratios.items():
        print(f"ratio {name} {value:.2f}")
    if a.json_out:
        data.write_atomic(a.json_out, json.dumps(dict(args=vars(a), figures=figures, ratios=ratios), indent=2))
    return ratios


if __name__ == "__main__":
    main(data.parse_args(Args, description=__doc__))

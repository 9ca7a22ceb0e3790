"""Stage 1: supervised fine-tuning of the video LMM with the paper's curriculum (SPEC 3).

Trains on LLaVA-style conversations (video QA and, for the built-in world, its text-only corpus and captions) with the
loss on assistant tokens only: first every short-answer example, then every long-answer one
(difficulty = answer length). Writes a checkpoint folder that every later stage starts from.

    python sft.py --out runs/tiny/sft                 # the built-in world, from scratch
    python sft.py --out runs/tiny/sft --resume true   # continue an interrupted run
"""
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from itertools import groupby

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M


@dataclass
class Args:
    train: list = field(default_factory=lambda: ["data/shapes/sft.jsonl", "data/shapes/text.jsonl",
                                                 "data/shapes/captions.jsonl"])  # conversation files
    tokenizer: str = "data/shapes/tokenizer"  # HF tokenizer folder ("" = the one in the --init checkpoint)
    video_root: str = ""  # folder that video paths are relative to ("" = each data file's folder)
    stream_videos: bool = False  # decode each video when its batch needs it, not all up front (large data sets)
    out: str = "runs/tiny/sft"  # run folder: config.json, metrics.jsonl, model/ (the checkpoint)
    init: str = ""  # "" = from scratch; one of our checkpoints; or a HF LLaMA / LLaVA folder
    vision: str = ""  # HF CLIP folder, with a HF --init ("" = a random tiny tower)
    projector: str = ""  # LLaVA mm_projector file or folder, with a HF --init ("" = from --init or random)
    hidden: int = 128  # from-scratch LLM width (tiny default: ~1M parameters, minutes on 2 CPU cores)
    layers: int = 4  # from-scratch LLM depth
    heads: int = 4  # attention heads
    kv_heads: int = 2  # key/value heads (grouped-query attention)
    vision_hidden: int = 64  # from-scratch CLIP width
    vision_layers: int = 3  # from-scratch CLIP depth (the penultimate layer's output is used, SPEC 2)
    image_size: int = 48  # frames are resized to this (the world renders 48x48; CLIP-L/14-336 uses 336)
    patch: int = 12  # ViT patch size: (48 / 12)^2 = 16 spatial tokens
    pooling: str = "mean"  # from scratch: "mean" = SPEC 2's temporal + spatial tokens; "none" = all frames x patches (128: --max_len 448)
    frames: int = 8  # frames sampled per video (SPEC 2: 50 in the reference; the world has 8-16); --init of ours: its own
    lm_text: bool = False  # True: text-only records train on every token (LLM-pretraining style); False: on answers only (the judge reads the description far better: 79% vs 52%, README)
    system: str = "none"  # from scratch: "vicuna" = SPEC 2's system line, "none" = without (halves the tiny model's input; learned faster, measured)
    long_answer_tokens: int = 8  # curriculum: answers longer than this (EOS included) form the second stage
    epochs_text: int = 0  # warm-up passes over the text-only records before the curriculum (0 = SPEC 3 as is; a warm-up made video QA learn far slower, README)
    epochs_short: int = 12  # passes over the short-answer stage (SPEC 3: 1 on 327k examples; ours is 300 clips)
    epochs_long: int = 4  # passes over the long-answer stage
    text_mix: float = 1.0  # short text-only examples mixed in per short video example in the short stage
    replay: float = 1.0  # short-answer examples replayed per long-answer example in the second stage (0 = paper)
    batch_size: int = 16  # examples per step (more, smaller steps escaped the prior plateau sooner)
    group: int = 8  # batches per length-sorted window (HF's group_by_length; 1 = plain shuffle: 57% padding here)
    lr: float = 1e-3  # peak learning rate (SPEC 3: 1e-4 for LoRA on Vicuna; 2e-3 stalled on the prior here)
    warmup: int = 50  # linear warm-up steps, then cosine decay to 10% of lr
    grad_clip: float = 1.0  # max global gradient norm
    lora_r: int = 0  # 0 = train every weight; SPEC 3 uses LoRA r=32 on a real LLM
    lora_alpha: float = 32.0  # LoRA scaling numerator (SPEC 3: alpha = 32)
    freeze_vision: bool = False  # the reference freezes CLIP; a from-scratch tower must learn
    bf16: bool = False  # GPU path: bf16 autocast, frozen weights stored in bf16 (model.for_training)
    compile: bool = False  # GPU path: torch.compile the training forward (on the tiny CPU model it costs more than it saves)
    grad_ckpt: bool = False  # gradient checkpointing: recompute each LLM layer in backward, keep only its input
    max_len: int = 320  # tokens per example (the world's longest: 309); longer: later turns dropped (data.encode)
    save_every: int = 200  # steps between resume checkpoints
    resume: bool = False  # continue from out/resume.pt if present
    seed: int = 0  # data order and initialisation


def resize_vocab(model: M.VideoLLM, vocab_size: int):
    """Grow embeddings (and an untied lm_head) to vocab_size, e.g. after adding <video> and <pad> to a LLaMA
    tokenizer; new rows start at the mean of the old ones, so new tokens begin as an 'average' token."""
    n = model.cfg.llm.vocab_size
    if vocab_size <= n:
        return model
    grow = lambda w: torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - n, -1)])  # (n, D) -> (vocab_size, D)
    model.llm.embed_tokens = torch.nn.Embedding.from_pretrained(grow(model.llm.embed_tokens.weight.data), freeze=False)
    if model.cfg.llm.tie_word_embeddings:
        model.lm_head.weight = model.llm.embed_tokens.weight
    else:
        model.lm_head.weight = torch.nn.Parameter(grow(model.lm_head.weight.data))
        model.lm_head.out_features = vocab_size
    model.cfg.llm.vocab_size = vocab_size
    return model


def build_model(a: Args, tok) -> M.VideoLLM:
    """From scratch, from one of our checkpoints, or from Hugging Face parts (LLaMA + CLIP + projector)."""
    ids = dict(video_token_id=tok.convert_tokens_to_ids(data.VIDEO), pad_token_id=tok.pad_token_id,
               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    if not a.init:
        vision = M.VisionConfig(image_size=a.image_size, patch_size=a.patch, hidden_size=a.vision_hidden,
                                num_layers=a.vision_layers, num_heads=4, intermediate_size=4 * a.vision_hidden)
        llm = M.LLMConfig(vocab_size=len(tok), hidden_size=a.hidden, num_layers=a.layers, num_heads=a.heads,
                          num_kv_heads=a.kv_heads, intermediate_size=(8 * a.hidden // 3 + 7) // 8 * 8,
                          max_position_embeddings=a.max_len)
        system = {"vicuna": None, "none": ""}[a.system]
        return M.VideoLLM(M.VLMConfig(vision=vision, llm=llm, num_frames=a.frames, system=system,
                                         pooling=a.pooling, **ids))
    if "llm" in json.load(open(os.path.join(a.init, "config.json"))):  # one of our checkpoints
        m = M.load_pretrained(a.init, kind="policy")
        if m.cfg.num_frames != a.frames:  # one temporal token per frame: the checkpoint's layout, not a choice here
            raise ValueError(f"--frames {a.frames}, but {a.init} was trained with {m.cfg.num_frames} frames per video: "
                             f"pass --frames {m.cfg.num_frames}")
        data.check_tokenizer(tok, m.cfg, a.tokenizer or a.init)
        return m
    m = M.VideoLLM.from_hf(a.init, a.vision or None, a.projector or None, num_frames=a.frames, **ids)
    return resize_vocab(m, len(tok))  # room for the added <video> / <pad> tokens


def curriculum(answer_lens, text_only, long_answer_tokens, epochs_text, epochs_short, epochs_long, replay,
               text_mix, batch_size, seed, lengths=None, group=1):
    """The whole run as a list of batches (example indices), shuffled within each epoch:
    text    epochs_text passes over the text-only examples: a warm-up that stands in for the pretrained LLM
            the paper starts from (reading a description is learned before looking at videos);
    short   every short-answer video example epochs_short times (SPEC 3: short answers first), each epoch
            with `text_mix` short text-only examples per video one, so the reading skill is kept up;
    long    every long-answer example epochs_long times, each epoch also replaying `replay` short-answer
            examples per long one: a tiny model trained from scratch on long answers alone forgets to stop
            after short ones (measured: short-answer accuracy fell to 0).
    With `lengths` (tokens per example), each window of `group` batches of an epoch is sorted by length
    before it is cut, and the epoch's batches are shuffled: a batch pads to its longest example, and a
    packed 180-token clip beside 40-token text records is mostly padding.
    Fixed by the seed, so a resumed run replays exactly the same order. -> [(stage, [i, ...]), ...]"""
    g = random.Random(seed)
    text = [i for i, t in enumerate(text_only) if t]
    short = [i for i, n in enumerate(answer_lens) if n <= long_answer_tokens and not text_only[i]]
    short_text = [i for i in text if answer_lens[i] <= long_answer_tokens]
    long = [i for i, n in enumerate(answer_lens) if n > long_answer_tokens]
    batches = []
    for stage, epochs in (("text", epochs_text), ("short", epochs_short), ("long", epochs_long)):
        for _ in range(epochs):
            if stage == "long":
                idx = long + g.sample(short, min(len(short), int(replay * len(long))))
            elif stage == "short":
                idx = short + g.sample(short_text, min(len(short_text), int(text_mix * len(short))))
            else:
                idx = text
            perm, n = g.sample(idx, len(idx)), group * batch_size
            if lengths is not None:
                perm = [i for w in range(0, len(perm), n) for i in sorted(perm[w:w + n], key=lengths.__getitem__)]
            epoch = [perm[i:i + batch_size] for i in range(0, len(perm), batch_size)]
            batches += [(stage, b) for b in g.sample(epoch, len(epoch))]
    return batches


def lr_at(step, total, peak, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def sft_loss(model, ids, mask, labels, videos):
    """SUMMED next-token cross-entropy over assistant tokens and EOS (labels != -100, SPEC 2), and their
    number. Logits are computed only where there is a label: prompt and video positions never reach the lm_head."""
    hidden = model(ids, mask, videos)[:, :-1]  # (B, T-1, D): position t predicts token t+1
    targets = labels[:, 1:]  # (B, T-1)
    keep = targets != -100
    return F.cross_entropy(model.logits(hidden[keep]).float(), targets[keep], reduction="sum"), int(keep.sum())


def main(a: Args):
    torch.manual_seed(a.seed)
    rank, world, device = M.init_distributed()  # torchrun: one process per GPU, each on a share of every batch
    tok = data.load_tokenizer(a.tokenizer or a.init)
    model = build_model(a, tok).to(device)
    cfg = model.cfg
    if a.lora_r:
        M.add_lora(model, a.lora_r, a.lora_alpha)  # freezes every other weight
        model.projector.requires_grad_(True)  # LLaVA trains the projector with the LLM's adapters
    model.vision.requires_grad_(not a.freeze_vision)  # with LoRA too: a from-scratch tower must learn
    if a.vision and not a.freeze_vision and rank == 0:
        print(f"sft: the pretrained tower {a.vision} is trained too (SPEC 2 freezes CLIP: --freeze_vision true)")
    M.broadcast_parameters(model)
    forward, autocast = M.for_training(model, device, a.bf16, a.compile, a.grad_ckpt)

    # 1. data: every conversation tokenized once, with its loss mask; every video decoded once (bad input
    # fails here, before anything is written; --stream_videos: each video when its batch needs it)
    examples, videos = [], {}  # videos: path -> (F, 3, H, W), or a function decoding it (--stream_videos)
    max_len = min(a.max_len, cfg.llm.max_position_embeddings)  # longer answers are cut (data.encode)
    for path in a.train:
        records = data.read_conversations(path, a.video_root or None)
        videos.update(data.load_videos(records, cfg.num_frames, cfg.vision.image_size, path, a.stream_videos))
        for r in records:
            try:
                ids, labels = data.encode(tok, r["turns"], cfg.n_video_tokens, max_len, cfg.system)
            except ValueError as e:
                raise ValueError(f"{path}: record {r['id']}: {e}") from None
            # difficulty = the longest answer of the conversation, EOS included: the longest run of labelled
            # tokens (SPEC 3); a multi-turn record of short answers stays in the short stage
            answer_len = max(sum(1 for _ in run) for is_answer, run in groupby(labels, lambda l: l != -100) if is_answer)
            if a.lm_text and r["video"] is None:  # every token carries loss: the LLM pretraining SPEC 2 assumes
                labels = [-100] + ids[1:]
            examples.append({"ids": ids, "labels": labels, "video": r["video"], "answer_len": answer_len})
    if not examples:
        raise ValueError(f"{', '.join(a.train)}: no training records")
    if rank == 0:
        data.start_run(a.out, a, a.resume)

    # 2. curriculum: short answers first, then long answers (SPEC 3)
    batches = curriculum([e["answer_len"] for e in examples], [e["video"] is None for e in examples],
                         a.long_answer_tokens, a.epochs_text, a.epochs_short, a.epochs_long, a.replay,
                         a.text_mix, a.batch_size, a.seed, [len(e["ids"]) for e in examples], a.group)
    n_stage = {s: sum(stage == s for stage, _ in batches) for s in ("text", "short", "long")}
    # the loss of a step is its summed token loss over the stage's mean answer tokens per batch, not over the
    # batch's own count: a length-grouped batch of 16 one-word text answers would otherwise weigh as much as one
    # of 16 packed clips with ~100 answer tokens (measured: the video skills fell, README)
    answer_tokens = [sum(l != -100 for l in e["labels"]) for e in examples]
    per_batch = {s: sum(answer_tokens[i] for stage, b in batches if stage == s for i in b) / max(1, n)
                 for s, n in n_stage.items()}
    if rank == 0:
        print(f"sft: {len(examples)} examples, {len(batches)} steps ({', '.join(f'{n} {s}' for s, n in n_stage.items())}), "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {world} process(es)")
        # short text-only examples are drawn, text_mix per short video example, afresh each epoch: some never are
        if unused := len(examples) - len({i for _, b in batches for i in b}):
            print(f"sft: {unused} of {len(examples)} examples are in no batch of the curriculum (--text_mix draws short "
                  "text-only ones afresh each pass; --epochs_* 0 leaves a stage out)")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, resume_file, metrics_file = 0, os.path.join(a.out, "resume.pt"), os.path.join(a.out, "metrics.jsonl")
    if a.resume and os.path.exists(resume_file):
        state = torch.load(resume_file, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed from {resume_file} at step {step}")
    M.check_same(step, device, "the step to resume from")
    if rank == 0:
        data.trim_log(metrics_file, lambda r: r["step"] <= step)  # steps after the resume point run again

    # 3. train
    model.train()
    bar = tqdm(total=len(batches), initial=step, desc="sft", dynamic_ncols=True, disable=rank > 0)
    t0, n_tokens, stage_loss = time.time(), 0, []
    while step < len(batches):
        stage, idx = batches[step]
        mine = idx[rank::world]  # this rank's share of the batch (all of it in a plain run)
        batch = [examples[i] for i in mine or idx[:1]]  # an empty share: one example at weight 0 (ranks step together)
        ids = data.pad([e["ids"] for e in batch], tok.pad_token_id).to(device)
        labels = data.pad([e["labels"] for e in batch], -100).to(device)
        mask = data.pad([[1] * len(e["ids"]) for e in batch], 0).to(device)
        vids = data.fetch(videos, [str(e["video"]) for e in batch if e["video"]])
        vids = torch.stack(vids).to(device) if vids else None
        for g in opt.param_groups:
            g["lr"] = lr_at(step, len(batches), a.lr, a.warmup)
        with autocast():
            loss_sum, n = sft_loss(forward, ids, mask, labels, vids)
        loss = loss_sum * bool(mine) / per_batch[stage]  # ranks' shares of the batch: their gradients are summed
        n_all, batch_tokens = M.all_sum([n if mine else 0, int(mask.sum()) if mine else 0], device).tolist()
        value = float(M.all_sum(loss_sum.detach() * bool(mine), device)) / max(1, n_all)  # per answer token
        if not math.isfinite(value):
            raise SystemExit(f"sft: non-finite loss at step {step}; the last good state is "
                             f"{resume_file if os.path.exists(resume_file) else 'none (no resume point yet)'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        M.sync_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, a.grad_clip)
        opt.step()
        step += 1
        n_tokens += batch_tokens
        stage_loss.append(value)
        rec = {"step": step, "stage": stage, "loss": round(value, 5), "lr": opt.param_groups[0]["lr"],
               "grad_norm": round(float(grad_norm), 4), "answer_tokens": int(n_all),
               "tokens_per_s": round(n_tokens / (time.time() - t0), 1), "seconds": round(time.time() - t0, 3),
               **M.gpu_peak_gb(device)}
        if rank > 0:
            continue  # logs and checkpoints are rank 0's
        with open(metrics_file, "a") as f:
            f.write(json.dumps(rec) + "\n")
        bar.set_postfix(stage=stage, loss=f"{value:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
        bar.update()
        if step == len(batches) or batches[step][0] != stage:
            bar.write(f"sft: stage {stage} done at step {step}, mean loss of its last 50 steps "
                      f"{sum(stage_loss[-50:]) / len(stage_loss[-50:]):.4f}")
            stage_loss.clear()  # a next stage shorter than 50 steps reports its own losses only
        if step % a.save_every == 0 and step < len(batches):
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, resume_file + ".tmp")
            os.replace(resume_file + ".tmp", resume_file)
    bar.close()
    if rank > 0:
        return

    # 4. save the checkpoint: tokenizer first, model.safetensors, config.json last (= complete)
    final = os.path.join(a.out, "model")
    M.save_checkpoint(model, tok, final, extra_config={"stage": "sft"})
    if os.path.exists(resume_file):
        os.remove(resume_file)
    print(f"sft: saved {final} ({step} steps, {time.time() - t0:.0f}s this session)")


if __name__ == "__main__":
    data.cli(main, Args, __doc__)

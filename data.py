"""Data layer: the synthetic video world, video reading, file formats, tokenizer and chat template.

Shared by every stage. `python data.py --out data/shapes` generates the built-in world: short videos of
coloured shapes that move and appear or leave, with every fact known, split the way the paper's data is
(SPEC section 3): scarce supervised video QA (`sft`), more videos with questions and descriptions but no
answers (`rl`), a held-out `eval` split, and an abundant text-only corpus from scenes never rendered.
"""
import argparse
import inspect
import json
import math
import os
import random
import re
import string
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

# ----------------------------------------------------------------------------- the synthetic world
SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (40, 40, 230), "green": (40, 200, 40), "blue": (230, 80, 30),  # BGR for OpenCV
           "yellow": (30, 220, 230), "white": (235, 235, 235)}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
NUMBERS = ["zero", "one", "two", "three"]
BACKGROUND = (50, 50, 50)
QTYPES = ["colour", "shape", "count", "direction", "order", "exists", "describe"]  # "describe": the long answer
# Several phrasings per type: training sees them all, and the consistency benchmark pairs two of them.
QUESTIONS = {
    "colour": ["What colour is the {shape}?", "Which colour does the {shape} have?"],
    "shape": ["What shape is the {colour} object?", "Which shape does the {colour} object have?"],
    "count": ["How many objects are in the video?", "How many objects appear in the video?"],
    "direction": ["In which direction does the {obj} move?", "Where does the {obj} move to?"],
    "order": ["Which object {event} first, the {a} or the {b}?", "What {event} first: the {a} or the {b}?"],
    "exists": ["Is there a {obj} in the video?", "Does a {obj} appear in the video?"],
    "describe": ["Describe the video in detail.", "What happens in the video? Describe it in detail."],
}


@dataclass
class Obj:
    shape: str
    colour: str
    direction: str
    x: float  # centre at frame 0, pixels
    y: float
    radius: int
    speed: float  # pixels per frame
    appear: int  # first frame the object is visible
    leave: int  # first frame it is gone (== n_frames when it stays)

    @property
    def name(self):
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    id: str
    n_frames: int
    size: int
    objects: list = field(default_factory=list)


def sample_scene(rng, id, size=48, frames=(8, 16), p_event=0.7):
    """1-3 objects with distinct shapes and colours (so 'the circle' names one object), moving or still, never
    overlapping (a hidden object would make the description wrong); p_event: P(an object appears or leaves midway)."""
    n_frames = rng.randint(*frames)
    n_obj = rng.randint(1, 3)
    shapes, colours = rng.sample(SHAPES, n_obj), rng.sample(list(COLOURS), n_obj)
    for attempt in range(10**6):  # rejection sampling until no two objects ever touch
        if attempt % 50 == 0:  # positions first; directions only when they leave no room (less bias)
            directions = [rng.choice(list(DIRECTIONS)) for _ in range(n_obj)]
        objects = []
        for shape, colour, direction in zip(shapes, colours, directions):
            radius = rng.randint(size // 10, size // 7)
            travel = rng.uniform(0.3, 0.45) * size if direction != "still" else 0.0  # visible motion
            dx, dy = DIRECTIONS[direction]
            lo, hi = radius + 1, size - radius - 2
            # choose the start so the object stays inside the frame for the whole clip
            x = rng.uniform(lo - min(dx, 0) * travel, hi - max(dx, 0) * travel)
            y = rng.uniform(lo - min(dy, 0) * travel, hi - max(dy, 0) * travel)
            objects.append(Obj(shape, colour, direction, x, y, radius, travel / (n_frames - 1), 0, n_frames))
        if all(_apart(a, b, n_frames) for i, a in enumerate(objects) for b in objects[i + 1:]):
            break
    if n_obj >= 2 and rng.random() < p_event:
        o, t = rng.choice(objects), rng.randint(n_frames // 3, 2 * n_frames // 3)
        if rng.random() < 0.5:
            o.appear = t
        else:
            o.leave = t
    return Scene(id, n_frames, size, objects)


def _position(o, t):
    dx, dy = DIRECTIONS[o.direction]
    return o.x + dx * o.speed * t, o.y + dy * o.speed * t


def _apart(a, b, n_frames):
    t = np.arange(n_frames)
    return bool((np.hypot(*np.subtract(_position(a, t), _position(b, t))) > 1.2 * (a.radius + b.radius) + 1).all())


def render(scene):
    """Frames (n_frames, size, size, 3) uint8 BGR. Shapes are drawn at 4x and downsampled (anti-aliasing)."""
    s, k = scene.size, 4
    frames = []
    for t in range(scene.n_frames):
        img = np.full((s * k, s * k, 3), BACKGROUND, np.uint8)
        for o in scene.objects:
            if not o.appear <= t < o.leave:
                continue
            (cx, cy), r, c = np.multiply(_position(o, t), k), o.radius * k, COLOURS[o.colour]
            if o.shape == "circle":
                cv2.circle(img, (int(cx), int(cy)), r, c, -1)
            elif o.shape == "square":
                cv2.rectangle(img, (int(cx - r), int(cy - r)), (int(cx + r), int(cy + r)), c, -1)
            elif o.shape == "triangle":
                cv2.fillPoly(img, [np.array([[cx, cy - r], [cx - r, cy + r], [cx + r, cy + r]], np.int32)], c)
            else:  # cross
                w = r // 3
                cv2.rectangle(img, (int(cx - r), int(cy - w)), (int(cx + r), int(cy + w)), c, -1)
                cv2.rectangle(img, (int(cx - w), int(cy - r)), (int(cx + w), int(cy + r)), c, -1)
        frames.append(cv2.resize(img, (s, s), interpolation=cv2.INTER_AREA))
    return np.stack(frames)


def write_video(path, frames, fps=4):
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, frames.shape[2:0:-1])
    for f in frames:
        writer.write(f)
    writer.release()


def describe(scene):
    """The detailed description of a scene: the paper's 'context' (SPEC section 1), in a fixed grammar that
    `description_slots` parses back for slot-level scoring."""
    objs = sorted(scene.objects, key=lambda o: o.appear)
    n = len(objs)
    out = [f"The video shows {NUMBERS[n]} object{'s' if n > 1 else ''}."]
    for o in objs:
        motion = "stays still" if o.direction == "still" else f"moves {o.direction}"
        out.append(f"Later, a {o.name} appears and {motion}." if o.appear > 0 else f"A {o.name} {motion}.")
        if o.leave < scene.n_frames:
            out.append(f"Then the {o.name} leaves.")
    return " ".join(out)


_OBJ = rf"({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"


def description_slots(text):
    """The set of facts a description states: count, objects, their motion, appear/leave events."""
    text, slots = text.lower(), set()
    slots |= {("count", n) for n in re.findall(r"shows (\w+) object", text)}  # each count stated (two contradict)
    for c, s, d in re.findall(_OBJ + r" (?:appears and )?(?:moves (\w+)|stays still)", text):
        slots.add(("motion", f"{c} {s}", d or "still"))
    for slot, pattern in (("object", _OBJ), ("appears", r"a " + _OBJ + r" appears"), ("leaves", _OBJ + r" leaves")):
        slots |= {(slot, f"{c} {s}") for c, s in re.findall(pattern, text)}
    return slots


def normalize(text):
    """SQuAD-style: lowercase, drop punctuation and articles, collapse spaces ("The red circle." == "red circle")."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def slot_f1(pred, truth):
    """F1 between the fact sets two descriptions state: partial credit for a description that gets the
    objects right and one direction wrong, where exact match would give 0."""
    p, t = description_slots(pred), description_slots(truth)
    hits = len(p & t)
    if hits == 0:  # no fact in common (also when a side is empty): 0, unless both are empty
        return float(not p and not t)
    precision, recall = hits / len(p), hits / len(t)
    return 2 * precision * recall / (precision + recall)


def score_answer(qtype, pred, truth):
    """Ground-truth score in [0, 1]: slot F1 for descriptions, exact match after normalisation otherwise.
    For measuring only (eval, the oracle column of make_prefs): never a training signal."""
    return slot_f1(pred, truth) if qtype == "describe" else float(normalize(pred) == normalize(truth))


def questions(scene, rng):
    """Every question the scene answers: list of (type, question, answer, paraphrase)."""
    out = []

    def add(qtype, answer, **slots):
        q1, q2 = QUESTIONS[qtype]
        out.append((qtype, q1.format(**slots), answer, q2.format(**slots)))

    for o in scene.objects:
        add("colour", o.colour, shape=o.shape)
        add("shape", o.shape, colour=o.colour)
        add("direction", o.direction, obj=o.name)
    add("count", NUMBERS[len(scene.objects)])
    for o in scene.objects:  # order: the event object against each other object
        if o.appear > 0 or o.leave < scene.n_frames:
            event, first = ("appears", None) if o.appear > 0 else ("leaves", o)
            for other in scene.objects:
                if other is not o:
                    a, b = rng.sample([o, other], 2)  # mention order random: the prior stays at 50%
                    add("order", f"the {(first or other).name}", event=event, a=a.name, b=b.name)
    present = {o.name for o in scene.objects}
    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if f"{c} {s}" not in present]
    add("exists", "yes", obj=rng.choice(sorted(present)))
    # a hard negative shares a colour or a shape with an object in the scene
    hard = [a for a in absent if any(a.split()[0] == o.colour or a.split()[1] == o.shape for o in scene.objects)]
    add("exists", "no", obj=rng.choice(hard or absent))
    add("describe", describe(scene))
    return out


def perturb(qtype, question, answer, rng):
    """A wrong answer of the same type, like the mistakes a model makes: another colour, direction, count,
    the other object of an order question, or a description with one fact changed."""
    if qtype == "order":
        a, b = (f"the {c} {s}" for c, s in re.findall(_OBJ, question))
        return b if answer == a else a
    if qtype == "describe":  # one fact changed, in the world's own grammar: no slip that gives it away unread
        obj, named = re.search(_OBJ, answer), re.findall(_OBJ, answer)
        used_colours, used_shapes = {c for c, _ in named}, {s for _, s in named}  # each unique in a scene
        colours, shapes = [c for c in COLOURS if c not in used_colours], [s for s in SHAPES if s not in used_shapes]
        moves = [f"moves {d}" for d in DIRECTIONS if d != "still"] + ["stays still"]
        local = random.Random(answer)  # draws of its own: the world's stream (and so every split) stays as it was
        while True:
            kind = rng.choice(["motion", "colour", "count"])
            if kind == "motion":
                wrong = re.sub(r"moves \w+|stays still", rng.choice(moves), answer, count=1)
            elif kind == "colour":  # every mention of the object, and no colour another object has (as in the world)
                c = rng.choice(list(COLOURS))
                c = c if c == obj.group(1) or c in colours else local.choice(colours)
                wrong = answer.replace(obj.group(0), f"{c} {obj.group(2)}")
            else:  # another count, and as many objects: the last ones dropped, or new ones (there from the start)
                n = NUMBERS.index(rng.choice(NUMBERS[1:]))
                _, *sentences = re.findall(r"[^.]+\.", answer)  # the count's sentence, then the objects'
                objects = []  # each object's sentences: its own, then "Then the ... leaves."
                for x in map(str.strip, sentences):
                    if x.startswith("Then"):
                        objects[-1].append(x)
                    else:
                        objects.append([x])
                k = max(0, n - len(objects))
                new = [[f"A {c} {s} {local.choice(moves)}."] for c, s in zip(local.sample(colours, k), local.sample(shapes, k))]
                kept = [x for o in (new + objects)[:n] for x in o]
                wrong = " ".join([f"The video shows {NUMBERS[n]} object{'s' * (n > 1)}."] + kept)
            if wrong != answer:
                return wrong
    pools = {"colour": list(COLOURS), "shape": SHAPES, "direction": list(DIRECTIONS), "count": NUMBERS[1:],
             "exists": ["yes", "no"]}
    return rng.choice([a for a in pools[qtype] if a != answer])


# ----------------------------------------------------------------------------- chat template (SPEC 2)
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
VIDEO = "<video>"
CRITERIA = "Which answer is more accurate, grounded in the video, helpful and concise? Reply with the better answer."


def judge_prompt(question, answer_a, answer_b, context=None):
    """The judging question (SPEC 1: context-aware feedback), without the video placeholder (the conversation
    adds it). Shared by the corpus and make_prefs.py so the judge is asked exactly what it learned to answer."""
    parts = [] if context is None else [f"Description of the video: {context}"]
    parts += [f"Question: {question}", f"Answer A: {answer_a}", f"Answer B: {answer_b}", CRITERIA]
    return "\n".join(parts)


# SPEC 3: the RM reads the conversation followed by an evaluation request and is scored at its last token
RM_PROMPT = "Please evaluate the quality of your last response: is it accurate, grounded in the video, helpful and concise?"


def rm_suffix(tok):
    """Token ids after an answer's EOS in every RM input (rm_input's tail): text answers (train_rm, eval, report)
    and sampled tokens (ppo) reach the RM in exactly one form (SPEC 5)."""
    ids = encode(tok, [("", "a"), (RM_PROMPT, None)], 0, system="")[0]  # encode's own tokenization, behind an EOS
    return ids[ids.index(tok.eos_token_id) + 1:]


def rm_input(tok, question, answer, n_video_tokens, system=None):
    """A reward-model input, scored at its last token (SPEC 3): video + question, answer + EOS, rm_suffix(tok)."""
    return encode(tok, [(f"{VIDEO}\n{question}", answer), (RM_PROMPT, None)], n_video_tokens, system=system)[0]


def encode(tok, turns, n_video_tokens, max_len=None, system=None):
    """Token ids and labels for a Vicuna-v1 conversation [(user, assistant), ...] (assistant None: a generation
    prompt). Labels are -100 except on assistant tokens and their EOS (SPEC 2). The one <video> placeholder becomes
    n_video_tokens copies of the video token, filled in by the model. Too long for max_len: the turns that fit are
    kept whole, or the first answer is cut from its end (without EOS, as LLaVA cuts); a first prompt that does not
    fit is an error. system: None = Vicuna v1's line (SPEC 2), "" = none."""
    ids, labels, ends = [tok.bos_token_id], [-100], []  # ends: length after each answer's EOS
    system = SYSTEM if system is None else system
    text = f"{system} " if system else ""
    for i, (user, assistant) in enumerate(turns):
        user = user.replace("<image>", VIDEO)
        text += f"USER: {user} ASSISTANT:"
        # after an answer, tokenized behind its EOS as one pass over "...</s>USER:" would be: a LLaMA tokenizer
        # may start "USER" without the "▁" it gets at the start of a string (tests/test_data.py)
        after_eos = i > 0 and ids[-1] == tok.eos_token_id
        prompt = tok(tok.eos_token + text if after_eos else text, add_special_tokens=False).input_ids[after_eos:]
        ids, labels, text = ids + prompt, labels + [-100] * len(prompt), ""
        if assistant is not None:
            answer = tok(" " + assistant, add_special_tokens=False).input_ids + [tok.eos_token_id]
            ids, labels = ids + answer, labels + answer
            ends.append(len(ids))
    vid = tok.convert_tokens_to_ids(VIDEO)
    if (n_placeholders := ids.count(vid)) > 1:
        raise ValueError(f"expected at most one {VIDEO} placeholder per conversation, found {n_placeholders}")
    if n_placeholders:
        i = ids.index(vid)
        ids = ids[:i] + [vid] * n_video_tokens + ids[i + 1:]
        labels = labels[:i] + [-100] * n_video_tokens + labels[i + 1:]
        ends = [e + n_video_tokens - 1 if e > i else e for e in ends]
    if max_len is not None and len(ids) > max_len:
        if fit := [e for e in ends if e <= max_len]:  # whole turns: the later ones are dropped, no turn is cut
            return ids[:fit[-1]], labels[:fit[-1]]
        prompt_len = next((i for i, l in enumerate(labels) if l != -100), len(ids))
        if prompt_len >= max_len:
            raise ValueError(f"prompt of {prompt_len} tokens does not fit max_len={max_len}")
        ids, labels = ids[:max_len], labels[:max_len]  # no EOS: a cut answer must not teach stopping mid-sentence
    return ids, labels


def pad(seqs, value, left=False):
    """(B, T) tensor of lists padded to the longest; left padding for generation prompts (SPEC 5)."""
    T = max(len(s) for s in seqs)
    rows = [[value] * (T - len(s)) + s if left else s + [value] * (T - len(s)) for s in seqs]
    return torch.tensor(rows, dtype=torch.long)


def train_tokenizer(texts, out_dir, vocab_size=512):
    """Byte-level BPE trained on the world's text, saved as a Hugging Face tokenizer folder. PAD differs
    from EOS (SPEC 5: otherwise EOS is masked out of the loss and the model never learns to stop)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<unk>", "<s>", "</s>", "<pad>", VIDEO]  # ids 0-4, matching model.VLMConfig defaults
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", additional_special_tokens=[VIDEO])
    tok.save_pretrained(out_dir)
    return tok


def load_tokenizer(path):
    """Any local Hugging Face tokenizer folder; adds <video> and a PAD distinct from EOS when missing
    (a LLaMA tokenizer has neither), so callers must size embeddings with len(tok)."""
    from transformers import AutoTokenizer
    if not Path(path, "tokenizer_config.json").exists() and not Path(path, "tokenizer.json").exists():
        raise FileNotFoundError(f"{path}: no tokenizer files (tokenizer.json / tokenizer_config.json)")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        tok.add_special_tokens({"pad_token": "<pad>"})
    if VIDEO not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [VIDEO]})
    return tok


def check_tokenizer(tok, cfg, path):
    """A tokenizer must match the checkpoint it is used with (cfg: its model.VLMConfig): prompts built with
    other special ids would splice the video at the wrong tokens and never stop."""
    ids_tok = (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids(VIDEO))
    ids_cfg = (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id, cfg.video_token_id)
    if ids_tok != ids_cfg or len(tok) > cfg.llm.vocab_size:
        raise ValueError(f"{path}: tokenizer (bos, eos, pad, video) = {ids_tok}, {len(tok)} tokens does not match "
                         f"the model's {ids_cfg}, vocab {cfg.llm.vocab_size}")


# ----------------------------------------------------------------------------- videos
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def _read_frames(path, num_frames, span=(0.0, 1.0)):
    """num_frames RGB uint8 frames sampled uniformly from a video file, a folder of frame images or a list of
    frame files (the reference code's layout), within `span` (fractions of the video: a clip)."""
    if isinstance(path, (list, tuple)):
        files = [Path(f) for f in path]
        path = files[0].parent if files else Path("<empty frame list>")
    else:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: video not found")
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS) if path.is_dir() else None
    if files is not None:
        if not files:
            raise ValueError(f"{path}: frame folder has no images ({', '.join(IMAGE_EXTS)})")
        idx = _uniform(len(files), num_frames, span)
        frames = [cv2.imread(str(files[i])) for i in idx]
        if bad := [str(files[i]) for i, f in zip(idx, frames) if f is None]:
            raise ValueError(f"{bad[0]}: unreadable image")
    else:  # only the sampled frames are kept (a 2-minute 720p video is ~10 GB decoded), picked by the header's
        # frame count; when that count is wrong (headers often are), a second pass picks them by the true one
        kept, n, guess = _grab(path, num_frames, span)
        if n and n != guess:
            kept, n, _ = _grab(path, num_frames, span, n)
        if not n:
            raise ValueError(f"{path}: unreadable or zero-frame video")
        frames = [kept[i] for i in _uniform(n, num_frames, span)]
    return [cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames]


def _uniform(n, k, span):
    """k frame indices spread evenly over frames [span[0] * n, span[1] * n) of an n-frame video."""
    first, last = int(span[0] * n), max(int(span[0] * n), math.ceil(span[1] * n) - 1)
    return np.linspace(first, min(last, n - 1), k).round().astype(int)


def _grab(path, num_frames, span, n=None):
    """One pass over a video file: {i: BGR frame} at the indices _uniform picks for n frames (None: the header's
    count), the number of frames the file really has, and the n used."""
    cap, kept, count = cv2.VideoCapture(str(path)), {}, 0
    n = n or int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    want = set(_uniform(n, num_frames, span).tolist()) if n > 0 else set()
    while cap.grab():
        if count in want:
            ok, kept[count] = cap.retrieve()
            if not ok:  # a frame that demuxes but does not decode: the stage's one-line error, not a cv2 crash
                raise ValueError(f"{path}: frame {count} unreadable")
        count += 1
    cap.release()
    return kept, count, n


def load_videos(records, num_frames, size, source, stream=False):
    """{str(video): (F, 3, H, W)}, each video decoded once, up front: a corrupt one fails before a stage writes
    anything. stream=True, for a data set too large to hold (68 MB a 50-frame 336-px video): each entry decodes
    its video when a batch fetches it, and fails there. (A missing file failed earlier, when records were read.)"""
    out = {}
    for r in records:
        if r.get("video") is not None and str(r["video"]) not in out:
            decode = partial(_decode, r["video"], num_frames, size, f"{source}: record {r.get('id')}")
            out[str(r["video"])] = decode if stream else decode()
    return out


def _decode(video, num_frames, size, where):
    try:
        return load_video(video, num_frames, size)
    except (OSError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


def fetch(videos, keys):  # a batch's videos from load_videos' dict; a streamed one decoded once per batch
    got = {k: videos[k]() if callable(videos[k]) else videos[k] for k in dict.fromkeys(keys)}
    return [got[k] for k in keys]


def load_video(path, num_frames=8, size=32, span=(0.0, 1.0)):
    """(num_frames, 3, size, size) float tensor: frames sampled uniformly (within span, for a clip), padded to
    square with the CLIP mean colour (as the reference does), resized and normalised with CLIP mean/std."""
    mean, std = np.array(CLIP_MEAN, np.float32), np.array(CLIP_STD, np.float32)
    out = []
    for f in _read_frames(path, num_frames, span):
        h, w = f.shape[:2]
        s = max(h, w)
        sq = np.full((s, s, 3), (mean * 255).round(), np.uint8)
        sq[(s - h) // 2:(s - h) // 2 + h, (s - w) // 2:(s - w) // 2 + w] = f
        f = cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_CUBIC)
        out.append((f.astype(np.float32) / 255 - mean) / std)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- file formats (SPEC 4)
def read_records(path):
    """A JSON list or a JSONL file -> [(where, dict)] for errors written f"{path}:{where}: ...": the line in a
    JSONL file, "LINE (record I)" in a JSON list (a LLaVA list may hold 100k records on one line)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: file not found")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        numbered, pos, line, decoder, gap = [], text.index("[") + 1, 1, json.JSONDecoder(), re.compile(r"[\s,]*")
        for r in items:  # walk the valid text once more, item by item, counting newlines on the way
            start = gap.match(text, pos).end()
            line += text.count("\n", pos, start)
            numbered.append((f"{line} (record {len(numbered) + 1})", r))
            pos = decoder.raw_decode(text, start)[1]
            line += text.count("\n", start, pos)
    else:
        numbered = []
        for n, row in enumerate(text.splitlines(), 1):
            try:
                numbered += [(n, json.loads(row))] if row.strip() else []
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg}); expected one JSON object per line") from None
    if bad := next(((n, r) for n, r in numbered if not isinstance(r, dict)), None):
        raise ValueError(f"{path}:{bad[0]}: expected a JSON object, got {type(bad[1]).__name__}")
    return numbered


def _need(path, n, r, keys, what):
    if missing := [k for k in keys if k not in r or r[k] is None]:
        raise ValueError(f"{path}:{n}: {what} record lacks {', '.join(map(repr, missing))}; has {sorted(r)}")


def _video_path(r, path, n, video_root=None):
    """`video` (a file or a frame folder) or the reference's `images` (a list of frame files), under video_root
    (default: the data file's folder); checked here, so a stage fails on a missing video before it writes."""
    root = video_root or Path(path).parent
    v = r.get("video") or r.get("images")
    if v is None:
        return None
    v = [str(Path(root, f)) for f in v] if isinstance(v, list) else str(Path(root, v))
    if missing := next((f for f in (v if isinstance(v, list) else [v]) if not os.path.exists(f)), None):
        raise FileNotFoundError(f"{path}:{n}: video {missing} not found (video paths are relative to {root})")
    return v


def read_conversations(path, video_root=None, check_videos=True):
    """LLaVA-style records {id, video|images, conversations: [{from: human|gpt, value}, ...]} ->
    dicts {id, video (path or None), turns: [(user, assistant), ...], type, ...extra fields}.
    check_videos=False: answers only (eval's prior), video paths kept as written and not looked for."""
    out = []
    for i, (n, r) in enumerate(read_records(path)):
        _need(path, n, r, ["conversations"], "conversation")
        conv = r["conversations"]
        roles = [c.get("from") for c in conv] if isinstance(conv, list) else None
        if not roles or len(roles) % 2 or roles != ["human", "gpt"] * (len(roles) // 2):
            raise ValueError(f"{path}:{n}: expected conversations alternating human/gpt turns, got {roles}")
        if any(not isinstance(c.get("value"), str) or not c["value"].strip() for c in conv):
            raise ValueError(f"{path}:{n}: every turn needs a non-empty string 'value'")
        turns = [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
        video = _video_path(r, path, n, video_root) if check_videos else r.get("video") or r.get("images")
        has_tag = any(t in turns[0][0] for t in (VIDEO, "<image>"))
        if video and not has_tag:  # LLaVA puts the placeholder in the first human turn; add it if absent
            turns[0] = (f"{VIDEO}\n{turns[0][0]}", turns[0][1])
        elif has_tag and not video:
            raise ValueError(f"{path}:{n}: turn has a {VIDEO} placeholder but the record has no 'video'")
        extra = {k: v for k, v in r.items() if k not in ("conversations", "video", "images")}
        out.append({**extra, "id": r.get("id", f"{Path(path).stem}-{i}"), "video": video, "turns": turns})
    return out


def read_prompts(path, video_root=None):
    """RL prompts, no answers: ours {id, video|images, question, [description]} or the reference's PPO file
    {uid, images|video, conversations: [{from: human, value: question}, ...]} -> ours."""
    out = []
    for n, r in read_records(path):
        conv = r.get("conversations") or []
        conv = conv[0] if conv and isinstance(conv[0], list) else conv  # wrapped in a list, as the reference allows
        human = [c["value"] for c in conv if isinstance(c, dict) and c.get("from") == "human" and isinstance(c.get("value"), str)]
        need = {"id": r.get("id", r.get("uid")), "video": r.get("video") or r.get("images"),
                "question": r.get("question") or (question_text(human[0]) if human else None)}
        if missing := [k for k, v in need.items() if v is None]:
            raise ValueError(f"{path}:{n}: prompt record lacks {', '.join(map(repr, missing))} (the reference's: uid, "
                             f"images, a human turn); has {sorted(r)}")
        out.append({**r, **need, "video": _video_path(r, path, n, video_root)})
    return out


def plain_text(text):
    """Model-written text (a sampled answer, a clip description) made safe to place in a prompt: a sampled
    "<video>" or "<image>" would be a second video slot, which data.encode refuses."""
    return text.replace(VIDEO, "video").replace("<image>", "image")


def question_text(user):
    """A first user turn without its video placeholder (ours or the reference's <image>): the question alone."""
    return user.replace(VIDEO, "").replace("<image>", "").strip()


def read_prefs(path, video_root=None):
    """Preference pairs: our fields {id, video, question, answer_1, answer_2, preference} or the reference's
    {conversations (also wrapped in a list), output_1: {value}, output_2: {value}, preference: 1|2}, whose
    records have no id (one is made from the file name and place, as for conversations). -> our fields."""
    out = []
    for i, (n, r) in enumerate(read_records(path)):
        if "output_1" in r:  # reference layout
            _need(path, n, r, ["conversations", "output_2", "preference"], "reference preference")
            conv = r["conversations"][0] if isinstance(r["conversations"][0], list) else r["conversations"]
            r = {"id": f"{Path(path).stem}-{i}", **r, "question": question_text(conv[0]["value"]),
                 "answer_1": r["output_1"]["value"], "answer_2": r["output_2"]["value"]}
        _need(path, n, r, ["question", "answer_1", "answer_2", "preference"], "preference")
        if r["preference"] not in (1, 2):
            raise ValueError(f"{path}:{n}: preference must be 1 or 2, got {r['preference']!r}")
        if r.get("video") is None and not r.get("images"):
            raise ValueError(f"{path}:{n}: preference record lacks 'video' (or 'images'); has {sorted(r)}")
        out.append({**r, "video": _video_path(r, path, n, video_root)})
    return out


def read_benchmark(path):
    """Video-ChatGPT benchmark (generic/temporal: Q, A, video_name; consistency: Q1, Q2, A, video_name) or
    zero-shot QA (video_name, question_id, question, answer) -> list of dicts as in the file."""
    out = []
    for n, r in read_records(path):
        if "Q1" in r:
            _need(path, n, r, ["Q1", "Q2", "A", "video_name"], "consistency QA")
        elif "Q" in r:
            _need(path, n, r, ["Q", "A", "video_name"], "Video-ChatGPT QA")
        else:
            _need(path, n, r, ["video_name", "question_id", "question", "answer"], "zero-shot QA")
        out.append(r)
    return out


# ----------------------------------------------------------------------------- world generation
@dataclass
class WorldArgs:
    out: str = "data/shapes"  # output folder
    seed: int = 0  # everything below is a deterministic function of the seed
    n_sft: int = 300  # videos with answers: scarce, as in the paper (SPEC 3)
    n_rl: int = 1200  # videos with questions and descriptions, no answers (the RLAIF prompts)
    n_eval: int = 300  # held-out videos with answers
    n_text: int = 4000  # scenes never rendered: the text-only corpus (language and judging skills)
    n_captions: int = 3000  # clips with only their description: the stand-in for the paper's caption pre-training (README)
    size: int = 48  # frame width and height, pixels (48: room for 3 moving objects that never touch)
    min_frames: int = 8
    max_frames: int = 16
    rl_questions: int = 2  # questions sampled per rl video
    vocab_size: int = 512


def write_atomic(path, text):
    """Write under a temporary name, then rename: a crash never leaves a torn file (every stage uses this)."""
    Path(f"{path}.tmp").write_text(text)
    os.replace(f"{path}.tmp", path)


def write_jsonl(path, rows):
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def _conv(id, video, turns, **extra):
    """A LLaVA record of several (question, answer) turns; the video placeholder opens the first question."""
    conv = []
    for i, (q, a) in enumerate(turns):
        conv += [{"from": "human", "value": f"{VIDEO}\n{q}" if video and i == 0 else q}, {"from": "gpt", "value": a}]
    return {"id": id, **({"video": video} if video else {}), "conversations": conv, **extra}


def _judge_example(id, rng, qa, context, video):
    """Compare a correct and a perturbed answer; the correct one is A or B equally often (no position
    shortcut). Labels come from the scene's own truth: sft and text scenes only, never rl or eval."""
    t, q, ans, _ = qa
    wrong = perturb(t, q, ans, rng)
    first = rng.random() < 0.5
    prompt = judge_prompt(q, *((ans, wrong) if first else (wrong, ans)), context=context)
    # the judge replies with the better answer itself, not its letter: make_prefs.py reads the verdict from
    # the judge's likelihood of each answer (the letter was at chance after 1,000 steps; EXPERIMENTS.md)
    return _conv(id, video, [(prompt, ans)], type="judge" if context else "judge_nocontext")


def generate_world(a: WorldArgs):
    rng = random.Random(a.seed)
    out = Path(a.out)
    for folder in ("videos", "truth", "benchmark"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    rows = {k: [] for k in ("sft", "rl", "eval", "text", "captions", "scenes", "rl_answers")}
    bench = {"generic_qa": [], "temporal_qa": [], "consistency_qa": [], "zeroshot_qa": []}
    frames = (a.min_frames, a.max_frames)
    for split, n in (("sft", a.n_sft), ("rl", a.n_rl), ("eval", a.n_eval)):
        for i in range(n):
            scene = sample_scene(rng, f"{split}_{i:05d}", a.size, frames)
            video = f"videos/{scene.id}.mp4"
            write_video(out / video, render(scene))
            rows["scenes"].append({**asdict(scene), "split": split, "description": describe(scene)})
            qa = questions(scene, rng)
            if split == "sft":  # every question as supervised video QA, and judging with the video in view
                # the short questions of a clip form one multi-turn conversation in random order, as in LLaVA's
                # and Video-ChatGPT's data: one pass over the video trains ~11 answers (measured: colour 63%
                # after 300 steps packed vs 34% after 400 single-question steps); the description stands alone
                short = rng.sample([x for x in qa if x[0] != "describe"], len(qa) - 1)
                rows["sft"].append(_conv(f"{scene.id}-qa", video, [(q, ans) for _, q, ans, _ in short],
                                         type="qa", types=[t for t, *_ in short]))
                rows["sft"] += [_conv(f"{scene.id}-describe", video, [(q, ans)], type=t) for t, q, ans, _ in qa if t == "describe"]
                for context in (describe(scene), None):
                    rows["sft"].append(_judge_example(f"{scene.id}-judge{'' if context else '_nocontext'}", rng,
                                                      rng.choice(qa), context, video))
            elif split == "rl":  # questions and the description only; answers kept apart for measuring
                for j, (t, q, ans, _) in enumerate(rng.sample(qa, min(a.rl_questions, len(qa)))):
                    rows["rl"].append({"id": f"{scene.id}-{j}", "video": video, "question": q, "type": t,
                                       "description": describe(scene)})
                    rows["rl_answers"].append({"id": f"{scene.id}-{j}", "answer": ans, "type": t})
            else:  # one question per type the scene has
                for t in dict.fromkeys(t for t, *_ in qa):
                    t, q, ans, q2 = rng.choice([x for x in qa if x[0] == t])
                    qid = f"{scene.id}-{t}"
                    rows["eval"].append(_conv(qid, video, [(q, ans)], type=t))
                    name = Path(video).name
                    bench["temporal_qa" if t in ("direction", "order") else "generic_qa"].append(
                        {"Q": q, "A": ans, "video_name": name, "type": t})
                    bench["consistency_qa"].append({"Q1": q, "Q2": q2, "A": ans, "video_name": name, "type": t})
                    if t != "describe":
                        bench["zeroshot_qa"].append({"video_name": name, "question_id": qid, "question": q,
                                                     "answer": ans, "type": t})
    for i in range(a.n_text):  # abundant text: read a description; judge two answers against it
        scene = sample_scene(rng, f"text_{i:05d}", a.size, frames)
        ctx, qa = describe(scene), questions(scene, rng)
        t, q, ans, _ = rng.choice(qa)
        rows["text"].append(_conv(f"{scene.id}-read", None, [(f"Description of the video: {ctx}\n{q}", ans)],
                                  type=f"read_{t}"))
        rows["text"].append(_judge_example(f"{scene.id}-judge", rng, rng.choice(qa), ctx, None))
    for i in range(a.n_captions):  # drawn last: no split above depends on n_captions (tested)
        scene = sample_scene(rng, f"caption_{i:05d}", a.size, frames)
        write_video(out / f"videos/{scene.id}.mp4", render(scene))
        rows["captions"].append(_conv(f"{scene.id}-describe", f"videos/{scene.id}.mp4",
                                      [(QUESTIONS["describe"][0], describe(scene))], type="describe"))
    for k, v in rows.items():  # the scenes and the rl answers are the truth, kept apart from the splits
        write_jsonl(out / ("truth" if k in ("scenes", "rl_answers") else "") / f"{k}.jsonl", v)
    for k, v in bench.items():
        write_atomic(out / "benchmark" / f"{k}.json", json.dumps(v, indent=1))
    # the fixed template text is weighted as often as it is used, so BPE learns its words whole
    texts = [SYSTEM, CRITERIA, RM_PROMPT, "USER: ASSISTANT:", judge_prompt("q", "a", "b", "c")] * 1000
    texts += [r["description"] for r in rows["scenes"]]
    for k in ("sft", "eval", "text"):
        texts += [c["value"] for r in rows[k] for c in r["conversations"]]
    texts += [r["question"] for r in rows["rl"]]
    train_tokenizer(texts, out / "tokenizer", a.vocab_size)
    counts = {k: len(v) for k, v in rows.items()}
    write_atomic(out / "world.json", json.dumps({**asdict(a), **counts}, indent=1))  # written last: complete
    return counts


def parse_args(cls, argv=None, description=None):
    """Command line -> the dataclass `cls`: one --flag per field, its comment as help; lists take several
    values, booleans take true/false."""
    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.*)$", inspect.getsource(cls), re.M))
    p = argparse.ArgumentParser(description=(description or cls.__doc__ or "").replace("%", "%%"),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()
        kind = dict(nargs="*", type=type(default[0]) if default else str) if isinstance(default, list) else \
            dict(type=lambda s: s.lower() in ("1", "true", "yes")) if isinstance(default, bool) else dict(type=type(default))
        help = comments.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        p.add_argument(f"--{f.name}", default=default, help=help, **kind)
    return cls(**vars(p.parse_args(argv)))


# ----------------------------------------------------------------------------- run folders and the command line
def read_log(path, keep=lambda r: True):
    """The complete JSON lines of an append-only log (a torn last line, left by a killed run, is skipped)."""
    if not os.path.exists(path):
        return []
    return [r for line in open(path) if line.endswith("\n") and keep(r := json.loads(line))]


def trim_log(path, keep):
    """Rewrite a log with only the lines `keep` accepts, atomically: on resume, the lines written after the
    resume point are dropped (they are written again), and a fresh run starts from an empty log."""
    write_jsonl(path, read_log(path, keep))


def start_run(out, args, resume):
    """Create the run folder and write config.json (the arguments). Stages call this once their inputs are
    checked, so bad input leaves no output. A resumed run must use the arguments of the run it continues."""
    # where the run writes, on which device, and how it reads its videos may change; not what it computes
    free = ("resume", "device", "out", "stream_videos")
    out, same = Path(out), lambda d: {k: v for k, v in d.items() if k not in free}
    if resume and (out / "config.json").exists():
        old, new = same(json.loads((out / "config.json").read_text())), same(asdict(args))
        if diff := {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}:
            raise ValueError(f"{out}: the run there used other arguments {diff} (old, new); resume with the same "
                             "ones or use another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not resume:  # a fresh run: an earlier run's resume point here must never be continued by a later --resume
        (out / "resume.pt").unlink(missing_ok=True)
    write_atomic(out / "config.json", json.dumps(asdict(args), indent=1))


def cli(main, cls, description=None, argv=None):
    """A stage's command line: parse the arguments, run main. Bad input (ValueError or OSError: a malformed or
    missing file, a wrong checkpoint, a full disk) exits with status 1 and ONE line `<stage>: error: <what, where>`."""
    args = parse_args(cls, argv, description)
    try:
        out = main(args)
    except (ValueError, OSError) as e:
        stage = Path(sys.modules[main.__module__].__file__).stem
        raise SystemExit(f"{stage}: error: {' '.join(str(e).split())}") from None
    if torch.distributed.is_initialized():  # under torchrun: no rank tears its process group down while
        torch.distributed.barrier()  # another still uses it (gloo then aborted a rank at exit, 2 runs in 7)
    return out


if __name__ == "__main__":
    counts = generate_world(parse_args(WorldArgs, description="Generate the synthetic video world."))
    print("world:", ", ".join(f"{k} {v}" for k, v in counts.items()))

#!/usr/bin/env bash
# Issue 7's GPU measurements in ONE command, sized for a 15-minute device lease (README, "The GPU path"):
#   bash gpu_check.sh OUT             # on a CUDA machine; PY=python3 unless set
#   MINI=1 bash gpu_check.sh OUT      # the same steps at a toy size on CPU (tests/test_gpu_check.py runs this)
# 1. a ~1B-parameter model (TinyLlama-1.1B's LLM shape: width 2048, 22 layers, 32 query / 4 key-value heads) from
#    scratch on tiny-world data, a few steps of every stage (bf16; make_prefs has no bf16): sft (full fine-tune), make_prefs, train_rm,
#    ppo, then sft with SPEC 3's LoRA recipe (r=32, tower frozen, gradient checkpointing). Each stage's
#    metrics.jsonl holds its tokens/s, seconds and peak GPU memory.
# 2. the 1B full fine-tune again under torch.compile.
# 3. the tiny default pipeline (make reproduce) on the GPU, in the time left; its stages' seconds.
# Everything stops by BUDGET seconds (default 540). OUT/summary.txt: one line per measurement; logs in OUT/logs.
set -uo pipefail
OUT=${1:?usage: bash gpu_check.sh OUT}
PY=${PY:-python3}
WORLD=${WORLD:-data/shapes}
DEADLINE=$(( $(date +%s) + ${BUDGET:-540} ))
mkdir -p "$OUT/logs"
command -v make > /dev/null || PATH="$PATH:$PWD/.bin"  # an image without make: carry one in .bin (README)
if [ "${MINI:-0}" = 1 ]; then  # toy size: checks the commands, not the speed
    BIG="--hidden 32 --layers 2 --heads 4 --kv_heads 2 --vision_hidden 32 --vision_layers 2"; N_SFT=8; N_RL=4; ITERS=2; ROLL=4
    TINY_ARGS=("SFT_ARGS=--epochs_short 1 --epochs_long 1" "PPO_ARGS=--iterations 2" "EVAL_ARGS=--best_of 2")
else
    BIG="--hidden 2048 --layers 22 --heads 32 --kv_heads 4 --vision_hidden 256 --vision_layers 4"; N_SFT=256; N_RL=64; ITERS=3; ROLL=32; TINY_ARGS=()
fi

# step NAME SECONDS COMMAND...: run COMMAND with at most SECONDS (and never past the deadline); log and status kept
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( DEADLINE - $(date +%s) ))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -le 10 ]; then echo "$name: skipped (no time left)" | tee -a "$OUT/status.txt"; return 1; fi
    local t0=$(date +%s)
    timeout "$limit" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(( $(date +%s) - t0 )) s" | tee -a "$OUT/status.txt"
    return $rc
}

: > "$OUT/status.txt"
$PY -c "import torch; print('torch', torch.__version__, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" \
    | tee "$OUT/machine.txt"
[ -f "$WORLD/world.json" ] || step world 120 $PY data.py --out "$WORLD"
head -n "$N_SFT" "$WORLD/sft.jsonl" > "$OUT/sft_part.jsonl"  # video paths stay relative to $WORLD: --video_root

# 1. the ~1B model through every stage
step sft_1b 150 $PY sft.py $BIG --train "$OUT/sft_part.jsonl" --video_root "$WORLD" --tokenizer "$WORLD/tokenizer" \
    --epochs_short 1 --epochs_long 1 --lr 1e-4 --bf16 true --out "$OUT/sft_1b" &&
# answers of at most 24 tokens: the barely trained model rarely stops, and two 64-token answers with the context
# may not fit its 320-position window (4 of 64 judging turns did not, in the first H100 run)
step prefs_1b 90 $PY make_prefs.py --prompts "$WORLD/rl.jsonl" --limit "$N_RL" --k 2 --sft "$OUT/sft_1b/model" \
    --max_new_tokens 24 --out "$OUT/prefs_1b" &&
step rm_1b 90 $PY train_rm.py --prefs "$OUT/prefs_1b/prefs.jsonl" --sft "$OUT/sft_1b/model" --min_confidence 0.5 \
    --epochs 1 --batch_size 8 --bf16 true --out "$OUT/rm_1b" &&
step ppo_1b 150 $PY ppo.py --prompts "$WORLD/rl.jsonl" --sft "$OUT/sft_1b/model" --rm "$OUT/rm_1b/model" \
    --iterations "$ITERS" --rollout_batch "$ROLL" --minibatch $(( ROLL / 2 )) --bf16 true --out "$OUT/ppo_1b"
step sft_1b_lora 120 $PY sft.py $BIG --train "$OUT/sft_part.jsonl" --video_root "$WORLD" --tokenizer "$WORLD/tokenizer" \
    --epochs_short 1 --epochs_long 1 --lr 1e-4 --lora_r 32 --freeze_vision true --bf16 true --grad_ckpt true \
    --out "$OUT/sft_1b_lora"
rm -rf "$OUT"/*_1b*/model  # 4-GB checkpoints: not needed past this point

# 2. torch.compile on the 1B full fine-tune (compiles again as batch shapes change; a minute even at the toy size)
[ "${MINI:-0}" = 1 ] || step sft_1b_compile 240 $PY sft.py $BIG --train "$OUT/sft_part.jsonl" --video_root "$WORLD" \
    --tokenizer "$WORLD/tokenizer" --epochs_short 1 --epochs_long 1 --lr 1e-4 --bf16 true --compile true \
    --out "$OUT/sft_1b_compile"
rm -rf "$OUT"/sft_1b_compile/model

# 3. the tiny default pipeline, in the time left: it took about 500 s on an H100 (README), more than one lease
# holds after step 1; make skips finished stages, so a second call of the same make command continues it
step tiny_pipeline 480 make PY="$PY" RUN="$OUT/tiny" WORLD="$WORLD" "${TINY_ARGS[@]}" "$OUT/tiny/results.json"

# summary: the steps after the first (warm-up) of each run
ROLL=$ROLL $PY - "$OUT" > "$OUT/summary.txt" <<'EOF'
import json, os, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def log(path):
    return [json.loads(line) for line in open(path)] if path.exists() else []
print(open(out / "machine.txt").read().strip())
if (out / "logs" / "sft_1b.log").exists():
    print("1B configuration: " + " ".join(re.findall(r"[\d.]+M parameters", (out / "logs" / "sft_1b.log").read_text())[:1]))
def peak(m):  # the largest gpu_peak_gb of a run's lines (an RM's held-out lines carry none); n/a on CPU
    return max((f"{r['gpu_peak_gb']:.1f}" for r in m if "gpu_peak_gb" in r), key=float, default="n/a")
def pct(x):  # a fraction as a percentage; n/a where there was nothing to measure (no oracle verdicts)
    return "n/a" if x is None else f"{100 * x:.1f}%"
for run in ("sft_1b", "sft_1b_lora", "sft_1b_compile"):
    m = log(out / run / "metrics.jsonl")
    if len(m) > 1:  # tokens/s = tokens_per_s * seconds is the running count of real (unpadded) tokens
        tok = (m[-1]["tokens_per_s"] * m[-1]["seconds"] - m[0]["tokens_per_s"] * m[0]["seconds"]) / (m[-1]["seconds"] - m[0]["seconds"])
        print(f"{run}: {len(m)} steps, {tok:.0f} tokens/s after step 1, peak GPU memory {peak(m)} GB")
m = [r for r in log(out / "rm_1b" / "metrics.jsonl") if "loss" in r]
if m:
    print(f"rm_1b: {len(m)} steps, peak GPU memory {peak(m)} GB")
m = log(out / "prefs_1b" / "metrics.jsonl")
if m:
    print(f"prefs_1b: {sum(r['n_prompts'] for r in m)} prompts in {sum(r['seconds'] for r in m):.1f} s")
m = log(out / "ppo_1b" / "metrics.jsonl")[1:]
if m:
    gen = sum(int(os.environ["ROLL"]) * r["answer_len"] for r in m) / sum(r["rollout_seconds"] for r in m)
    print(f"ppo_1b: {sum(r['seconds'] for r in m) / len(m):.1f} s per iteration after the first "
          f"(rollout {sum(r['rollout_seconds'] for r in m) / len(m):.1f} s: {gen:.0f} answer tokens/s), "
          f"peak GPU memory {peak(m)} GB")
seconds = {p.stem: float(p.read_text()) for p in sorted((out / "tiny" / "seconds").glob("*.s"))}
if seconds:
    print("tiny pipeline seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
prefs = {c: json.load(open(p)) for c in ("gt", "self", "none") if (p := out / "tiny" / f"prefs_{c}" / "summary.json").exists()}
if prefs:
    print("tiny pipeline judge agreement with the oracle: " + ", ".join(f"{c} {pct(s.get('agreement'))}" for c, s in prefs.items()))
if (out / "tiny" / "rm" / "summary.json").exists():
    s = json.load(open(out / "tiny" / "rm" / "summary.json"))
    print(f"tiny pipeline RM held out: {pct(s['heldout_acc'])} of the judge's labels")
if (out / "tiny" / "eval" / "results.json").exists():  # eval's own file: there before the report is written
    models = json.load(open(out / "tiny" / "eval" / "results.json"))["models"]
    print("tiny pipeline accuracy: " + ", ".join(f"{k} {100 * v['accuracy']:.1f}%" for k, v in models.items()))
print(open(out / "status.txt").read().strip())
EOF
cat "$OUT/summary.txt"
! grep -v ": exit 0 after" "$OUT/status.txt" > /dev/null  # exit status 0 only if every step ran and succeeded

# make test       create .venv (first time), install requirements, run the test suite
# make reproduce  the whole pipeline on the synthetic world: world -> SFT -> preferences (judged with each
#                 context: none, self, gt) -> RM -> PPO -> eval -> runs/tiny/report.html + runs/tiny/results.json
#                 (incremental: a stage whose output exists is skipped, an interrupted one resumes;
#                 CONTEXT=gt|self|none picks whose preferences train the RM; gt by default, README;
#                 RUN=runs/x WORLD=data/y put the run and the world elsewhere: every stage is given both;
#                 SFT_ARGS, PREFS_ARGS, RM_ARGS, PPO_ARGS, EVAL_ARGS="--flag value ..." add to a stage's arguments)
# make bench      our model against transformers on identical weights: tokens/s, step time, compile, memory
#                 (3-4 minutes on the idle 2-core CPU; not part of make test; BENCH_ARGS="--sizes tiny" etc.)
PY := .venv/bin/python
WORLD := data/shapes
RUN := runs/tiny
CONTEXT ?= gt

.PHONY: test reproduce bench
.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

test: .venv/installed
	$(PY) -m pytest -q tests

reproduce: .venv/installed $(RUN)/results.json

# $(call timed,NAME,COMMAND): run a stage and record its wall seconds in $(RUN)/seconds/NAME.s
timed = mkdir -p $(RUN)/seconds && t=$$(date +%s%N) && $(2) && \
	awk "BEGIN { print ($$(date +%s%N) - $$t) / 1e9 }" > $(RUN)/seconds/$(1).s

bench: .venv/installed
	$(PY) bench.py $(BENCH_ARGS)

$(WORLD)/world.json:
	$(call timed,world,$(PY) data.py --out $(WORLD))

$(RUN)/sft/model/config.json: $(WORLD)/world.json
	$(call timed,sft,$(PY) sft.py --train $(WORLD)/sft.jsonl $(WORLD)/text.jsonl $(WORLD)/captions.jsonl \
		--tokenizer $(WORLD)/tokenizer --out $(RUN)/sft --resume true $(SFT_ARGS))

# every context mode is judged, for the judge-agreement comparison; the RM learns from CONTEXT's labels
$(RUN)/prefs_%/summary.json: $(RUN)/sft/model/config.json
	$(call timed,prefs_$*,$(PY) make_prefs.py --prompts $(WORLD)/rl.jsonl --sft $(RUN)/sft/model --context $* \
		--out $(RUN)/prefs_$* --resume true $(PREFS_ARGS))

$(RUN)/rm/model/config.json: $(RUN)/prefs_$(CONTEXT)/summary.json
	$(call timed,rm,$(PY) train_rm.py --prefs $(RUN)/prefs_$(CONTEXT)/prefs.jsonl --sft $(RUN)/sft/model \
		--out $(RUN)/rm --resume true $(RM_ARGS))

$(RUN)/ppo/model/config.json: $(RUN)/rm/model/config.json
	$(call timed,ppo,$(PY) ppo.py --prompts $(WORLD)/rl.jsonl --sft $(RUN)/sft/model --rm $(RUN)/rm/model \
		--out $(RUN)/ppo --resume true $(PPO_ARGS))

# --rm adds best-of-6 rows per model (<name>_bo6, _bo6_logp; _bo6_pi without the RM): how far the RM could lift each policy (README)
$(RUN)/eval/results.json: $(RUN)/ppo/model/config.json
	$(call timed,eval,$(PY) eval.py --models sft=$(RUN)/sft/model rlaif=$(RUN)/ppo/model --rm $(RUN)/rm/model \
		--data $(WORLD)/eval.jsonl --prior_data $(WORLD)/sft.jsonl --out $(RUN)/eval $(EVAL_ARGS))

# report.html and the run's headline numbers (models, judge_agreement, rm_accuracy, seconds) in results.json
$(RUN)/results.json: $(RUN)/eval/results.json $(foreach c,none self gt,$(RUN)/prefs_$(c)/summary.json)
	$(PY) report.py --eval $(RUN)/eval --rm $(RUN)/rm/model --metrics $(RUN)/ppo/metrics.jsonl \
		--prefs $(foreach c,none self gt,$(RUN)/prefs_$(c)) --rm_summary $(RUN)/rm/summary.json \
		--seconds $(RUN)/seconds --out $(RUN)/report.html --summary $@

# make test       create .venv (first time), install requirements, run the test suite
# make reproduce  the whole pipeline on the synthetic world: world -> SFT -> preferences -> RM -> PPO -> eval
#                 (incremental: a stage whose checkpoint exists is skipped; CONTEXT=gt|self|none picks the
#                 context the judge reads)
# make bench      our model against transformers on identical weights: tokens/s, step time, compile, memory
#                 (13-33 minutes on the shared 2-core CPU; not part of make test; BENCH_ARGS="--sizes tiny" etc.)
PY := .venv/bin/python
WORLD := data/shapes
RUN := runs/tiny
CONTEXT ?= self

.PHONY: test reproduce bench
.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

test: .venv/installed
	$(PY) -m pytest -q tests

reproduce: .venv/installed $(RUN)/eval/results.json

bench: .venv/installed
	$(PY) bench.py $(BENCH_ARGS)

$(WORLD)/world.json:
	$(PY) data.py --out $(WORLD)

$(RUN)/sft/model/config.json: $(WORLD)/world.json
	$(PY) sft.py --out $(RUN)/sft

$(RUN)/prefs_$(CONTEXT)/summary.json: $(RUN)/sft/model/config.json
	$(PY) make_prefs.py --context $(CONTEXT) --out $(RUN)/prefs_$(CONTEXT) --resume true

$(RUN)/rm/model/config.json: $(RUN)/prefs_$(CONTEXT)/summary.json
	$(PY) train_rm.py --prefs $(RUN)/prefs_$(CONTEXT)/prefs.jsonl --out $(RUN)/rm

$(RUN)/ppo/model/config.json: $(RUN)/rm/model/config.json
	$(PY) ppo.py --out $(RUN)/ppo --resume true

$(RUN)/eval/results.json: $(RUN)/ppo/model/config.json
	$(PY) eval.py --models sft=$(RUN)/sft/model rlaif=$(RUN)/ppo/model --out $(RUN)/eval

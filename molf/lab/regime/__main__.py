"""``python -m molf.lab.regime``: see ``molf.lab.regime.cli``."""
from .cli import main

main()

"""``python -m molf.lab.tasks ...``: the command line of ``cli``."""
from .cli import main

main()

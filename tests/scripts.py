"""The experiment scripts as modules, loaded once for every test file that uses them (they are scripts
in experiments/, not a package)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_script(name: str, folder: str = "experiments"):
    spec = importlib.util.spec_from_file_location(name, ROOT / folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


grid, report, figures = (load_script(name) for name in ("grid", "report", "figures"))

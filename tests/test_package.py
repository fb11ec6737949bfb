"""The package's shape: the core needs torch alone and never imports the lab."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parent.parent / "molf"


def test_import_molf_loads_neither_the_lab_nor_its_dependencies():
    code = ("import sys, molf, molf.distributed, molf.reference, molf.routing_log; "
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'peft', 'pandas', 'matplotlib', "
            "'datasets', 'IPython'}) + sorted(m for m in sys.modules if m.startswith('molf.lab')); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_no_core_module_imports_the_lab():
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = ("." * node.level) + (node.module or "")
                assert not (target.startswith(".lab") or target.startswith("molf.lab")), f"{path.name} imports {target}"
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("molf.lab") for a in node.names), f"{path.name} imports the lab"

"""dvc.yaml declares every msr module a stage's notebook reaches, so DVC never skips a stage whose code changed."""
from __future__ import annotations

import ast
import json

import pytest
import yaml

from conftest import ROOT


def msr_imports(source: str, package: str | None = None) -> set[str]:
    "msr modules imported anywhere in `source` (module level or inside functions), as 'msr/x.py' paths."
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level and package:  # from .x import y / from . import x
                base = node.module or ""
                mods = [base] if base else [a.name for a in node.names]
                found |= {f"msr/{m.split('.')[0]}.py" for m in mods}
            elif node.module and node.module.split(".")[0] == "msr":
                parts = node.module.split(".")
                found |= {f"msr/{parts[1]}.py"} if len(parts) > 1 else {f"msr/{a.name}.py" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {f"msr/{a.name.split('.')[1]}.py" for a in node.names if a.name.startswith("msr.")}
    return {f for f in found if (ROOT / f).exists()}


def reached(paths: set[str]) -> set[str]:
    "The msr modules `paths` import, transitively."
    todo, seen = list(paths), set()
    while todo:
        p = todo.pop()
        if p in seen: continue
        seen.add(p)
        todo += msr_imports((ROOT / p).read_text(), package="msr") - seen
    return seen


def notebook_source(path) -> str:
    nb = json.loads(path.read_text())
    return "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")


STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def test_helpers_follow_imports():
    assert msr_imports("from msr.core import X\nimport msr.model\ndef f():\n    from msr.stage import y") == \
        {"msr/core.py", "msr/model.py", "msr/stage.py"}
    assert {"msr/core.py", "msr/recommend.py", "msr/seeds.py"} <= reached({"msr/model.py"})


@pytest.mark.parametrize("module", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "msr").glob("*.py")))
def test_no_import_cycle(module):
    "No msr module reaches itself through imports, not even through an import inside a function."
    direct = msr_imports((ROOT / module).read_text(), package="msr") - {module}
    assert module not in reached(direct), f"{module} imports itself back through {sorted(direct)}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_the_modules_it_reaches(stage):
    notebook = ROOT / "nbs" / "stages" / f"{stage}.ipynb"
    deps = {d for d in STAGES[stage].get("deps", []) if isinstance(d, str)}
    assert f"nbs/stages/{stage}.ipynb" in deps
    needed = reached(msr_imports(notebook_source(notebook)))
    missing = sorted(needed - deps)
    assert not missing, f"dvc.yaml stage {stage!r} runs code from {missing} without declaring it in deps"


def test_lock_was_written_by_this_code_and_these_params():
    """dvc.lock records the code, notebooks and params each stage last ran with. A commit that changes them without
    re-running the pipeline (`make run-offline`) leaves a stale lock, which CI's run rewrites (and then fails on a
    dirty tree ten minutes later): say so now, naming what changed."""
    import hashlib
    lock = yaml.safe_load((ROOT / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    stale = sorted(set(STAGES) ^ set(lock))
    for stage, entry in lock.items():
        if stage not in STAGES: continue
        declared = {d for d in STAGES[stage].get("deps", [])}
        locked = {d["path"]: d["md5"] for d in entry.get("deps", [])}
        stale += [f"{stage}: {p} (declared, not in the lock)" for p in sorted(declared - set(locked))]
        stale += [f"{stage}: {p} (changed)" for p, md5 in locked.items()
                  if p.startswith(("msr/", "nbs/")) and hashlib.md5((ROOT / p).read_bytes()).hexdigest() != md5]
        for key, value in entry.get("params", {}).get("params.yaml", {}).items():
            current = params
            for part in key.split("."): current = current.get(part) if isinstance(current, dict) else None
            if current != value: stale.append(f"{stage}: param {key}")
    assert not stale, "dvc.lock is stale; run `make run-offline` and commit dvc.lock and outputs/metrics:\n  " + "\n  ".join(stale)

"""params.yaml is the single home of msr's parameters: no library default restates one, and every stage
notebook takes its sections whole as the one papermill parameter `params`."""
from __future__ import annotations

import ast
import inspect
import json

import pytest
import yaml

from conftest import ROOT
from msr.clusters import fit_genre_mixtures, mixture_scores
from msr.genre import fit_genre_classifier
from msr.ingest import download, extract_member, fetch, ingest
from msr.model import MsrRecommender
from msr.registry import register
from msr.transform import make_queries, split_and_query, split_playlists

PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]

# each function or class that receives a params.yaml section (or part of one), and that section
RECEIVERS = [(MsrRecommender, "train"), (fit_genre_classifier, "genre"), (fit_genre_classifier, "train.genre"),
             (fit_genre_mixtures, "clusters"), (fit_genre_mixtures, "train.clusters"), (mixture_scores, "clusters"),
             (split_playlists, "transform"), (make_queries, "transform"), (split_and_query, "transform"),
             (register, "register"), (ingest, "ingest"), (fetch, "ingest"), (download, "ingest"),
             (extract_member, "ingest")]


def section(path: str) -> dict:
    value = PARAMS
    for key in path.split("."): value = value[key]
    return value


@pytest.mark.parametrize("receiver,path", RECEIVERS, ids=[f"{r.__name__}<-{p}" for r, p in RECEIVERS])
def test_no_library_default_restates_a_param(receiver, path):
    sig = inspect.signature(receiver)
    keys = set(section(path))
    restated = sorted(n for n, p in sig.parameters.items() if n in keys and p.default is not inspect.Parameter.empty)
    assert not restated, f"{receiver.__name__} gives {restated} defaults; their values live in params.yaml's {path}"
    assert keys & set(sig.parameters), f"{receiver.__name__} takes none of {path}'s keys: the receiver list is stale"


def parameters_cell(stage: str) -> str:
    nb = json.loads((ROOT / "nbs" / "stages" / f"{stage}.ipynb").read_text())
    cells = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"nbs/stages/{stage}.ipynb needs exactly one cell tagged 'parameters'"
    return "".join(cells[0]["source"])


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_takes_its_sections_whole(stage):
    "The parameters cell defines `params` and nothing else: no key is copied (and defaulted) by hand."
    names = {t.id for node in ast.parse(parameters_cell(stage)).body
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else [])
             if isinstance(t, ast.Name)}
    assert names <= {"params"}, f"nbs/stages/{stage}.ipynb's parameters cell defines {sorted(names - {'params'})}"

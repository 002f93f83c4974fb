"""msr's model, the library peer and the baselines over several random splits, on every evaluation protocol:
the evaluation of the `evaluate` stage (msr.evaluate.protocol_worlds / evaluate_protocols), repeated for each
split seed, with the peer tuned on each seed's validation split, and the served model's skew.

    python benchmarks/split_seeds.py --seeds 42 1 2

Reads the validated rows (`data/interim/songs.parquet`, run `dvc repro validate` first) and the
parameters in params.yaml; only transform.seed changes between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pandas as pd

from msr.core import SONGS, load_params
from msr.evaluate import (evaluate_protocols, fit_recommender, model_arguments, protocol_worlds, served_skew,
                          summarize, tune_peers)
from msr.metrics import METRICS
from msr.transform import build_tables, fit_playlists, split_and_query

ROOT = Path(__file__).resolve().parents[1]


def one_seed(tracks, pt, params: dict, seed: int, models: list, split: str) -> tuple[pd.DataFrame, dict]:
    "Every model on every protocol for one split seed: per-query rows, and the seed's facts (tuning, worlds, skew)."
    ev = params["evaluate"]
    splits, queries = split_and_query(pt, **{**params["transform"], "seed": seed})
    args = model_arguments(params)
    t0 = time.perf_counter()
    tuned, _ = tune_peers(tracks, fit_playlists(pt, splits, "valid"), queries, params, args)
    print(f"seed {seed}: tuned {tuned} on validation in {time.perf_counter() - t0:.0f} s", flush=True)
    fit_rows = fit_playlists(pt, splits, split)
    fitted = {}
    def fit(name, catalogue, rows, lookup):
        model = fit_recommender(name, catalogue, rows, args.get(name), lookup)
        if catalogue is tracks: fitted[name] = model  # the leaky world is the served catalogue: its models give the skew
        return model
    worlds = protocol_worlds(tracks, fit_rows, queries, split, protocols=ev["protocols"], fed=ev["fed"], decoys=ev["decoys"],
                             foreign=ev["foreign"], foreign_base=ev["foreign_base"], seed=ev["world_seed"])
    per_query, facts = evaluate_protocols(fit, models, worlds, k=ev["k"])
    skew = {name: served_skew(m, tracks, fit_rows, n=ev["skew_queries"], seed=ev["world_seed"]) for name, m in fitted.items()}
    return per_query.assign(split_seed=seed), {"tuned": tuned, "protocols": facts, "skew": skew}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--models", nargs="+", default=None, help="default: evaluate.models in params.yaml")
    ap.add_argument("--split", default="test", choices=["test", "valid"])
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/split_seeds.json")
    args = ap.parse_args()
    os.chdir(ROOT)
    params = load_params()
    models = args.models or params["evaluate"]["models"]
    tracks, pt, _ = build_tables(pd.read_parquet(SONGS))
    rows, facts = [], {}
    for seed in args.seeds:
        per_query, facts[seed] = one_seed(tracks, pt, params, seed, models, args.split)
        table = summarize(per_query)
        rows.append(table.reset_index().assign(split_seed=seed))
        head = params["evaluate"]["protocols"][0]
        print(f"seed {seed}: " + ", ".join(f"{m} {table.loc[(m, f'{head}/half'), 'r_precision']:.4f}" for m in models), flush=True)
    df = pd.concat(rows, ignore_index=True).drop(columns="latency_ms")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"seeds": args.seeds, "split": args.split, "facts": facts,
                                       "runs": df.to_dict(orient="records")}, indent=1, default=float) + "\n")
    agg = df.groupby(["model", "setting"])[list(METRICS)].agg(["mean", "std", "min", "max"])
    print(f"\n{args.split} queries, split seeds {args.seeds}: mean ± std (min–max)\n")
    print("| model | setting | R-precision | NDCG@50 | recall@50 | clicks |\n|---|---|---|---|---|---|")
    for (model, setting), r in agg.iterrows():
        cells = [f"{r[(m, 'mean')]:.3f} ± {r[(m, 'std')]:.3f} ({r[(m, 'min')]:.3f}–{r[(m, 'max')]:.3f})"
                 for m in ["r_precision", "ndcg_at_50", "recall_at_50"]]
        cells.append(f"{r[('clicks', 'mean')]:.2f} ± {r[('clicks', 'std')]:.2f}")
        print(f"| {model} | {setting} | " + " | ".join(cells) + " |")
    # msr against the peer, seed by seed
    if {"msr", "knn"} <= set(models):
        wide = df.set_index(["split_seed", "setting", "model"])[["r_precision", "ndcg_at_50"]].unstack("model")
        ahead = (wide.xs("msr", axis=1, level="model") > wide.xs("knn", axis=1, level="model")).groupby("setting").all()
        ratio = (wide.xs("msr", axis=1, level="model") / wide.xs("knn", axis=1, level="model")).groupby("setting").mean()
        print("\nmsr ahead of knn on every seed (and mean msr/knn):\n")
        print(pd.concat({"ahead": ahead, "ratio": ratio.round(2)}, axis=1).to_string())
    print("\nserved skew (cold share of the answers / of the catalogue), per seed:")
    for seed, f in facts.items(): print(seed, {m: s["ratio"] for m, s in f["skew"].items()})


if __name__ == "__main__":
    main()

"""msr's model and the baselines over several random splits: the evaluation of the `evaluate` stage,
repeated for each split seed, with the mean and spread of every metric.

    python benchmarks/split_seeds.py --seeds 42 1 2 3 4

Reads the validated rows (`data/interim/songs.parquet`, run `dvc repro validate` first) and the
parameters in params.yaml; only transform.seed changes between runs.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

from msr.clusters import mixture_args
from msr.core import SONGS, load_params
from msr.evaluate import evaluate_model, fit_recommender, foreign_queries, summarize, without_tracks
from msr.metrics import METRICS
from msr.transform import build_tables, fit_playlists, split_and_query

ROOT = Path(__file__).resolve().parents[1]


def model_params(params: dict) -> dict:
    train = params["train"]
    clusters = mixture_args(params["clusters"])
    return {"msr": train, "original": {"genre": params["genre"], "clusters": clusters},
            "random": {"seed": params["evaluate"]["random_seed"]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--models", nargs="+", default=["msr", "original", "popularity", "content", "random"])
    ap.add_argument("--split", default="test", choices=["test", "valid"])
    ap.add_argument("--foreign", nargs="*", default=None, help="foreign settings (default: evaluate.foreign in params.yaml)")
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/split_seeds.json")
    args = ap.parse_args()
    os.chdir(ROOT)
    params = load_params()
    t = params["transform"]
    per_model = model_params(params)
    if args.foreign is None: args.foreign = params["evaluate"].get("foreign", [])
    tracks, pt, _ = build_tables(pd.read_parquet(SONGS))
    rows = []
    for seed in args.seeds:
        splits, queries = split_and_query(pt, **{**t, "seed": seed})
        train = fit_playlists(pt, splits, args.split)
        for name in args.models:
            model = fit_recommender(name, tracks, train, per_model.get(name))
            table = summarize(evaluate_model(model, queries, split=args.split, k=params["evaluate"]["k"]).assign(model=name))
            rows.append(table.reset_index().assign(split_seed=seed))
            print(f"seed {seed} {name}: half R-precision {table.loc[(name, 'half'), 'r_precision']:.4f}", flush=True)
        # a real person's playlist: the half queries' seeds as foreign records, their tracks out of catalogue and training data
        by_removed = {}
        for kind in args.foreign:
            fq, removed = foreign_queries(queries, tracks, kind, base=params["evaluate"]["foreign_base"], split=args.split)
            by_removed.setdefault(frozenset(removed), []).append(fq)
        for removed, query_sets in by_removed.items():
            t_rest, pt_rest = without_tracks(tracks, train, removed)
            for name in args.models:
                model = fit_recommender(name, t_rest, pt_rest, per_model.get(name))
                for fq in query_sets:
                    table = summarize(evaluate_model(model, fq, k=params["evaluate"]["k"]).assign(model=name))
                    rows.append(table.reset_index().assign(split_seed=seed))
                    print(f"seed {seed} {name}: {fq[0][0]} R-precision {table['r_precision'].iat[0]:.4f}", flush=True)
    df = pd.concat(rows, ignore_index=True)
    agg = df.groupby(["model", "setting"])[list(METRICS)].agg(["mean", "std", "min", "max"])
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"seeds": args.seeds, "split": args.split,
                                       "runs": df.to_dict(orient="records")}, indent=1, default=float) + "\n")
    print(f"\n{args.split} queries, split seeds {args.seeds}: mean ± std (min–max)\n")
    print("| model | setting | R-precision | NDCG@50 | recall@50 | clicks |\n|---|---|---|---|---|---|")
    for (model, setting), r in agg.iterrows():
        cells = [f"{r[(m, 'mean')]:.3f} ± {r[(m, 'std')]:.3f} ({r[(m, 'min')]:.3f}–{r[(m, 'max')]:.3f})"
                 for m in ["r_precision", "ndcg_at_50", "recall_at_50"]]
        cells.append(f"{r[('clicks', 'mean')]:.2f} ± {r[('clicks', 'std')]:.2f}")
        print(f"| {model} | {setting} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

"""Seeds as a real person's Spotify playlist gives them, for the latency benchmarks: track records with fresh ids and
new titles (so no record is read back as a catalogue song), carrying artist, album name, release date and, optionally,
audio features. Shared by recommend.py, paired.py and scale.py, with the queries they time (`latency_queries`)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from msr.core import AUDIO_FEATURES, TRACK_ID

FIELDS = ["track_name", "track_artist", "track_album_name", "track_album_release_date"]


def as_records(by_id: pd.DataFrame,  # the catalogue indexed by track_id
               ids: list, rng: np.random.Generator, features: bool = True) -> list[dict]:
    "The tracks `ids` as foreign track records."
    cols = FIELDS + (AUDIO_FEATURES if features else [])
    out = []
    for r in by_id.loc[ids, cols].to_dict("records"):
        r["track_name"] = f"{r['track_name']} new take"
        out.append({TRACK_ID: f"foreign-{rng.integers(2**62):016x}", **r})
    return out


def latency_queries(tracks: pd.DataFrame, pt: pd.DataFrame,  # the catalogue and the playlists' tracks
                    n: int, seeds: int, seed: int = 0,  # n queries of `seeds` tracks each, drawn with random seed `seed`
                    without_features: bool = True,  # also the records without audio features ("foreign_nofeat")
                   ) -> dict[str, list]:
    """The latency benchmarks' queries: `n` draws of `seeds` tracks, each from a playlist longer than that, as catalogue
    ids; then the same tracks as foreign records with audio features, and (drawn last) without."""
    rng = np.random.default_rng(seed)
    lists = pt.groupby("playlist_id")[TRACK_ID].apply(list)
    lists = lists[lists.map(len) > seeds].to_numpy()
    ids = [list(rng.choice(lists[rng.integers(len(lists))], seeds, replace=False)) for _ in range(n)]
    by_id = tracks.set_index(TRACK_ID)
    out = {"ids": ids, "foreign": [as_records(by_id, q, rng) for q in ids]}
    if without_features: out["foreign_nofeat"] = [as_records(by_id, q, rng, features=False) for q in ids]
    return out

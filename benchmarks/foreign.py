"""Seeds as a real person's Spotify playlist gives them, for the latency benchmarks: track records with fresh ids and
new titles (so no record is read back as a catalogue song), carrying artist, album name, release date and, optionally,
audio features. Shared by recommend.py and scale.py."""
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

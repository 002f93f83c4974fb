"""Validation on the real archive and on real rows broken in each way the schema must catch."""
from __future__ import annotations

import pytest

from conftest import sample_rows
from msr.validate import ValidationError, validate, validate_frame


def test_real_archive_passes_with_five_quarantined(songs):
    valid, quarantine, report = validate_frame(songs)
    assert report["rows_checked"] == 32_833 and report["hard_failures"] == []
    assert report["quarantined"] == 5 and len(valid) == 32_828
    assert quarantine["reason"].str.contains("track_name missing").all()


def _set(col, value, dtype=None):
    def corrupt(df):
        if dtype: df[col] = df[col].astype(dtype)
        df.loc[2, col] = value
        return df
    return corrupt


CASES = {
    "energy above 1": (_set("energy", 1.3), ["energy", "in_range"]),
    "negative tempo": (_set("tempo", -5.0), ["tempo", "greater_than_or_equal_to"]),
    "zero duration": (_set("duration_ms", 0), ["duration_ms", "greater_than"]),
    "key out of range": (_set("key", 12), ["key", "in_range"]),
    "mode not 0/1": (_set("mode", 2), ["mode", "isin"]),
    "popularity above 100": (_set("track_popularity", 101), ["track_popularity", "in_range"]),
    "short track id": (_set("track_id", "abc"), ["track_id", "str_matches", "abc"]),
    "non-base62 playlist id": (_set("playlist_id", "37i9dQZF1DXcZDD7cfEK!W"), ["playlist_id", "str_matches"]),
    "unknown genre": (_set("playlist_genre", "polka"), ["playlist_genre", "isin", "polka"]),
    "unparseable date": (_set("track_album_release_date", "2019-13-01"), ["track_album_release_date", "2019-13-01"]),
    "text in numeric column": (_set("valence", "happy", object), ["valence", "float64"]),
    "missing column": (lambda df: df.drop(columns=["loudness"]), ["loudness", "column_in_dataframe"]),
    "missing track id": (_set("track_id", None), ["track_id", "not_nullable"]),
}


@pytest.fixture(scope="module")
def sample(songs):
    return sample_rows(songs)


@pytest.mark.parametrize("case", CASES)
def test_hard_failures_are_named_and_keep_good_output(sample, case, tmp_path):
    corrupt, words = CASES[case]
    good_csv, songs_out, quarantine = tmp_path / "good.csv", tmp_path / "songs.parquet", tmp_path / "q.csv"
    sample.to_csv(good_csv, index=False)
    validate(good_csv, songs_out, quarantine)
    before = songs_out.read_bytes(), quarantine.read_bytes()
    bad_csv = tmp_path / "bad.csv"
    corrupt(sample.copy()).to_csv(bad_csv, index=False)
    with pytest.raises(ValidationError) as err:
        validate(bad_csv, songs_out, quarantine)
    for word in words: assert word in str(err.value), (word, str(err.value))
    assert err.value.report["status"] is False
    assert (songs_out.read_bytes(), quarantine.read_bytes()) == before


def test_unparseable_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text('track_id,energy\n"unterminated,0.5\n')
    with pytest.raises(ValidationError, match="parseable CSV"):
        validate(bad, tmp_path / "s.parquet", tmp_path / "q.csv")
    assert not (tmp_path / "s.parquet").exists()


def test_missing_raw_data_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the ingest stage first"):
        validate(tmp_path / "none.csv", tmp_path / "s.parquet", tmp_path / "q.csv")

"""Calibration sources: every supported kind of source yields the same text, bad ones a clear error."""

from __future__ import annotations

import json

import datasets
import pytest

from modelpress.data import read_calibration
from modelpress.errors import UserError

ROWS = ["It is a truth universally acknowledged,", "", "that a single man in possession of a good fortune"]
JOINED = "\n\n".join(r for r in ROWS if r)


def test_jsonl_with_a_chosen_field(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"content": r, "id": i}) for i, r in enumerate(ROWS[::2])))
    assert read_calibration(str(path), "content") == JOINED
    with pytest.raises(UserError, match="'text' field"):
        read_calibration(str(path))


def test_saved_dataset_folder_and_parquet_give_the_rows_in_order(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ROWS, "n": [1, 2, 3]})
    ds.save_to_disk(tmp_path / "saved")
    ds.to_parquet(tmp_path / "c.parquet")
    assert read_calibration(str(tmp_path / "saved")) == JOINED
    assert read_calibration(str(tmp_path / "c.parquet")) == JOINED
    with pytest.raises(UserError, match="no 'body' column .*text, n"):
        read_calibration(str(tmp_path / "saved"), "body")
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(tmp_path / "splits")
    with pytest.raises(UserError, match="several splits"):
        read_calibration(str(tmp_path / "splits"))


def test_unreachable_hub_dataset_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import: patch the value
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    with pytest.raises(UserError, match="could not load calibration dataset hf:no-such/dataset"):
        read_calibration("hf:no-such/dataset:cfg@validation")

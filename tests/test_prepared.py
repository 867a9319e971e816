"""An opened prepared dataset (`stam_jax.data.prepared.PreparedDataset`) on its own, without
preparing one (`test_prepare` prepares real ones)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from stam_jax.data.folder import VideoFolder, VideoItem
from stam_jax.data.prepared import PreparedDataset
from stam_jax.data.video import ClipSpec


def dataset(tmp_path: Path) -> PreparedDataset:
    items = tuple(VideoItem(f"c/v{i}.mp4", 0) for i in range(5))
    return PreparedDataset(
        path=tmp_path,
        kind="eval",
        encoding="raw",
        spec=ClipSpec(num_frames=4, frame_rate=4.0, resize=36, crop=32),
        folder=VideoFolder(tmp_path, ("c",), items, ()),
        outcomes={
            1: {"status": "too_short", "reason": "x"},
            3: {"status": "failed", "reason": "y"},
        },
        num_records=3,
    )


def test_record_positions_are_listed_once_and_shared_read_only(tmp_path, monkeypatch):
    # An evaluation asked for them twice (the records left, then its share of them), each time
    # going through the whole listing.
    opened = dataset(tmp_path)
    first = opened.record_positions()
    assert first.tolist() == [0, 2, 4] and first.dtype == np.int64
    monkeypatch.setattr(np, "fromiter", None)  # listed again: a TypeError
    assert opened.record_positions() is first
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 1
    assert dataclasses.replace(opened, num_records=3) == opened  # not a field: equality as was


def test_a_clip_length_that_differs_is_named_by_the_flag_that_sets_it(tmp_path):
    # T is the model's (--config.model_overrides.num_frames), not a --config.data field.
    opened = dataset(tmp_path)
    asked = dataclasses.replace(opened.spec, num_frames=8, num_clips=2)
    assert opened.mismatches(asked) == [
        "--config.model_overrides.num_frames: prepared 4, asked 8",
        "--config.data.num_clips: prepared 1, asked 2",
    ]

"""Prepared datasets: video folders decoded once into a TFDS dataset of ArrayRecord files.

`python -m stam_jax.data.prepare` writes one; `run_eval.py` and `run_train.py` read it when
`--config.data.root` / `--config.train.root` names its folder instead of a video folder. Reading
needs `tensorflow_datasets` and `grain` (the `prepared` extra), never TensorFlow.

A prepared folder holds:

- `stam_videos-<split>.array_record-NNNNN-of-MMMMM`: one record per usable video (a serialized
  `tf.train.Example` in TFDS's format), in the listing order of the source folder;
- `dataset_info.json`, `features.json`, `label.labels.txt`, `metadata.json`: TFDS metadata, so
  `tfds.builder_from_directory(DIR).as_data_source('validation')` opens it;
- `stam_prepare.json`: how it was made (kind, encoding, sampling), the source folder's full
  listing (paths, labels, classes, classes without videos, and the entries the listing left
  out: `ignored`, [path, reason, note] rows) and every dropped or failed video with its reason.

Two kinds:

- `eval` (split `validation`): each video's model inputs, uint8 `(views, T, crop, crop, 3)`,
  exactly what the raw-video evaluation feeds the model (`raw`), or those frames as JPEG;
- `train` (split `train`): every frame the sampling rate keeps, resized (shorter side `resize`)
  but not cropped; training draws the clip, crop and flip from them at read time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from stam_jax.data.folder import Ignored, VideoFolder, VideoItem, as_text, list_videos
from stam_jax.data.video import ClipSpec, augment_clip

FORMAT_VERSION = 1
DATASET_NAME = "stam_videos"
META_FILE = "stam_prepare.json"
PARTS = ".prepare"  # the finished shards of an unfinished preparation
SPLITS = {"eval": "validation", "train": "train"}
KINDS = tuple(SPLITS)
ENCODINGS = ("raw", "jpeg")
# ClipSpec fields an `eval` dataset fixes; a `train` dataset fixes only the first two.
EVAL_FIELDS = ("frame_rate", "resize", "num_frames", "crop", "num_clips", "num_crops")
TRAIN_FIELDS = ("frame_rate", "resize")


def spec_flag(name: str) -> str:
    """The run-config flag that sets `ClipSpec` field `name` (`frame_rate` ->
    `--config.data.frame_rate`; T, `num_frames`, is the model's)."""
    if name == "num_frames":
        return "--config.model_overrides.num_frames"
    return f"--config.data.{name}"


class PreparedError(ValueError):
    """A prepared dataset that cannot be used as asked; the message says what to do."""


@functools.lru_cache(maxsize=4)  # built once per worker process, not once per video
def features(kind: str, encoding: str, spec: ClipSpec, classes: tuple[str, ...]) -> Any:
    """The TFDS `FeaturesDict` of a prepared dataset."""
    import tensorflow_datasets as tfds

    f = tfds.features
    if kind == "eval" and encoding == "raw":
        shape = (spec.num_views, spec.num_frames, spec.crop, spec.crop, 3)
        # encoding="bytes": one bytes field (the default would be a list of 2.4M varints).
        pixels = f.Tensor(shape=shape, dtype=np.uint8, encoding="bytes")
    elif kind == "train" and encoding == "raw":
        pixels = f.Tensor(shape=(None, None, None, 3), dtype=np.uint8, encoding="bytes")
    else:  # one JPEG per frame (eval: views x T of them, view-major)
        pixels = f.Sequence(f.Tensor(shape=(), dtype=np.object_))
    return f.FeaturesDict(
        {
            "frames": pixels,
            # UTF-8 names (the listing in stam_prepare.json keeps the folder names themselves).
            "label": f.ClassLabel(names=[as_text(name) for name in classes]),
            "path": f.Text(),
            "index": f.Scalar(dtype=np.int64),
        }
    )


def encode_jpeg(frame: np.ndarray, quality: int) -> bytes:
    """One RGB uint8 frame as JPEG bytes (PIL, 4:2:0 chroma)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def jpeg_image(data: bytes) -> Any:
    """JPEG bytes as a decoded RGB PIL image."""
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_jpeg(data: bytes) -> np.ndarray:
    """JPEG bytes as an RGB uint8 `(H, W, 3)` array."""
    return np.asarray(jpeg_image(data))


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset folder, opened.

    Attributes:
      path: the folder.
      kind: 'eval' or 'train'.
      encoding: 'raw' or 'jpeg'.
      spec: the sampling (and, for `eval`, the views) it was made with.
      folder: the source folder's listing (its root, paths relative to it, labels, classes,
        empty classes and the entries it left out, as listed when the dataset was prepared).
      outcomes: listing index -> {'status': 'too_short'|'failed', 'reason'} for every video
        that has no record.
      num_records: records in the split.
      jpeg_quality: the JPEG quality of the frames (None: raw).
    """

    path: Path
    kind: str
    encoding: str
    spec: ClipSpec
    folder: VideoFolder
    outcomes: dict[int, dict[str, str]]
    num_records: int
    jpeg_quality: int | None = None

    @property
    def frames(self) -> str:
        """How the frames are stored: 'raw' (as decoding the videos gives them, bit for bit) or
        'JPEG (quality Q)'."""
        return "raw" if self.encoding == "raw" else f"JPEG (quality {self.jpeg_quality})"

    @property
    def split(self) -> str:
        """The TFDS split holding the records."""
        return SPLITS[self.kind]

    def data_source(self) -> Any:
        """The records as a random-access TFDS data source (no TensorFlow involved)."""
        import tensorflow_datasets as tfds

        return tfds.builder_from_directory(str(self.path)).as_data_source(split=self.split)

    def record_positions(self) -> np.ndarray:
        """Each record's video, as its index in the listing: records are the listed videos in
        listing order, less those in `outcomes`.

        Computed once per opened dataset (an evaluation asks twice: for the records left, then
        for its share of them), and read-only: every caller shares the one array.
        """
        positions = self.__dict__.get("_record_positions")
        if positions is None:
            kept = (p for p in range(len(self.folder.items)) if p not in self.outcomes)
            positions = np.fromiter(kept, np.int64, self.num_records)
            positions.flags.writeable = False
            object.__setattr__(self, "_record_positions", positions)  # frozen: not a field
        return positions

    def mismatches(self, spec: ClipSpec) -> list[str]:
        """'--config.data.FIELD: prepared X, asked Y' for each sampling field that differs from
        `spec`, named by the flag that sets it."""
        fields = EVAL_FIELDS if self.kind == "eval" else TRAIN_FIELDS
        if self.kind == "eval":
            fields += ("short_videos",)
        out = []
        for name in fields:
            have, want = getattr(self.spec, name), getattr(spec, name)
            if have != want:
                if isinstance(have, str):
                    have, want = repr(have), repr(want)
                out.append(f"{spec_flag(name)}: prepared {have}, asked {want}")
        return out


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a folder written by `stam_jax.data.prepare` (complete or not)."""
    return (Path(path) / META_FILE).is_file()


def open_prepared(path: str | Path) -> PreparedDataset:
    """Opens a prepared dataset folder.

    Raises:
      PreparedError: not a prepared dataset, an unfinished one, or an unknown format version.
    """
    path = Path(path)
    if not is_prepared(path):
        raise PreparedError(f"{path} is not a prepared dataset (no {META_FILE}).")
    meta = json.loads((path / META_FILE).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise PreparedError(
            f"{path} was prepared in format {meta.get('format')}; this version reads "
            f"{FORMAT_VERSION}. Prepare it again."
        )
    if not meta.get("complete"):
        shards = -(-len(meta["items"]) // meta["shard_size"])
        done = len(list((path / PARTS).glob("part-*.json")))
        raise PreparedError(
            f"{path} is unfinished ({done} of {shards} shards prepared); run the same "
            "`python -m stam_jax.data.prepare` command again to finish it."
        )
    _check_shards(path, SPLITS[meta["kind"]])
    folder = VideoFolder(
        root=Path(meta["source"]),
        classes=tuple(meta["classes"]),
        items=tuple(VideoItem(p, int(label)) for p, label in meta["items"]),
        empty_classes=tuple(meta["empty_classes"]),
        # Datasets prepared before 'ignored' was stored have none recorded.
        ignored=tuple(Ignored(*row) for row in meta.get("ignored", [])),
    )
    return PreparedDataset(
        path=path,
        kind=meta["kind"],
        encoding=meta["encoding"],
        spec=ClipSpec(**meta["spec"]),
        folder=folder,
        outcomes={int(k): v for k, v in meta["outcomes"].items()},
        num_records=int(meta["num_records"]),
        jpeg_quality=meta.get("jpeg_quality"),
    )


_SHARD_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"  # TFDS's, as prepare writes


def _check_shards(path: Path, split: str) -> None:
    """Refuses a dataset whose record files are not all there, whole: a copy that stopped
    part-way failed mid-run, after the compile, with a traceback from inside grain."""
    try:
        info = json.loads((path / "dataset_info.json").read_text())
        (entry,) = [e for e in info["splits"] if e["name"] == split]
        lengths = [int(n) for n in entry["shardLengths"]]
        template, name, kind = entry["filepathTemplate"], info["name"], info["fileFormat"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PreparedError(
            f"{path}: its dataset_info.json cannot be read ({type(e).__name__}: {e}); copy the "
            "dataset again, or prepare it again."
        ) from None
    if template != _SHARD_TEMPLATE or kind != "array_record":
        return  # not written by this version of prepare: TFDS itself will say
    from array_record.python.array_record_module import ArrayRecordReader

    for i, expected in enumerate(lengths):
        shard = path / f"{name}-{split}.{kind}-{i:05d}-of-{len(lengths):05d}"
        problem = None
        if not shard.is_file():
            problem = "is missing"
        else:
            try:
                with contextlib.closing(ArrayRecordReader(str(shard))) as reader:
                    found = reader.num_records()
                if found != expected:
                    problem = f"holds {found} records where {expected} were written"
            except (OSError, RuntimeError, ValueError) as e:
                problem = f"cannot be read ({e})"
        if problem:
            raise PreparedError(
                f"{path} is damaged: {shard.name} {problem} (shard {i + 1} of {len(lengths)}); "
                "copy the dataset again, or prepare it again."
            )


def open_checked(
    path: str | Path, kind: str, spec: ClipSpec, class_list: str | None = None
) -> PreparedDataset:
    """Opens a prepared dataset for a use: `kind` ('eval' or 'train') with clips like `spec`.

    Raises:
      PreparedError: not a finished prepared dataset, another kind, other sampling (each field
        named), or a `class_list` file naming other classes.
    """
    from stam_jax.data.folder import read_class_list

    dataset = open_prepared(path)
    if dataset.kind != kind:
        use = "evaluation" if kind == "eval" else "training"
        raise PreparedError(
            f"{path} is {'an' if dataset.kind == 'eval' else 'a'} {dataset.kind} dataset; {use} "
            f"reads one made with python -m stam_jax.data.prepare --kind {kind}."
        )
    differ = dataset.mismatches(spec)
    if differ:
        raise PreparedError(
            f"{path} was prepared with other sampling than this config asks for "
            f"({'; '.join(differ)}); prepare it again with this config, or set the config to "
            "the prepared values."
        )
    if class_list and tuple(read_class_list(class_list)) != dataset.folder.classes:
        raise PreparedError(
            f"--config.data.class_list={class_list} differs from the classes {path} was "
            "prepared with; drop it (the dataset keeps its class list)."
        )
    return dataset


def list_root(
    root: str | Path, kind: str, spec: ClipSpec, class_list: str | None = None
) -> tuple[VideoFolder, PreparedDataset | None]:
    """The listing of a data root: a video folder, or a prepared dataset checked for this use.

    Returns:
      (the listing, the opened dataset or None for a video folder).

    Raises:
      DatasetError: a video folder that cannot be listed.
      PreparedError: see `open_checked`.
    """
    if is_prepared(root):
        dataset = open_checked(root, kind, spec, class_list)
        return dataset.folder, dataset
    return list_videos(root, class_list), None


def eval_views(record: dict[str, Any], encoding: str, prepared: ClipSpec) -> np.ndarray:
    """The uint8 `(views, T, crop, crop, 3)` model inputs of an `eval` record."""
    if encoding == "raw":
        return np.asarray(record["frames"])
    frames = np.stack([decode_jpeg(data) for data in record["frames"]])
    return frames.reshape(prepared.num_views, prepared.num_frames, prepared.crop, prepared.crop, 3)


def train_clip(
    record: dict[str, Any], encoding: str, spec: ClipSpec, rng: np.random.Generator
) -> np.ndarray:
    """One augmented uint8 `(T, crop, crop, 3)` clip from a `train` record (see `augment_clip`).

    Only the frames of the clip are decoded from JPEG.
    """
    frames = record["frames"]
    if encoding == "raw":
        return augment_clip(len(frames), lambda slots: [frames[s] for s in slots], spec, rng)
    return augment_clip(
        len(frames), lambda slots: [jpeg_image(frames[s]) for s in slots], spec, rng
    )

"""Where shard samples come from: a folder of images with caption files, a JSONL/CSV table, or the demo digits.

Every source is an iterable of :class:`Sample` with a :class:`SkipLog` (``source.skips``) that counts what it had
to leave out, by reason, with a few example paths. Sources decode each image once with PIL (``Image.open(...)
.load()``) so a broken file is caught here, counted as ``corrupt_image``, and never reaches a shard; the decoded
image travels with the sample so the writer does not decode it again.

Skip reasons used here: ``missing_caption`` (no caption file, or an empty caption), ``missing_image`` (a table
row names a file that is not there), ``corrupt_image`` (PIL cannot decode it), ``image_too_large`` (PIL's
decompression-bomb guard), ``bad_caption`` (a caption file that is not UTF-8), ``bad_metadata`` (a side-car
``.json`` that is not a JSON object), ``bad_row`` (a table line that is not a JSON object, or lacks the image
column).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TABLE_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "tsv"}
MAX_SKIP_EXAMPLES = 3

ImageLike = Union[bytes, Image.Image, np.ndarray]


@dataclass
class Sample:
    """One image–text pair on its way into a shard."""

    image: ImageLike  # encoded bytes (kept as-is when allowed), a PIL image, or a uint8 array (H, W[, C])
    caption: str  # the text, UTF-8 in the shard's ``.txt``
    extra: dict[str, Any] = field(default_factory=dict)  # more json fields (metadata columns, labels, ...)
    source_id: str = ""  # where it came from (path, row, dataset index); the json's "source" field
    decoded: Optional[Image.Image] = None  # ``image`` already decoded (a source's validation pass), if bytes


class SkipLog:
    """Counts of skipped inputs by reason, with the first few examples of each."""

    def __init__(self, max_examples: int = MAX_SKIP_EXAMPLES):
        self.max_examples = max_examples
        self.counts: dict[str, int] = {}
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.max_examples:
            ex.append(example)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def format(self) -> str:
        """``"corrupt_image 2 (e.g. a.jpg, b.png); missing_caption 1 (e.g. c.png)"``, or ``"nothing"``."""
        if not self.counts:
            return "nothing"
        parts = []
        for reason in sorted(self.counts):
            shown = ", ".join(self.examples.get(reason, []))
            more = ", ..." if self.counts[reason] > len(self.examples.get(reason, [])) else ""
            parts.append(f"{reason} {self.counts[reason]} (e.g. {shown}{more})")
        return "; ".join(parts)


def decode_image(data: bytes) -> Image.Image:
    """Fully decode ``data`` with PIL (``load()``, not just the header); raises on a broken or truncated file."""
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _read_image(path: Path, skips: SkipLog, example: str) -> Optional[tuple[bytes, Image.Image]]:
    """The file's bytes and decoded image, or None after logging why it cannot be used."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        skips.add("missing_image", example)
        return None
    try:
        return data, decode_image(data)
    except Image.DecompressionBombError:
        skips.add("image_too_large", example)
    except Exception:  # PIL raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ValueError, ...)
        skips.add("corrupt_image", example)
    return None


def _caption_text(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None or NaN
        return ""
    return str(value).strip()


class FolderSource:
    """Images under ``root`` (recursive, sorted by relative path) with a same-stem ``.txt`` caption beside each.

    ``photos/cat.jpg`` takes its caption from ``photos/cat.txt`` and, when present, extra json fields from
    ``photos/cat.json`` (a JSON object). Without a caption the image is skipped as ``missing_caption`` unless
    ``allow_empty_caption`` (then the caption is ``""``). Files and folders whose names start with ``.`` are
    ignored.
    """

    def __init__(self, root: str | os.PathLike, allow_empty_caption: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"input: {str(root)!r} is not a folder (a folder source needs a directory of images)")
        self.allow_empty_caption = allow_empty_caption
        self.skips = SkipLog()
        self._files: Optional[list[Path]] = None

    def files(self) -> list[Path]:
        if self._files is None:
            found = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = [d for d in dirnames if not d.startswith(".")]
                for name in filenames:
                    if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                        found.append(Path(dirpath) / name)
            self._files = sorted(found, key=lambda p: p.relative_to(self.root).as_posix())
        return self._files

    def size_hint(self) -> int:
        return len(self.files())

    def __iter__(self) -> Iterator[Sample]:
        for path in self.files():
            rel = path.relative_to(self.root).as_posix()
            caption_path = path.with_suffix(".txt")
            caption = ""
            if caption_path.is_file():
                try:
                    caption = _caption_text(caption_path.read_text(encoding="utf-8-sig"))
                except UnicodeDecodeError:
                    self.skips.add("bad_caption", rel)
                    continue
            if not caption and not self.allow_empty_caption:
                self.skips.add("missing_caption", rel)
                continue
            extra: dict[str, Any] = {}
            meta_path = path.with_suffix(".json")
            if meta_path.is_file():
                try:
                    extra = json.loads(meta_path.read_text(encoding="utf-8-sig"))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    extra = None  # type: ignore[assignment]
                if not isinstance(extra, dict):
                    self.skips.add("bad_metadata", rel)
                    continue
            loaded = _read_image(path, self.skips, rel)
            if loaded is None:
                continue
            data, img = loaded
            yield Sample(image=data, caption=caption, extra=extra, source_id=rel, decoded=img)


class TableSource:
    """Rows of a JSONL (``.jsonl``/``.ndjson``) or CSV (``.csv``; ``.tsv`` tab-separated) table.

    Each row names an image file in ``image_column`` (absolute, or relative to the table's folder) and its text in
    ``caption_column``; every other column goes into the sample's json unchanged (CSV values are strings). Skips:
    ``bad_row`` (a JSONL line that is not a UTF-8 JSON object, or a row without the image column; the example names the
    line number), ``missing_image``, ``corrupt_image``, ``missing_caption`` (empty or absent caption, unless
    ``allow_empty_caption``).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        image_column: str = "image",
        caption_column: str = "caption",
        allow_empty_caption: bool = False,
    ):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"input: {str(path)!r} is not a file (a table source needs a .jsonl or .csv file)")
        kind = TABLE_SUFFIXES.get(self.path.suffix.lower())
        if kind is None:
            raise ValueError(f"input: {str(path)!r} has suffix {self.path.suffix!r}; "
                             f"allowed: {', '.join(sorted(TABLE_SUFFIXES))}")
        self.kind = kind
        self.image_column = image_column
        self.caption_column = caption_column
        self.allow_empty_caption = allow_empty_caption
        self.skips = SkipLog()
        if kind != "jsonl":
            with self.path.open(newline="", encoding="utf-8-sig") as f:
                header = self._csv_reader(f).fieldnames or []
            missing = [c for c in (image_column, caption_column) if c not in header]
            if missing:
                raise ValueError(f"input: {self.path} has no column {', '.join(map(repr, missing))} "
                                 f"(columns: {', '.join(header) or 'none'}); set image_column/caption_column")

    def _csv_reader(self, f) -> csv.DictReader:
        return csv.DictReader(f, delimiter="\t" if self.kind == "tsv" else ",")

    def size_hint(self) -> int:
        """Rows in the table (non-blank lines; for CSV minus the header): a progress-bar total, not a promise."""
        with self.path.open("rb") as f:
            lines = sum(1 for line in f if line.strip())
        return lines if self.kind == "jsonl" else max(lines - 1, 0)

    def _rows(self) -> Iterator[tuple[int, Optional[dict[str, Any]]]]:
        """(line number, row) pairs; row is None for a line that is not a JSON object."""
        if self.kind == "jsonl":
            with self.path.open("rb") as f:
                for lineno, raw in enumerate(f, start=1):
                    if not raw.strip():
                        continue
                    try:
                        row = json.loads(raw.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        row = None
                    yield lineno, row if isinstance(row, dict) else None
        else:  # undecodable bytes become U+FFFD: the row still counts (e.g. as missing_image), the run goes on
            with self.path.open(newline="", encoding="utf-8-sig", errors="replace") as f:
                reader = self._csv_reader(f)
                for row in reader:
                    yield reader.line_num, row

    def __iter__(self) -> Iterator[Sample]:
        folder = self.path.parent
        name = self.path.name
        for lineno, row in self._rows():
            where = f"{name}:{lineno}"
            image_ref = None if row is None else row.get(self.image_column)
            if row is None or not isinstance(image_ref, str) or not image_ref.strip():
                self.skips.add("bad_row", where)
                continue
            image_ref = image_ref.strip()
            caption = _caption_text(row.get(self.caption_column))
            if not caption and not self.allow_empty_caption:
                self.skips.add("missing_caption", f"{where} {image_ref}")
                continue
            loaded = _read_image(folder / image_ref, self.skips, f"{where} {image_ref}")
            if loaded is None:
                continue
            data, img = loaded
            extra = {k: v for k, v in row.items() if k not in (self.image_column, self.caption_column) and k}
            yield Sample(image=data, caption=caption, extra=extra, source_id=image_ref, decoded=img)



"""Reading tars: grouping members into samples, classifying bad ones, and one source's resumable shard stream.

A *sample* is a run of consecutive tar members sharing a key (``webdataset``'s ``base_plus_ext``: the text
before the first dot of the file name); a member repeating an extension of the run starts the next sample, which
is counted as ``duplicate_key`` and skipped (two adjacent samples with one key: the first is kept, none is lost
uncounted). Samples are numbered ``0, 1, ...`` in each shard, bad ones included,
so ``(shard url, index)`` names a sample for good: a loader state refers to samples that way and a resumed
stream reopens a shard and skips ``offset`` samples (reading tar headers, decoding nothing).

:class:`SourceStream` is one slot's stream over one source: shards of its share for the current pass (see
:mod:`data_pipeline.shardlists`), each opened with ``webdataset.gopen`` (so ``pipe:`` urls work) or ``open``,
yielding :class:`Raw` samples (undecoded bytes plus the cheap facts: caption, json, the pixel member's shape from
its header, probed by its :mod:`~data_pipeline.decoders` entry). At the
end of its share it either returns :data:`PASS_END` (epoch-aligned streams; the pipeline decides what comes
next) or moves on to the next pass by itself (endless streams). A full cycle over a share with no usable sample
raises :class:`DataError` instead of looping forever.
"""

from __future__ import annotations

import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

from data_pipeline.data_config import DataConfig
from data_pipeline.decoders import member_decoder
from data_pipeline.errors import DataError
from data_pipeline.sampletext import json_text_problem, parse_json_object, printable, text_problem
from data_pipeline.shardlists import T_RESAMPLE, ResolvedSource, mix64, shard_order, slot_share
from data_pipeline.stats import Counters, format_counts
from data_pipeline.transforms import array_shape
from data_pipeline.video import latent_window

PASS_END = object()  # sentinel: this slot's share of the pass is read


@dataclass(eq=False)
class Raw:
    """An undecoded sample and where it came from."""

    src: int  # source index
    url: str  # shard url
    index: int  # sample number inside the shard
    visit: int  # the stream's shard-open counter when read (seeds per-sample augmentation draws)
    key: str
    pixel_member: Optional[str]  # extension of the pixel member (picks its decoder), None without image_keys
    pixel_bytes: Optional[bytes]  # that member, still encoded
    shape: Optional[tuple[int, ...]]  # from a header: the pixel member's (h, w) or (frames, h, w); latents-only
    #                                   shards: the latent's shape
    caption: str
    meta: dict
    arrays: dict[str, bytes]  # latent/extra members present, still encoded
    repeat: bool = False  # read again by a wrap-around (its skips were already counted on the first read)


# ------------------------------------------------------------------------------------------------ tar reading


def _error_text(e: Exception) -> str:
    """``'UnidentifiedImageError: cannot identify image file'`` (no object addresses), at most ~120 chars."""
    return f"{type(e).__name__}: {re.sub(r' ?<[^>]* at 0x[0-9a-fA-F]+>', '', str(e))[:100]}"


def open_shard(url: str):
    if url.startswith("pipe:") or "://" in url:
        return gopen(url, "rb")
    return open(url[5:] if url.startswith("file:") else url, "rb", buffering=1 << 20)


def close_shard(fh) -> None:
    """Close a shard stream; a ``pipe:`` process still running (we stopped early) is killed, not waited for."""
    proc = getattr(fh, "proc", None)
    try:
        if proc is not None and proc.poll() is None:
            proc.kill()
            fh.stream.close()
            proc.wait(5)
        else:
            fh.close()
    except Exception:  # noqa: BLE001 - closing a broken stream must not break the loader
        pass


def _exit_status(fh) -> Optional[int]:
    """The exit status of a ``pipe:`` stream's process (None for files or a process still running)."""
    proc = getattr(fh, "proc", None)
    if proc is None:
        return None
    try:
        return proc.wait(10)
    except Exception:  # noqa: BLE001
        return None


def iter_groups(fh, want: Callable[[int], bool]) -> Iterator[tuple]:
    """Samples of an open tar: ``("sample", index, key, members or None)``; ``members`` (``{ext: bytes}``, lower
    case) is read only when ``want(index)``. A read error ends the shard with ``("error", reason, detail)``.

    Two adjacent samples with the same key (``a.jpg a.txt a.jpg a.txt``) would merge into one group, the second
    one's members silently dropped (``webdataset`` does the same). Here a member whose extension the current group
    already holds starts a new group, yielded as ``("duplicate", index, key, members or None)``: it takes a sample
    number like any other and the readers count it as ``duplicate_key`` (the first sample is kept)."""
    try:
        tf = tarfile.open(fileobj=fh, mode="r|*")
    except Exception as e:  # noqa: BLE001
        msg = str(e)
        status = _exit_status(fh)
        if status:
            yield ("error", "unreadable_shard", f"command exited with status {status}")
        else:
            yield ("error", "empty_shard" if "empty file" in msg else "unreadable_shard", msg[:200])
        return
    g, key, members, kind = -1, None, None, "sample"
    seen: set[str] = set()  # member extensions (lower case) of the current group, read or not
    try:
        for ti in tf:
            if not ti.isreg():
                continue
            prefix, suffix = base_plus_ext(ti.name)
            if prefix is None or ti.name.rsplit("/", 1)[-1].startswith("__"):
                continue
            suffix = suffix.lower()
            if prefix != key or suffix in seen:
                if key is not None:
                    yield (kind, g, printable(key), members)
                kind = "duplicate" if prefix == key else "sample"
                g, key = g + 1, prefix
                members = {} if want(g) else None
                seen = set()
            seen.add(suffix)
            if members is not None:
                members[suffix] = tf.extractfile(ti).read()
            tf.members = []
        if key is not None:
            yield (kind, g, printable(key), members)
    except Exception as e:  # noqa: BLE001 - any failure inside a tar is a truncated / damaged tar
        yield ("error", "truncated_tar", f"read error after {max(g, 0)} samples: {str(e)[:200]}")


def read_meta(members: dict[str, bytes]) -> tuple[Optional[dict], str]:
    """``(meta, "")`` from the sample's ``json`` member (``{}`` when it has none), or ``(None, why)`` when the
    member is not a JSON object, or nests deeper than :data:`~data_pipeline.sampletext.MAX_JSON_DEPTH` levels
    (200,000 levels would exhaust the parser's stack: a ``RecursionError``, counted here like any bad json)."""
    if "json" not in members:
        return {}, ""
    return parse_json_object(members["json"])


def text_checks(members: dict[str, bytes], meta: dict, caption: str) -> tuple[Optional[str], str]:
    """``(None, "")`` when the caption and every string of the json can be written back as UTF-8 (a cache shard,
    a tokenizer); else ``("bad_caption" | "bad_json", why)``: a lone surrogate such as ``"\\ud800"`` is valid
    JSON but no valid UTF-8."""
    problem = text_problem(caption)
    if problem:
        return "bad_caption", f"caption {problem}"
    problem = json_text_problem(meta, members["json"]) if "json" in members else ""
    if problem:
        return "bad_json", problem
    return None, ""


def select_caption(caption_keys: list[str], members: dict[str, bytes], meta: dict) -> str:
    """The first non-empty caption among ``caption_keys`` (a member extension such as ``txt``, or ``json:field``
    for a field of the json member), stripped; ``""`` when none has one."""
    for k in caption_keys:
        if k.startswith("json:"):
            v = meta.get(k[5:])
            v = v.strip() if isinstance(v, str) else ""
        else:
            v = members[k].decode("utf-8", errors="replace").strip() if k in members else ""
        if v:
            return v
    return ""


def parse_sample(cfg: DataConfig, key: str, members: dict[str, bytes]) -> tuple[Optional[str], str, dict]:
    """``(skip_reason, detail, fields)``: the cheap checks, in order json → motion score (``low_motion`` below
    ``min_motion_score``) → pixel member → caption (``bad_caption``, then ``bad_json`` for text that cannot be
    written back as UTF-8: :func:`text_checks`) → arrays → header (the pixel member's decoder probes it)."""
    meta, error = read_meta(members)
    if meta is None:
        return "bad_json", error, {}
    if cfg.min_motion_score is not None:  # SVD-style static-scene filter, before any decoding
        score = meta.get("motion_score")  # a sample without a numeric score (an image, an uncurated clip) passes
        if isinstance(score, (int, float)) and not isinstance(score, bool) and score < cfg.min_motion_score:
            return "low_motion", f"motion_score {score:g} < min_motion_score {cfg.min_motion_score:g}", {}
    member = None
    if cfg.image_keys:
        member = next((k for k in cfg.image_keys if k in members), None)
        if member is None:
            kind = member_decoder(cfg.image_keys[0]).kind
            return f"missing_{kind}", f"members: {', '.join(sorted(members)) or 'none'}", {}
    caption = select_caption(cfg.caption_keys, members, meta)
    reason, detail = text_checks(members, meta, caption)
    if reason is not None:
        return reason, detail, {}
    if not caption and cfg.require_caption:
        return "missing_caption", f"none of {', '.join(cfg.caption_keys)}", {}
    arrays = {}
    wanted = ([cfg.latent_key] if cfg.latent_key else []) + list(cfg.extra_keys)
    for ext in wanted:
        if ext in members:
            arrays[ext] = members[ext]
        elif ext in cfg.extra_keys or not cfg.image_keys:
            return "missing_array", f"no {ext} member", {}
    shape = None
    if member is None and cfg.latent_key in arrays:
        try:
            shape = array_shape(arrays[cfg.latent_key], cfg.latent_key)
        except Exception as e:  # noqa: BLE001
            return "bad_array", f"{cfg.latent_key}: {_error_text(e)}", {}
        window = latent_window(cfg, shape)  # a cached clip longer than a training clip: batched as its window
        if window is not None:
            shape = (shape[0], window, *shape[2:])
    if member is not None:
        decoder = member_decoder(member)
        try:
            shape = decoder.probe(members[member], cfg)
        except Exception as e:  # noqa: BLE001 - decoders (PIL) raise many types on garbage bytes
            reason = getattr(e, "reason", None)  # a SkipSample names its reason (audio_only, too_large, ...)
            return reason if isinstance(reason, str) and reason else f"corrupt_{decoder.kind}", _error_text(e), {}
    return None, "", dict(key=key, pixel_member=member, pixel_bytes=None if member is None else members[member],
                          shape=shape, caption=caption, meta=meta, arrays=arrays)


def read_samples(cfg: DataConfig, url: str, wanted: dict[int, list[tuple[int, int, bool]]], counters: Counters
                 ) -> dict[tuple[int, int], Raw]:
    """Re-read the samples ``wanted`` (``{index: [(src, visit, repeat), ...]}``) of one shard, for a resumed
    state; returns ``{(index, visit): Raw}``."""
    out: dict[tuple[int, int], Raw] = {}
    last = max(wanted)
    fh = None
    try:
        fh = open_shard(url)
        for item in iter_groups(fh, lambda g: g in wanted):
            if item[0] == "error":
                break
            kind, g, key, members = item
            if members is not None and kind == "sample":
                reason, _detail, fields = parse_sample(cfg, key, members)
                if reason is None:
                    for src, visit, repeat in wanted[g]:
                        out[(g, visit)] = Raw(src=src, url=url, index=g, visit=visit, repeat=repeat, **fields)
            if g >= last:
                break
    except OSError:
        pass
    finally:
        if fh is not None:
            close_shard(fh)
    missing = sum(len(v) for v in wanted.values()) - len(out)
    if missing:
        counters.drop("resume_missing", missing)
        counters.skip("resume_missing", url, None, f"{missing} buffered sample(s) of the saved state not found")
    return out


# ----------------------------------------------------------------------------------------------- the stream


class SourceStream:
    """One slot's resumable stream of :class:`Raw` samples over one source (see the module docstring)."""

    def __init__(self, cfg: DataConfig, source: ResolvedSource, src: int, seed: int, slot: int, n_slots: int,
                 counters: Counters, endless: bool, where: str = ""):
        self.cfg, self.source, self.src, self.seed = cfg, source, src, seed
        self.slot, self.n_slots = slot, n_slots
        self.counters, self.endless, self.where = counters, endless, where
        self.resampled = cfg.resampled
        # state (see snapshot())
        self.pass_ = 0  # pass over the source (one shard order per pass)
        self.cycle = 0  # times this pass's share was restarted because the rank needed more (wrap-around)
        self.pos = 0  # next position in this slot's share of the pass
        self.cur: Optional[int] = None  # shard (index into source.urls) being read
        self.offset = 0  # samples of `cur` already consumed
        self.gbase = 0  # samples in earlier shards of this pass (for the modulo split)
        self.opens = 0  # shards opened so far
        self.visit = 0  # `opens` value of the shard being read
        self.draws = 0  # resampled: shards drawn so far
        self.ended = False  # the share of this pass is read (PASS_END returned)
        self.usable = 0  # usable samples in this cycle
        self.cycle_skips: Counter[str] = Counter()  # skips in this cycle, for the nothing-usable error
        self.since_usable = 0  # resampled: shards opened since the last usable sample
        self._it: Optional[Iterator] = None
        self._fh = None
        self._shard_error = False
        self._share_cache: Optional[tuple[int, list[int], bool]] = None

    # -- state

    def snapshot(self) -> dict:
        return {"pass": self.pass_, "cycle": self.cycle, "pos": self.pos, "cur": self.cur, "offset": self.offset,
                "gbase": self.gbase, "opens": self.opens, "visit": self.visit, "draws": self.draws,
                "ended": self.ended, "usable": self.usable, "cycle_skips": dict(self.cycle_skips),
                "since_usable": self.since_usable}

    def restore(self, d: dict) -> None:
        self.close()
        self.pass_, self.cycle, self.pos = int(d["pass"]), int(d["cycle"]), int(d["pos"])
        self.cur = None if d["cur"] is None else int(d["cur"])
        self.offset, self.gbase = int(d["offset"]), int(d["gbase"])
        self.opens, self.visit, self.draws = int(d["opens"]), int(d["visit"]), int(d["draws"])
        self.ended, self.usable = bool(d["ended"]), int(d["usable"])
        self.cycle_skips = Counter(d.get("cycle_skips", {}))
        self.since_usable = int(d.get("since_usable", 0))

    # -- share of a pass

    def share(self) -> tuple[list[int], bool]:
        if self._share_cache is None or self._share_cache[0] != self.pass_:
            order = shard_order(len(self.source.urls), self.seed, self.src, self.pass_, self.cfg.shard_shuffle)
            share, modulo = slot_share(order, self.slot, self.n_slots)
            self._share_cache = (self.pass_, share, modulo)
        return self._share_cache[1], self._share_cache[2]

    def remaining_known(self) -> int:
        """Samples of this pass's share not read yet (from the index; 0 where unknown)."""
        if self.resampled or self.ended:
            return 0
        share, modulo = self.share()
        counts = self.source.counts
        left = sum(counts[i] or 0 for i in share[self.pos:])
        if self.cur is not None:
            left += max(0, (counts[self.cur] or 0) - self.offset)
        return left // self.n_slots if modulo else left

    # -- moving between passes

    def _nothing_usable(self, n_shards: int) -> DataError:
        return DataError(f"all {n_shards} shards of source {self.source.name!r}{self.where} produced 0 usable "
                         f"samples: {format_counts(dict(self.cycle_skips))}")

    def _reset_cycle(self) -> None:
        self.close()
        self.pos, self.cur, self.offset, self.gbase = 0, None, 0, 0
        self.ended, self.usable = False, 0
        self.cycle_skips.clear()

    def next_cycle(self) -> None:
        """Read this pass's share again (the rank needs more samples than its share held)."""
        if self.usable == 0:
            raise self._nothing_usable(len(self.share()[0]))
        self._reset_cycle()
        self.cycle += 1

    def begin_pass(self, pass_: int) -> None:
        """Jump to the start of pass ``pass_`` (abandoning what is left of the current one)."""
        self._reset_cycle()
        self.pass_, self.cycle = pass_, 0

    def close(self) -> None:
        self._it = None
        if self._fh is not None:
            close_shard(self._fh)
            self._fh = None

    # -- reading

    def _next_shard(self) -> bool:
        """Pick the next shard into ``cur``; False when the share of this pass is done (or the pass advanced)."""
        n = len(self.source.urls)
        if self.resampled:
            if self.since_usable > 2 * n + 8:
                raise DataError(f"source {self.source.name!r}{self.where}: {self.since_usable} shards drawn "
                                f"in a row produced 0 usable samples: {format_counts(dict(self.cycle_skips))}")
            self.cur = mix64(self.seed, T_RESAMPLE, self.src, self.slot, self.draws) % n
            self.draws += 1
            self.since_usable += 1
        else:
            share, _ = self.share()
            if self.pos >= len(share):
                if not self.endless:
                    self.ended = True
                    return False
                if self.usable == 0:
                    raise self._nothing_usable(len(share))
                self._reset_cycle()
                self.pass_ += 1
                return False
            self.cur = share[self.pos]
            self.pos += 1
        self.offset = 0
        self.opens += 1
        self.visit = self.opens
        return True

    def _open(self) -> None:
        url = self.source.urls[self.cur]  # type: ignore[index]
        skip, gbase = self.offset, self.gbase
        modulo = not self.resampled and self.share()[1]
        slot, n_slots = self.slot, self.n_slots

        def want(g: int) -> bool:
            return g >= skip and (not modulo or (gbase + g) % n_slots == slot)

        self._shard_error = False
        try:
            self._fh = open_shard(url)
        except Exception as e:  # noqa: BLE001
            self._fh = None
            self._it = iter([("error", "unreadable_shard", str(e)[:200])])
            return
        self._it = iter_groups(self._fh, want)

    def _finish_shard(self) -> None:
        url = self.source.urls[self.cur]  # type: ignore[index]
        expected = self.source.counts[self.cur]  # type: ignore[index]
        if not self._shard_error:
            if self.offset == 0 and not expected:
                self._skip("empty_shard", url, None, "no samples")
            elif expected is not None and self.offset < expected:
                self._skip("truncated_tar", url, None, f"ended after {self.offset} of {expected} samples")
        self.close()
        self.gbase += self.offset
        self.cur, self.offset = None, 0

    def _skip(self, reason: str, url: str, key: Optional[str], detail: str) -> None:
        if self.cycle == 0:  # a wrap-around re-reads the same bad data: count it once per pass
            self.counters.skip(reason, url, key, detail)
        self.cycle_skips[reason] += 1

    def pull(self):
        """The next usable :class:`Raw` of this stream, or :data:`PASS_END`."""
        while True:
            if self.ended:
                return PASS_END
            if self._it is None:
                if self.cur is None and not self._next_shard():
                    continue
                self._open()
            item = next(self._it, None)  # type: ignore[arg-type]
            if item is None:
                self._finish_shard()
                continue
            url = self.source.urls[self.cur]  # type: ignore[index]
            if item[0] == "error":
                self._shard_error = True
                self._skip(item[1], url, None, item[2])
                continue
            kind, g, key, members = item
            self.offset = g + 1
            if members is None:
                continue
            if kind == "duplicate":
                self._skip("duplicate_key", url, key, "same key as the sample before it, which is kept")
                continue
            reason, detail, fields = parse_sample(self.cfg, key, members)
            if reason is not None:
                self._skip(reason, url, key, detail)
                continue
            self.usable += 1
            self.since_usable = 0
            if self.cycle > 0:
                self.counters.repeated += 1
            return Raw(src=self.src, url=url, index=g, visit=self.visit, repeat=self.cycle > 0, **fields)

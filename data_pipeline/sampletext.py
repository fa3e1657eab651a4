"""Sample text that can be parsed and written back: json side-cars and captions, checked before they travel.

A sample's json member (or a folder's side-car ``.json``, or a table row) is valid JSON that may still break what
comes after reading it:

* nesting so deep that Python's parser (or ``json.dumps``, or pickling the batch to the main process) runs out of
  stack: ``[[[...]]]`` 200,000 levels deep raises ``RecursionError``, which is not a ``ValueError``;
* a string holding a lone UTF-16 surrogate (``"\\ud800"`` is valid JSON; ``json.loads`` returns ``'\\ud800'``),
  which every later ``str.encode("utf-8")`` refuses with ``UnicodeEncodeError``: the caption's ``.txt`` member
  and the json of a cache shard, a caption handed to a tokenizer.

:func:`parse_json_object` turns both parse failures and nesting deeper than :data:`MAX_JSON_DEPTH` into a reason
string (the callers count the sample as ``bad_json`` / ``bad_metadata`` / ``bad_row``); :func:`text_problem` and
:func:`json_text_problem` find strings that cannot be written as UTF-8 (``bad_caption`` for the caption,
``bad_json`` for any other field); :func:`encode_json` is the writer's one way to turn a sample's json into bytes,
raising :class:`~data_pipeline.errors.SkipSample` instead of an exception that would end a run.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Optional, Union

from data_pipeline.errors import SkipSample

MAX_JSON_DEPTH = 64  # deepest nesting of arrays/objects accepted in a sample's json (far below the stack's limit)
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # how a surrogate is spelt in JSON text (strict UTF-8 has none)


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects nest deeper than ``limit`` in ``value`` (an iterative walk: no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json_object(raw: Union[bytes, str], max_depth: int = MAX_JSON_DEPTH) -> tuple[Optional[dict], str]:
    """``(object, "")`` for JSON text holding an object nested at most ``max_depth`` levels, else ``(None, why)``:
    not UTF-8, not JSON, not an object, or nested too deep (including deep enough to exhaust the parser's stack)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        return None, f"arrays/objects nested too deep for the parser (the limit is {max_depth} levels)"
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        return None, str(e)[:100]
    if not isinstance(value, dict):
        return None, f"a {type(value).__name__}, not an object"
    opening = raw.count(b"[" if isinstance(raw, bytes) else "[") + raw.count(b"{" if isinstance(raw, bytes) else "{")
    if opening > max_depth and _depth_exceeds(value, max_depth):  # fewer brackets than the limit: cannot be deeper
        return None, f"arrays/objects nested deeper than {max_depth} levels"
    return value, ""


def text_problem(text: str) -> str:
    """``""`` when ``text`` can be written as UTF-8; else what is wrong (a lone surrogate and where it is)."""
    if text.isascii():
        return ""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"holds a lone surrogate U+{ord(text[e.start]):04X} at character {e.start}"
    return ""


def printable(text: str) -> str:
    """``text`` with what cannot be written as UTF-8 spelt out: a name's bytes that are not UTF-8 (which ``tarfile``
    and ``os`` keep as lone surrogates, ``surrogateescape``) as ``\\xNN``; any other lone surrogate as
    ``\\udNNN``. Keys and urls go through it before they are logged or written into a shard's json."""
    if not text_problem(text):
        return text
    raw = text.encode("utf-8", "surrogateescape") if all(
        not 0xD800 <= ord(c) <= 0xDFFF or 0xDC80 <= ord(c) <= 0xDCFF for c in text) else None
    if raw is not None:
        return raw.decode("utf-8", "backslashreplace")
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def json_text_problem(value: Any, raw: Optional[bytes] = None) -> str:
    """``""`` when every string of a parsed JSON ``value`` (keys included) can be written as UTF-8; else which field
    is not and why. ``raw``, the JSON text it was parsed from, skips the walk when it spells no surrogate."""
    if raw is not None and not _SURROGATE_ESCAPE.search(raw):
        return ""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            problem = text_problem(item)
            if problem:
                return f"{path or 'the value'} {problem}"
        elif isinstance(item, dict):
            for k, v in item.items():
                name = f"{path}.{k}" if path else str(k)
                if isinstance(k, str) and text_problem(k):
                    return f"a key of {path or 'the object'} {text_problem(k)}"
                stack.append((v, name))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
    return ""


def encode_json(meta: dict, default: Optional[Callable[[Any], Any]] = None) -> bytes:
    """``meta`` as the UTF-8 bytes of a shard's json member (keys sorted, non-ASCII kept); raises
    :class:`~data_pipeline.errors.SkipSample` ``bad_json`` when it cannot be written (a lone surrogate, nesting
    deeper than :data:`MAX_JSON_DEPTH`, keys that do not sort)."""
    if _depth_exceeds(meta, MAX_JSON_DEPTH):
        raise SkipSample("bad_json", f"arrays/objects nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.dumps(meta, ensure_ascii=False, sort_keys=True, default=default).encode("utf-8")
    except UnicodeEncodeError:
        raise SkipSample("bad_json", json_text_problem(meta) or "a string that is not valid UTF-8") from None
    except (TypeError, ValueError, RecursionError) as e:
        raise SkipSample("bad_json", f"{type(e).__name__}: {str(e)[:100]}") from None


__all__ = ["MAX_JSON_DEPTH", "encode_json", "json_text_problem", "parse_json_object", "printable", "text_problem"]

"""Canonical JSON for every payload turnbuckle stores.

Payloads (task params, results, metadata) are plain JSON values. They are checked before they
reach any store, by the same code for every adapter, so a payload the in-memory store accepts is
one the SQLite store accepts too:

- only ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` and ``dict`` with ``str``
  keys; a tuple, a set, bytes, a non-string key, NaN or a lone surrogate is refused with
  :class:`~turnbuckle.errors.PayloadNotSerializable` naming the path of the bad value (``$.a[2]``),
  because ``json`` would otherwise coerce or mangle it silently;
- the encoded form is canonical (sorted keys, no spaces, UTF-8), so equal values give equal
  bytes, which stable hashes rely on;
- the encoded size is checked against a limit before any IO (:class:`PayloadTooLarge`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from typing import Any, Final, NoReturn, TypeAlias

from turnbuckle.errors import InvalidArgument, PayloadNotSerializable, PayloadTooLarge

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "JSON",
    "check_int64",
    "check_text",
    "decode_json",
    "encode_json",
    "sequence",
]

JSON: TypeAlias = "bool | int | float | str | list[JSON] | dict[str, JSON] | None"

#: Default limit for one encoded payload; stores take ``max_payload_bytes`` to change it.
DEFAULT_MAX_PAYLOAD_BYTES = 1 << 20

_INT64_MAX = (1 << 63) - 1


def _is_plain(item: Any, depth: int = 0) -> bool:
    """True if ``item`` is plain JSON by type and depth (the fast check: no paths, and strings
    are checked once, in the encoded text)."""
    # Exact type checks on purpose: a bool is fine, but an IntEnum or a str subclass would be
    # stored as its base value and come back as something else. A cycle runs into the depth
    # limit, and the slow walk then names it.
    kind = type(item)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(item)
    if depth >= MAX_DEPTH:
        return False
    if kind is dict:
        for key, value in item.items():
            if type(key) is not str or (
                type(value) not in _SCALARS and not _is_plain(value, depth + 1)
            ):
                return False
        return True
    if kind is list:
        return all(type(value) in _SCALARS or _is_plain(value, depth + 1) for value in item)
    return False


_SCALARS: Final = frozenset({type(None), bool, int, str})


def _raise_where(value: object) -> NoReturn:
    """Walk ``value`` again, with paths, and raise for the first part that is not plain JSON."""
    _find_bad("$", value, set(), 0)
    raise PayloadNotSerializable("$", type(value).__name__, "rejected by the JSON encoder")


def _find_bad(path: str, item: Any, ancestors: set[int], depth: int) -> None:
    kind = type(item)
    if kind is str:
        _check_text(path, item)
    elif kind is float and not math.isfinite(item):
        raise PayloadNotSerializable(path, "float", f"{item!r} has no JSON form")
    elif kind is list or kind is dict:
        if id(item) in ancestors:
            raise PayloadNotSerializable(path, kind.__name__, "it contains itself")
        if depth >= MAX_DEPTH:
            raise PayloadNotSerializable(path, kind.__name__, f"nested over {MAX_DEPTH} deep")
        ancestors.add(id(item))
        if kind is list:
            for i, v in enumerate(item):
                _find_bad(f"{path}[{i}]", v, ancestors, depth + 1)
        else:
            for key, v in item.items():
                if type(key) is not str:
                    raise PayloadNotSerializable(
                        path, type(key).__name__, f"object key {key!r} is not a str"
                    )
                _check_text(path, key)
                _find_bad(f"{path}.{key}", v, ancestors, depth + 1)
        ancestors.discard(id(item))
    elif kind not in _SCALARS and kind is not float:
        raise PayloadNotSerializable(path, kind.__name__, "not a JSON type")


#: Deepest nesting a payload may have (the JSON encoder and decoder recurse).
MAX_DEPTH: Final = 200


def _check_text(path: str, text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadNotSerializable(path, "str", "contains a lone surrogate") from exc


_ENCODER: Final = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":")
)


def encode_json(value: object, *, limit: int = DEFAULT_MAX_PAYLOAD_BYTES) -> str:
    """Encode a plain JSON value canonically.

    Raises:
        PayloadNotSerializable: ``value`` holds something that is not plain JSON.
        PayloadTooLarge: the UTF-8 encoding is longer than ``limit`` bytes.
    """
    if not _is_plain(value):
        _raise_where(value)
    try:
        text = _ENCODER.encode(value)
        size = len(text.encode("utf-8"))
    except (ValueError, RecursionError):  # a cycle, a lone surrogate, or deep nesting
        _raise_where(value)
    if size > limit:
        raise PayloadTooLarge(size, limit)
    return text


def decode_json(text: str) -> JSON:
    """Decode JSON text made by :func:`encode_json`.

    Raises:
        ValueError: the text is not valid JSON (callers turn this into ``CorruptRecordError``).
    """
    value: JSON = _DECODER.decode(text)
    return value


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def check_text(
    name: str, value: object, *, optional: bool = False, limit: int | None = None
) -> None:
    """Check that ``value`` is a str SQLite and JSON can store (None too, if ``optional``),
    of at most ``limit`` UTF-8 bytes if a limit is given.

    Raises:
        InvalidArgument: not a str, or it holds a lone surrogate.
        PayloadTooLarge: it is longer than ``limit`` bytes.
    """
    if value is None and optional:
        return
    if type(value) is not str:
        raise InvalidArgument(f"{name} must be a str, got {value!r}")
    try:
        encoded = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{name} contains a lone surrogate") from None
    if limit is not None and len(encoded) > limit:
        raise PayloadTooLarge(len(encoded), limit)


def check_int64(name: str, value: object, *, minimum: int = 0) -> int:
    """Return ``value`` if it is an int in ``[minimum, 2**63-1]``.

    Raises:
        InvalidArgument: it is not an int (bools included) or is out of range.
    """
    if type(value) is not int or not minimum <= value <= _INT64_MAX:
        raise InvalidArgument(f"{name} must be an int from {minimum} to 2**63-1, got {value!r}")
    return value


def sequence(items: object) -> tuple[Any, ...]:
    """The converter of every sequence field of a record: any iterable becomes a tuple, so a
    frozen record cannot hide a mutable list; anything else is refused at construction.

    Raises:
        InvalidArgument: not iterable, or a str, bytes or mapping (iterable, but surely not the
            sequence meant: ``payloads="hi"`` would become two one-letter payloads).
    """
    if isinstance(items, str | bytes | bytearray | Mapping) or not isinstance(items, Iterable):
        raise InvalidArgument(
            f"expected a sequence (a list or tuple), got {type(items).__name__} {items!r:.80}"
        )
    return tuple(items)

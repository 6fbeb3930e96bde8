"""The protobuf wire format, as much of it as OTLP spans need, written by hand.

Why not the generated ``opentelemetry-proto`` classes (or the SDK's encoder,
which builds them): building one message object per attribute cost about
0.2 ms per span of ~32 attributes, most of the agent's export CPU, while
almost every attribute value repeats from one exchange to the next (method,
route, status, addresses, ports of a connection). Here, encoded bytes are
cached per attribute set and reused; only what is new is encoded. The output
is plain OTLP: tests decode it with the ``opentelemetry-proto`` classes and
compare it with what the SDK's encoder makes of the same spans.

Encoding rules used (https://protobuf.dev/programming-guides/encoding/): a
field is a tag ``number << 3 | wire type`` then the value; wire type 0 is a
varint, 1 a little-endian fixed64, 2 a length-prefixed run of bytes (strings,
bytes, sub-messages), 5 a fixed32. A negative int64 is its two's complement
as a 10-byte varint.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

# Varints of 0 .. 2^14-1 (one or two bytes): most ports, sizes, durations.
_SMALL = [bytes((i,)) for i in range(0x80)] + [
    bytes((i & 0x7F | 0x80, i >> 7)) for i in range(0x80, 0x4000)
]
_DOUBLE = struct.Struct("<d")


def varint(n: int) -> bytes:
    if 0 <= n < 0x4000:
        return _SMALL[n]
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def tag(number: int, wire_type: int) -> bytes:
    return varint(number << 3 | wire_type)


def field(tag_bytes: bytes, payload: bytes) -> bytes:
    """A length-delimited field: sub-message, string or bytes."""
    return tag_bytes + varint(len(payload)) + payload


# AnyValue (common.proto): string 1, bool 2, int 3, double 4, array 5.
_STRING, _BOOL, _INT, _DOUBLE_TAG, _ARRAY = b"\x0a", b"\x10", b"\x18", b"\x21", b"\x2a"
# KeyValue: key 1, value 2; ArrayValue: values 1.
_KEY, _VALUE, _ARRAY_VALUES = b"\x0a", b"\x12", b"\x0a"


def any_value(value: Any) -> bytes:
    """An AnyValue message body, typed as the SDK's encoder types it."""
    if isinstance(value, bool):
        return _BOOL + (b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _INT + varint(value)
    if isinstance(value, float):
        return _DOUBLE_TAG + _DOUBLE.pack(value)
    if isinstance(value, str):
        return field(_STRING, value.encode())
    if isinstance(value, bytes):
        return field(b"\x3a", value)
    if isinstance(value, list | tuple):
        items = b"".join(field(_ARRAY_VALUES, any_value(v)) for v in value)
        return field(_ARRAY, items)
    raise TypeError(f"unsupported attribute value type {type(value).__name__}")


def key_value(field_tag: bytes, key: str, value: Any) -> bytes:
    """One attribute as a repeated KeyValue field (``field_tag``) of its message."""
    return field(field_tag, field(_KEY, key.encode()) + field(_VALUE, any_value(value)))


def attributes(field_tag: bytes, attrs: Iterable[tuple[str, Any]]) -> bytes:
    """Attribute fields, uncached (None values are left out, as the SDK does)."""
    return b"".join(key_value(field_tag, k, v) for k, v in attrs if v is not None)


class AttributeEncoder:
    """Encodes attribute dicts as repeated KeyValue fields, reusing what it encoded before.

    Most attribute values repeat from one call to the next, so values are
    encoded in groups, each group's bytes cached by its values: one tuple
    and one dict lookup stand for many attributes. Keys in ``alone`` (a
    path, a duration, a byte count: new on most calls) are encoded one by
    one; each set in ``together`` (a connection's address and port: new
    per connection, then repeated) is its own group; all other keys form
    one group. The grouping is planned once per key tuple (the dicts of one
    protocol share their keys, in order) and kept too. Every cache is
    cleared when full: the input is unbounded.

    Values are cached by equality, and ``True == 1 == 1.0`` in Python; so a
    group's cache key holds the value types too.
    """

    def __init__(
        self,
        field_tag: bytes,
        together: Iterable[Iterable[str]] = (),
        alone: Iterable[str] = (),
        exclude: Iterable[str] = (),
        max_entries: int = 8192,
    ) -> None:
        self.field_tag = field_tag
        self.together = [frozenset(g) for g in together]
        self.alone = frozenset(alone)
        self.exclude = frozenset(exclude)
        self.max_entries = max_entries
        self._plans: dict[tuple[str, ...], _Plan] = {}
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._single: dict[str, Callable[[Any], bytes]] = {}

    def encode(self, attrs: Mapping[str, Any]) -> bytes:
        keys = tuple(attrs)
        plan = self._plans.get(keys)
        if plan is None:
            if len(self._plans) >= self.max_entries:
                self._plans.clear()
            plan = self._plans[keys] = self._plan(keys)
        try:
            blocks = [group.encode(attrs) for group in plan.groups]
        except TypeError:
            # A list value (parsers may give string arrays): not cacheable.
            return attributes(self.field_tag, ((k, attrs[k]) for k in plan.keys))
        if plan.alone:
            blocks += [enc(v) for k, enc in plan.alone if (v := attrs[k]) is not None]
        return b"".join(blocks)

    def _plan(self, keys: tuple[str, ...]) -> _Plan:
        kept = tuple(k for k in keys if k not in self.exclude)
        rest = tuple(k for k in kept if k not in self.alone)
        groups = []
        for together in self.together:
            members = tuple(k for k in rest if k in together)
            if members:
                groups.append(self._group(members))
                rest = tuple(k for k in rest if k not in together)
        if rest:
            groups.append(self._group(rest))
        alone = tuple((k, self._value_encoder(k)) for k in kept if k in self.alone)
        return _Plan(kept, tuple(groups), alone)

    def _group(self, keys: tuple[str, ...]) -> _Group:
        # Shared by every plan with the same keys: one cache, not one per plan.
        group = self._groups.get(keys)
        if group is None:
            group = self._groups[keys] = _Group(self.field_tag, keys, self.max_entries)
        return group

    def _value_encoder(self, key: str) -> Callable[[Any], bytes]:
        enc = self._single.get(key)
        if enc is None:
            enc = self._single[key] = value_encoder(self.field_tag, key, self.max_entries)
        return enc


@dataclass(frozen=True, slots=True)
class _Plan:
    keys: tuple[str, ...]
    groups: tuple[_Group, ...]
    alone: tuple[tuple[str, Callable[[Any], bytes]], ...]


class _Group:
    """Attributes encoded together, cached by their values (and the values' types)."""

    __slots__ = ("blocks", "field_tag", "get", "keys", "max_entries")

    def __init__(self, field_tag: bytes, keys: tuple[str, ...], max_entries: int) -> None:
        self.field_tag = field_tag
        self.keys = keys
        self.max_entries = max_entries
        self.get = itemgetter(*keys) if len(keys) > 1 else _one(keys[0])
        self.blocks: dict[tuple[Any, ...], bytes] = {}

    def encode(self, attrs: Mapping[str, Any]) -> bytes:
        values = self.get(attrs)
        key = (values, tuple(map(type, values)))
        block = self.blocks.get(key)  # TypeError on a list value: the caller's case
        if block is None:
            if len(self.blocks) >= self.max_entries:
                self.blocks.clear()
            block = self.blocks[key] = attributes(
                self.field_tag, zip(self.keys, values, strict=True)
            )
        return block


def _one(key: str) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    return lambda attrs: (attrs[key],)


def value_encoder(field_tag: bytes, key: str, max_values: int) -> Callable[[Any], bytes]:
    """A function encoding ``key``'s values as KeyValue fields, its constant part kept.

    What precedes the AnyValue body (tag, lengths, the key) depends only on
    the body's length, so it is made once per length. Strings and integers
    often come back (a peer's address, a common size): their fields are kept,
    a bounded number of them; other types (bool, float) are not, as they
    compare equal to integers.
    """
    key_field = field(_KEY, key.encode())
    heads: dict[int, bytes] = {}
    done: dict[str | int, bytes] = {}

    def encode(value: Any) -> bytes:
        cls = value.__class__
        cacheable = cls is str or cls is int
        if cacheable:
            hit = done.get(value)
            if hit is not None:
                return hit
        body = _INT + varint(value) if cls is int and value >= 0 else any_value(value)
        n = len(body)
        head = heads.get(n)
        if head is None:
            inner = len(key_field) + 1 + len(varint(n)) + n
            head = heads[n] = field_tag + varint(inner) + key_field + _VALUE + varint(n)
        out = head + body
        if cacheable:
            if len(done) >= max_values:
                done.clear()
            done[value] = out
        return out

    return encode

"""``server.strict_json``'s check for a key written twice, against the standard library's reading of every pair."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.strict_json import colons_outside_strings, holds_keys, repeats_a_key, strict_json

# texts rich in what can fool a count of colons: colons, quotes, backslashes, escapes of each
TRICKY = st.text(alphabet=st.sampled_from(':"\\/ \u00e9\u20ac\U0001F600ab\n'), max_size=12)
KEYS = st.sampled_from(["text", "texts", ":", '"', "\\", "a:b", 'q"', "\u00e9"])


def members(values: st.SearchStrategy) -> st.SearchStrategy:
    """An object's members as pairs, keys often repeated."""
    return st.lists(st.tuples(KEYS, values), max_size=4)


VALUES = st.recursive(st.one_of(TRICKY, st.integers(), st.none(), st.booleans()),
                      lambda inner: st.one_of(st.lists(inner, max_size=3), members(inner)), max_leaves=12)


def written(value, ensure_ascii: bool) -> str:
    """``value`` as JSON, its members (lists of pairs) written as objects pair by pair, repeats kept."""
    if isinstance(value, list) and value and all(isinstance(v, tuple) for v in value):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=ensure_ascii)}: {written(v, ensure_ascii)}"
                               for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(written(v, ensure_ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ensure_ascii)


def keys_held(value) -> int:
    """The keys of a parsed document's objects, counted the obvious way."""
    if isinstance(value, dict):
        return len(value) + sum(keys_held(v) for v in value.values())
    return sum(keys_held(v) for v in value) if isinstance(value, list) else 0


@settings(max_examples=400, deadline=None)
@given(members(VALUES), st.booleans())
def test_a_repeated_key_is_found_exactly_where_the_standard_reader_sees_one(document, ensure_ascii):
    body = written(document, ensure_ascii).encode()
    pairs_seen = []
    json.loads(body, object_pairs_hook=lambda pairs: pairs_seen.append(pairs) or dict(pairs))
    repeated = any(len({k for k, _ in pairs}) < len(pairs) for pairs in pairs_seen)
    keys = sum(len(pairs) for pairs in pairs_seen)
    assert repeats_a_key(body, orjson.loads(body)) == repeated
    assert colons_outside_strings(body) == keys
    read = orjson.loads(body)
    held = keys_held(read)
    assert holds_keys(read, held) and not holds_keys(read, held + 1)
    if repeated:
        with pytest.raises(ValueError, match="is sent twice in one object"):
            strict_json(body)
    else:
        assert strict_json(body) == json.loads(body)


def test_a_document_nested_past_pythons_stack_is_walked_without_recursion():
    """orjson reads 1,000 levels, where a recursive walk ran out of stack: a 500 on v2 (red team helper-102)."""
    deep = orjson.loads(b'{"a": ' + b"[" * 1000 + b'{"b": 1, "c": 2}' + b"]" * 1000 + b"}")
    assert holds_keys(deep, 3) and not holds_keys(deep, 4)


@pytest.mark.parametrize("number", [b"1e999", b"-1e400", b"1" * 400 + b".0"])
def test_a_number_past_a_floats_range_is_refused_as_infinity_is(number):
    """``json.loads`` read it as ``inf`` without asking ``parse_constant``."""
    with pytest.raises(ValueError, match="too large for a 64-bit float"):
        strict_json(b'{"a": ' + number + b"}")


def test_the_refusal_names_the_key_as_it_reads_once_unescaped():
    with pytest.raises(ValueError, match="the key 'text' is sent twice"):
        strict_json(b'{"inputs": [{"t\\u0065xt": 1, "text": 2}]}')

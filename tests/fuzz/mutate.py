"""Byte-level mutations of valid inputs, shared by the hypothesis tests and the long runs (tests/fuzz/run.py).

A mutation is a list of operations applied in order to a seed: flip a bit, set a byte, cut the input short,
insert or delete bytes, swap two ranges, or set a known field (a length, a count, a version) to an extreme
value. ``Field`` names where a format keeps such a field; each target lists its own (tests/fuzz/targets.py).
"""
from __future__ import annotations

import random
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Field:
    """An unsigned little-endian integer at ``offset`` of ``size`` bytes (1, 2, 4 or 8)."""
    name: str
    offset: int
    size: int


_FORMATS = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}


def extremes(size: int) -> list[int]:
    top = (1 << (8 * size)) - 1
    return [0, 1, 2, 0x7F, 0x80, 0xFF, 4095, 4096, 4097, 1 << 20, 1 << 30, 1 << 31, (1 << 32) - 1, 1 << 32,
            1 << 62, 1 << 63, top >> 1, top - 1, top]


def set_field(data: bytearray, field: Field, value: int) -> None:
    if field.offset + field.size <= len(data):
        struct.pack_into(_FORMATS[field.size], data, field.offset, value & ((1 << (8 * field.size)) - 1))


def apply(seed: bytes, ops: list[tuple], fields: list[Field] = ()) -> bytes:
    """``ops``: tuples ("flip", pos, bit) | ("set", pos, byte) | ("cut", length) | ("insert", pos, bytes) |
    ("delete", pos, length) | ("swap", a, b, length) | ("field", index, value); positions are taken modulo the
    current length, field indices modulo ``len(fields)``."""
    data = bytearray(seed)
    for op in ops:
        kind = op[0]
        n = len(data)
        if kind == "flip" and n:
            data[op[1] % n] ^= 1 << (op[2] % 8)
        elif kind == "set" and n:
            data[op[1] % n] = op[2] & 0xFF
        elif kind == "cut":
            del data[op[1] % (n + 1):]
        elif kind == "insert":
            pos = op[1] % (n + 1)
            data[pos:pos] = op[2]
        elif kind == "delete" and n:
            pos = op[1] % n
            del data[pos:pos + op[2]]
        elif kind == "swap" and n:
            a, b, length = op[1] % n, op[2] % n, op[3]
            length = max(0, min(length, n - a, n - b))
            if length:
                first, second = bytes(data[a:a + length]), bytes(data[b:b + length])
                data[b:b + length] = first
                data[a:a + length] = second
        elif kind == "field" and fields:
            set_field(data, fields[op[1] % len(fields)], op[2])
    return bytes(data)


def random_ops(rng: random.Random, fields: list[Field] = (), max_ops: int = 4) -> list[tuple]:
    """Random operations for ``apply`` (the long runs' mutator when atheris is not used)."""
    ops = []
    for _ in range(rng.randint(1, max_ops)):
        kind = rng.choice(("flip", "flip", "set", "cut", "insert", "delete", "swap", "field", "field"))
        if kind == "flip":
            ops.append(("flip", rng.getrandbits(32), rng.randrange(8)))
        elif kind == "set":
            ops.append(("set", rng.getrandbits(32), rng.choice((0, 0xFF, 0x7F, 0x80, rng.randrange(256)))))
        elif kind == "cut":
            ops.append(("cut", rng.getrandbits(32)))
        elif kind == "insert":
            ops.append(("insert", rng.getrandbits(32), rng.randbytes(rng.choice((1, 2, 4, 8, 64)))))
        elif kind == "delete":
            ops.append(("delete", rng.getrandbits(32), rng.choice((1, 2, 4, 8, 64))))
        elif kind == "swap":
            ops.append(("swap", rng.getrandbits(32), rng.getrandbits(32), rng.choice((1, 4, 8, 64))))
        elif fields:
            ops.append(("field", rng.randrange(len(fields)), rng.choice(extremes(8) + [rng.getrandbits(64)])))
    return ops


# --- structure-aware: a decoded tree (msgpack or JSON) with one node changed --------------------------------------

HOSTILE_VALUES = [0, -1, 1, 4096, 4095, (1 << 63) - 1, -(1 << 63), (1 << 64) - 1, 1 << 32, (1 << 32) - 1,
                  True, False, None, "", "x", "0" * 32, "f" * 32, "../../etc/passwd", "\0", "é", "\ud800",
                  b"", b"\0" * 8, [], {}, [0], {"": 0}, 1.5]


def paths(tree, prefix=()):
    """Every node's path (keys and indices) in a tree of dicts and lists, the root first."""
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from paths(v, prefix + (i,))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def mutate_tree(tree, rng: random.Random, values=HOSTILE_VALUES):
    """A copy of ``tree`` with one node replaced by a hostile value, removed, duplicated, or given an extra key."""
    import copy
    tree = copy.deepcopy(tree)
    all_paths = list(paths(tree))
    path = rng.choice(all_paths)
    kind = rng.choice(("replace", "replace", "replace", "remove", "add", "grow", "neighbour"))
    value = rng.choice(values) if rng.random() < 0.8 else rng.getrandbits(rng.choice((8, 16, 32, 63, 64)))
    if not path:
        return value if kind == "replace" else tree
    parent, key = _get(tree, path[:-1]), path[-1]
    if kind == "replace":
        parent[key] = value
    elif kind == "remove":
        del parent[key]
    elif kind == "add" and isinstance(parent, dict):
        parent[rng.choice(("extra", key + "_" if isinstance(key, str) else "k", ""))] = value
    elif kind == "grow" and isinstance(parent, list):
        parent.insert(key, copy.deepcopy(parent[key]))
    elif kind == "neighbour":  # a sibling's value in this place: right shape, wrong meaning (or wrong type)
        other = rng.choice(all_paths)
        if other and other[:len(path)] != path and path[:len(other)] != other:
            parent[key] = copy.deepcopy(_get(tree, other))
    return tree

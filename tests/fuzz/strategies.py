"""Hypothesis strategies for the fuzz suite: mutations of the real seeds (tests/fuzz/mutate.py) and structure-aware
inputs (decoded seeds with a node changed, generated JSON, generated headers)."""
from __future__ import annotations

import json
import os
import random

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from tests.fuzz.mutate import apply, extremes, mutate_tree

# One bounded profile for `make test`: every example has a deadline (a hang or a slow path fails the test, with
# the input), and the whole suite stays well under a minute on 2 cores. FUZZ_EXAMPLES scales it for a longer run.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))
BOUNDED = settings(max_examples=EXAMPLES, deadline=2000, derandomize=not os.environ.get("FUZZ_RANDOM"),
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                   database=None)


def ops(fields_count: int):
    position = st.integers(0, (1 << 32) - 1)
    one = st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7)),
        st.tuples(st.just("set"), position, st.sampled_from([0, 0xFF, 0x7F, 0x80, 1])),
        st.tuples(st.just("cut"), position),
        st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=16)),
        st.tuples(st.just("delete"), position, st.integers(1, 64)),
        st.tuples(st.just("swap"), position, position, st.integers(1, 64)),
        *([st.tuples(st.just("field"), st.integers(0, fields_count - 1),
                     st.one_of(st.sampled_from(extremes(8)), st.integers(0, (1 << 64) - 1)))]
          if fields_count else []),
    )
    return st.lists(one, min_size=1, max_size=4)


def mutated(target):
    """A seed of ``target`` with a few byte-level operations applied."""
    seeds = target.seeds()
    return st.builds(lambda seed, o: apply(seed, o, target.fields), st.sampled_from(seeds), ops(len(target.fields)))


def tree_mutated(trees: list, encode):
    """A decoded seed with 1-3 nodes changed (tests/fuzz/mutate.py mutate_tree), encoded; hypothesis picks the
    random seed that drives the changes, so a failure shrinks to a seed number it prints."""
    def make(tree, seed, rounds):
        rng = random.Random(seed)
        for _ in range(rounds):
            tree = mutate_tree(tree, rng)
        try:
            return encode(tree)
        except (ValueError, TypeError, OverflowError):  # an unencodable change: the seed as it was
            return encode(trees[0])
    return st.builds(make, st.sampled_from(trees), st.integers(0, 1 << 32), st.integers(1, 3))


def msgpack_encode(tree) -> bytes:
    return msgpack.packb(tree, use_bin_type=True, unicode_errors="surrogatepass")


def json_encode(tree) -> bytes:
    return json.dumps(tree).encode()


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(1 << 70), 1 << 70),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20)),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=12), children,
                                                                                 max_size=5)),
    max_leaves=20)


def spec_bodies(specs):
    """JSON objects shaped by an API object spec: its own field names (and others) with values of any JSON type,
    or of the declared type at its edges (bounds, enum members, NUL bytes in paths)."""
    def for_spec(spec):
        names = list(spec.fields) + ["unknown", ""]

        def value(name):
            rule = spec.fields.get(name)
            edge = []
            if rule is not None:
                if rule.json_type == "integer":
                    bounds = [b for b in (rule.minimum, rule.maximum) if b is not None]
                    edge = [st.sampled_from([v + d for v in bounds for d in (-1, 0, 1)] or [0]),
                            st.integers(-(1 << 64), 1 << 64)]
                elif rule.json_type == "string":
                    edge = [st.sampled_from(list(rule.enum) or ["x"]), st.text(max_size=30),
                            st.just("a\0b"), st.just("\ud800")]
                elif rule.json_type == "object" and rule.spec is not None:
                    edge = [for_spec(rule.spec)]
                elif rule.json_type == "array" and rule.items is not None and rule.items.spec is not None:
                    edge = [st.lists(for_spec(rule.items.spec), max_size=3)]
            return st.one_of(json_values, *edge)

        return st.lists(st.sampled_from(names), unique=True, max_size=len(names)).flatmap(
            lambda keys: st.fixed_dictionaries({k: value(k) for k in keys}))
    return st.sampled_from(specs).flatmap(for_spec)

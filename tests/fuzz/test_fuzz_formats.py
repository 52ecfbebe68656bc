"""Property-based fuzzing of the on-disk formats, from the real seeds in tests/fuzz/corpus/: state files (container,
msgpack body, MicrovmState checks), memory-file identity trailers, image indexes and layers (and reading their
chunks), loading sets. Only each module's documented error may come out (tests/fuzz/targets.py); each example has
a deadline. Longer runs: ``python -m tests.fuzz.run`` (README in docs/reliability.md, "Fuzzing")."""
import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import BOUNDED, msgpack_encode, mutated, tree_mutated
from tests.fuzz.targets import state_body_seeds, targets

BYTE_TARGETS = ["state", "state_signed", "trailer", "trailer_signed", "index", "index_signed", "loadset",
                "loadset_signed"]


@pytest.mark.parametrize("name", BYTE_TARGETS + ["state_body"])
def test_every_seed_is_accepted(name):
    """The corpus is made by the real writers: every reader takes it without any error (a fuzz target that refuses
    its seeds would only ever test refusals)."""
    target = targets()[name]
    for seed in target.seeds():
        target.run(seed)


@pytest.mark.parametrize("name", BYTE_TARGETS)
@BOUNDED
@given(data=st.data())
def test_mutated_input_gives_only_documented_errors(name, data):
    target = targets()[name]
    target.check(data.draw(mutated(target), label="input"))


@BOUNDED
@given(body=tree_mutated([msgpack.unpackb(b, raw=False) for b in state_body_seeds()], msgpack_encode))
def test_state_body_with_a_field_changed_gives_only_snapshot_errors(body):
    """Structure-aware: a real MicrovmState's msgpack tree with fields replaced by hostile values (extremes of every
    integer width, wrong types, NUL and surrogate strings), removed, added, duplicated or moved, under a valid
    checksum."""
    targets()["state_body"].check(body)


@BOUNDED
@given(body=st.binary(max_size=512))
def test_random_state_bodies_give_only_snapshot_errors(body):
    targets()["state_body"].check(body)

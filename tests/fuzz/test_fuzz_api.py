"""Property-based fuzzing of API request bodies: parse_body (vmm/api/fields.py) with every object spec of the VMM
API and of snapd's daemon (snapd/daemon/http.py). Only BadRequest may come out, and its message must be sendable
(UTF-8); a body it accepts is a JSON object."""
import json

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import BOUNDED, json_encode, json_values, mutated, spec_bodies, tree_mutated
from tests.fuzz.targets import api_specs, corpus, targets

BODIES = [json.loads(b) for b in corpus("api/*.json")]


def test_seeds_are_accepted_by_their_spec():
    from vmm.api.fields import parse_body
    specs = {f"{s.name}": s for s in api_specs()}
    assert len(api_specs()) >= 15
    for body in corpus("api/*.json"):
        assert any(_parses(parse_body, body, s) for s in specs.values()), body


def _parses(parse_body, body, spec):
    try:
        parse_body(body, spec)
        return True
    except Exception:
        return False


@BOUNDED
@given(body=st.one_of(mutated(targets()["api"]), tree_mutated(BODIES, json_encode), json_values.map(json_encode),
                      st.binary(max_size=64)))
def test_bodies_give_only_bad_request(body):
    targets()["api"].check(body)


@BOUNDED
@given(body=spec_bodies(api_specs()).map(json_encode))
def test_spec_shaped_bodies_give_only_bad_request(body):
    targets()["api"].check(body)


@BOUNDED
@given(depth=st.integers(1, 200_000), opener=st.sampled_from([b"[", b"{\"a\":", b"[{\"x\":"]))
def test_deep_nesting_gives_bad_request(depth, opener):
    targets()["api"].check(opener * depth)

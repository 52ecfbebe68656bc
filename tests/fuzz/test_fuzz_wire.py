"""Property-based fuzzing of the uffd handshake both ways (snapd/uffd_handshake.py): the region list as the page
server reads it (recv_handshake on a real socket, with a descriptor attached) and the page server's messages as the
VMM reads them (ServerMessages.read and wait_ready). Only HandshakeError, resp. PageServerError (PageServerDied,
ProtocolError) may come out; no descriptor may leak; every read is bounded by a timeout."""
import json

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.strategies import BOUNDED, json_encode, json_values, mutated, tree_mutated
from tests.fuzz.targets import corpus, targets

HANDSHAKES = [json.loads(b) for b in corpus("wire/handshake.json")]
MESSAGES = [json.loads(line) for b in corpus("wire/*.jsonl") for line in b.splitlines()]


def test_seeds_are_accepted():
    for name in ("handshake", "regions", "messages"):
        for seed in targets()[name].seeds():
            targets()[name].run(seed)


@BOUNDED
@given(data=st.one_of(mutated(targets()["handshake"]), tree_mutated(HANDSHAKES, json_encode),
                      json_values.map(json_encode)))
def test_handshake_gives_only_handshake_errors(data):
    targets()["handshake"].check(data)


@BOUNDED
@given(data=st.one_of(tree_mutated(HANDSHAKES, json_encode), json_values.map(json_encode),
                      st.lists(st.dictionaries(st.sampled_from(["base_host_virt_addr", "size", "offset", "page_size",
                                                                "page_size_kib"]),
                                               st.one_of(json_values, st.integers(-(1 << 65), 1 << 65),
                                                         st.sampled_from([0, 4096, 4, (1 << 64) - 4096]))),
                               max_size=3).map(json_encode)))
def test_region_lists_give_only_handshake_errors(data):
    targets()["regions"].check(data)


@BOUNDED
@given(data=st.one_of(mutated(targets()["messages"]),
                      tree_mutated(MESSAGES, lambda m: json_encode(m) + b"\n"),
                      st.lists(json_values.map(json_encode), max_size=3).map(lambda ms: b"\n".join(ms) + b"\n"),
                      st.binary(max_size=256)))
def test_server_messages_give_only_page_server_errors(data):
    targets()["messages"].check(data)

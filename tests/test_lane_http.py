"""The fast lane's C parser for POST /v1/clones and POST /v1/clones/{id}/invoke (snapd/csrc/lane_http.c) against
the Python reader it stands in for (snapd.http_wire + vmm.api.fields): whatever C serves (LANE_FAST), Python must accept with the same meaning;
whatever C waits on (LANE_NEED_MORE), Python must not be able to complete either. No privileges needed.

Every C call gets its bytes placed right before a PROT_NONE page, so a read past `len` crashes the test."""
import base64
import ctypes
import mmap
import random
import socket

import pytest

from snapd import http_wire
from snapd._lane_native import ffi, lib
from snapd.daemon import http as daemon_http
from vmm.api.errors import ApiError
from vmm.api.fields import decode_base64, parse_body

MAX_HEAD, MAX_BODY = http_wire.MAX_HEAD, http_wire.MAX_BODY
NEED_MORE, FAST, SLOW = lib.LANE_NEED_MORE, lib.LANE_FAST, lib.LANE_SLOW
NAMES = {NEED_MORE: "NEED_MORE", FAST: "FAST", SLOW: "SLOW"}


class GuardedBuffer:
    """An anonymous mapping followed by an inaccessible page; `place` puts bytes flush against it."""

    def __init__(self, size: int = 256 * 1024):
        self.size = size
        self.map = mmap.mmap(-1, size + mmap.PAGESIZE)
        self.base = ffi.from_buffer(self.map)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        guard = int(ffi.cast("uintptr_t", self.base)) + size
        assert libc.mprotect(guard, mmap.PAGESIZE, 0) == 0, ctypes.get_errno()  # PROT_NONE

    def place(self, data: bytes):
        start = self.size - len(data)
        self.map[start:self.size] = data
        return self.base + start


GUARD = GuardedBuffer()


def c_parse(data: bytes, max_head: int = MAX_HEAD, max_body: int = MAX_BODY):
    """(verdict, fields or None); fields as Python values, payload decoded by lane_base64_decode."""
    buf = GUARD.place(data)
    out = ffi.new("struct lane_request *")
    verdict = lib.lane_parse_clone_request(buf, len(data), max_head, max_body, out)
    assert verdict in NAMES
    if verdict != FAST:
        return verdict, None
    start = int(ffi.cast("uintptr_t", buf))
    for ptr, n in ((out.image, out.image_len), (out.payload, out.payload_len), (out.clone, out.clone_len)):
        if ptr != ffi.NULL:  # all point into this request's bytes
            offset = int(ffi.cast("uintptr_t", ptr)) - start
            assert 0 < offset and offset + n <= out.consumed <= len(data)
    invoke = out.kind == lib.LANE_REQ_INVOKE
    assert out.kind in (lib.LANE_REQ_CREATE, lib.LANE_REQ_INVOKE)
    fields = {"consumed": out.consumed, "keep_alive": out.keep_alive, "kind": "invoke" if invoke else "create",
              "image": None if invoke else ffi.unpack(out.image, out.image_len).decode(),
              "clone": ffi.unpack(out.clone, out.clone_len).decode() if invoke else None, "count": out.count,
              "timeout_ms": out.timeout_ms, "payload_text": None, "payload": None}
    if out.payload != ffi.NULL:
        text = ffi.unpack(out.payload, out.payload_len)
        fields["payload_text"] = text.decode()
        fields["payload"] = c_b64decode(text)  # None: not strict base64 (the lane would hand it to Python)
    return verdict, fields


def c_b64decode(text: bytes, cap: int | None = None):
    cap = len(text) if cap is None else cap
    out = ffi.new("uint8_t[]", max(cap, 1))
    n = lib.lane_base64_decode(GUARD.place(text), len(text), out, cap)
    if n < 0:
        return n
    return ffi.buffer(out, n)[:]


def c_b64encode(data: bytes) -> bytes:
    out = ffi.new("char[]", 4 * ((len(data) + 2) // 3) + 1)
    n = lib.lane_base64_encode(GUARD.place(data), len(data), out)
    assert n == 4 * ((len(data) + 2) // 3)
    return ffi.unpack(out, n)


# -- the Python side: http_wire.Stream fed the bytes, its socket's peer closed (EOF after them)
_PAIR = socket.socketpair()
_PAIR[1].close()


def python_wire(data: bytes):
    """(request, consumed) as the daemon's reader takes it, or None if it refuses or waits for more."""
    stream = http_wire.Stream(_PAIR[0])
    stream.buf += data
    try:
        request = stream.read_request()
        if request is None:
            return None
        stream.read_body(request)
    except (http_wire.WireError, OSError):  # OSError: a 100 Continue to the closed peer
        return None
    return request, len(data) - len(stream.buf)


def python_meaning(data: bytes):
    """What the daemon would do with the request: None if it would refuse it, else its fields."""
    read = python_wire(data)
    if read is None:
        return None
    request, consumed = read
    try:
        route, params = daemon_http.ROUTER.find(request.method, request.path)
        if route.body is daemon_http.CLONES_CREATE and not params:
            kind = "create"
        elif route.body is daemon_http.INVOKE and set(params) == {"clone_id"}:
            kind = "invoke"
        else:
            return None
        body = parse_body(request.body, route.body)
    except ApiError:
        return None
    try:
        payload = decode_base64(body["payload"], "clones.payload") if "payload" in body else None
    except ApiError:
        payload = "refused"  # a 400 from create_clones or invoke: compared only when C accepts the base64
    return {"consumed": consumed, "keep_alive": int(request.keep_alive), "kind": kind, "image": body.get("image"),
            "clone": params.get("clone_id"), "count": body.get("count", 1), "timeout_ms": body.get("timeout_ms", 10_000),
            "payload_text": body.get("payload"), "payload": payload}


def same_meaning(c_fields: dict, py: dict | None, data: bytes) -> None:
    assert py is not None, f"C serves what Python refuses: {data!r}"
    c_fields, py = dict(c_fields), dict(py)
    if c_fields["payload_text"] is not None and not isinstance(c_fields["payload"], bytes):
        del c_fields["payload"], py["payload"]  # C refused the base64: the lane hands that one to Python
    assert c_fields == py, data


def make(body: bytes = b'{"image": "img-1"}', headers: list[bytes] | None = None,
         line: bytes = b"POST /v1/clones HTTP/1.1", length: bytes | None = None) -> bytes:
    """A request; Content-Length is the body's unless `length` says otherwise (b"" leaves it out)."""
    headers = [b"Host: localhost"] if headers is None else list(headers)
    length = str(len(body)).encode() if length is None else length
    if length != b"":
        headers.append(b"Content-Length: " + length)
    return line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


PLAIN = make()


def test_plain_request():
    verdict, fields = c_parse(PLAIN)
    assert NAMES[verdict] == "FAST"
    assert fields == {"consumed": len(PLAIN), "keep_alive": 1, "kind": "create", "image": "img-1", "clone": None,
                      "count": 1, "timeout_ms": 10000, "payload_text": None, "payload": None}
    same_meaning(fields, python_meaning(PLAIN), PLAIN)


def test_all_fields():
    data = make(b'{"image":"Img_2-x","payload":"aGVsbG8=","count":3,"timeout_ms":2500}')
    verdict, fields = c_parse(data)
    assert verdict == FAST
    assert (fields["image"], fields["payload"], fields["count"], fields["timeout_ms"]) == ("Img_2-x", b"hello", 3, 2500)
    same_meaning(fields, python_meaning(data), data)


@pytest.mark.parametrize("data", [
    make(headers=[b"Connection: close"]),
    make(headers=[b"connection:CLOSE"]),
    make(headers=[b"Connection: keep-alive, Close "]),
    make(headers=[b"Connection: keep-alive", b"Connection: close"]),
    make(headers=[b"Connection:\tfoo ,close,\tbar"]),
], ids=["close", "case", "list", "repeated", "tabs"])
def test_connection_close(data):
    verdict, fields = c_parse(data)
    assert verdict == FAST and fields["keep_alive"] == 0
    same_meaning(fields, python_meaning(data), data)


@pytest.mark.parametrize("data", [
    make(headers=[]),
    make(headers=[b"Connection: keep-alive"]),
    make(headers=[b"Connection: "]),
    make(headers=[b"HOST:  x y  ", b"User-Agent: curl/8.0", b"Accept: */*", b"Content-Type: application/json"]),
    make(b' \r\n\t{ "timeout_ms" : 1 , "image" : "a" , "count" : 9223372036854775807 , "payload" : "" } \n\r\t'),
    make(b'{"image":"' + b"x" * 64 + b'"}'),
    make(b'{"image":"a","payload":"AAAA+/+/"}'),
    make(b'{"image":"a","payload":"not base64"}'),  # parsed FAST; the lane's base64 check takes it Python's way
    make(length=b"018"),  # a zero-padded length is Python's int() too
    make(headers=[b"content-LENGTH:\t18\t"], length=b""),
], ids=["no-host", "keep-alive", "empty-connection", "other-headers", "whitespace", "long-image", "payload",
        "bad-payload", "zero-padded-length", "length-case"])
def test_fast_variants(data):
    verdict, fields = c_parse(data)
    assert NAMES[verdict] == "FAST"
    same_meaning(fields, python_meaning(data), data)


def test_bad_base64_payload_is_left_to_python():
    verdict, fields = c_parse(make(b'{"image":"a","payload":"not base64"}'))
    assert verdict == FAST and fields["payload_text"] == "not base64" and fields["payload"] == -1


def test_pipelined():
    second = make(b'{"image":"b","count":2}', [b"Connection: close"])
    data = PLAIN + second + b"GET /v1/clones HT"
    verdict, fields = c_parse(data)
    assert verdict == FAST and fields["consumed"] == len(PLAIN) and fields["image"] == "img-1"
    same_meaning(fields, python_meaning(data), data)
    verdict, fields = c_parse(data[len(PLAIN):])
    assert verdict == FAST and fields["consumed"] == len(second) and fields["count"] == 2
    assert fields["keep_alive"] == 0
    assert c_parse(data[len(PLAIN) + len(second):])[0] == SLOW


@pytest.mark.parametrize("data", [PLAIN, make(b'{"image":"a","payload":"aGk=","count":2}', [b"Connection: close"])])
def test_every_prefix_needs_more(data):
    for i in range(len(data)):
        assert NAMES[c_parse(data[:i])[0]] == "NEED_MORE", (i, data[:i])
        assert python_wire(data[:i]) is None
    assert c_parse(data)[0] == FAST


def invoke_request(clone: bytes = b"c-0123abcd", body: bytes = b'{"payload": "aGk="}', **kw) -> bytes:
    return make(body, line=b"POST /v1/clones/" + clone + b"/invoke HTTP/1.1", **kw)


@pytest.mark.parametrize("data", [
    invoke_request(),
    invoke_request(b"A_b-9", b'{"timeout_ms": 5, "payload": ""}'),
    invoke_request(b"y" * 64, b' {"payload":"AAAA+/+/"} ', headers=[b"Connection: close"]),
], ids=["plain", "timeout", "long-id"])
def test_invoke_requests_are_fast(data):
    verdict, fields = c_parse(data)
    assert verdict == FAST and fields["kind"] == "invoke" and fields["image"] is None
    same_meaning(fields, python_meaning(data), data)


@pytest.mark.parametrize("data", [
    invoke_request(b""), invoke_request(b"y" * 65), invoke_request(b"a.b"), invoke_request(b"a/b"),
    invoke_request(body=b'{}'), invoke_request(body=b'{"image": "a", "payload": ""}'),
    invoke_request(body=b'{"payload": "", "count": 1}'), invoke_request(body=b'{"payload": "", "timeout_ms": 3600001}'),
    make(b'{"payload": ""}', line=b"POST /v1/clones/c-1/invoke/ HTTP/1.1"),
    make(b'{"payload": ""}', line=b"POST /v1/clones/c-1/snapshot HTTP/1.1"),
    make(b'{"payload": ""}', line=b"POST /v1/clones/c-1/invoke?x=1 HTTP/1.1"),
], ids=["no-id", "long-id", "dot", "slash", "no-payload", "image", "count", "timeout", "trailing-slash", "snapshot",
        "query"])
def test_invoke_requests_the_lane_leaves_to_python(data):
    assert c_parse(data)[0] == SLOW


def test_every_prefix_of_an_invoke_needs_more():
    data = invoke_request()
    for i in range(len(data)):
        assert NAMES[c_parse(data[:i])[0]] == "NEED_MORE", (i, data[:i])
    assert c_parse(data)[0] == FAST


@pytest.mark.parametrize("prefix", [b"G", b"POST /v1/clones/x ", b"POST /v1/clones HTTP/1.0", b"\r", b"\n",
                                    b"POST /v1/clones HTTP/1.1\n", b"POST  ", b"post", b"POST /v1/clones//",
                                    b"POST /v1/clones/a/invoke HTTP/1.0"])
def test_other_requests_are_slow_at_once(prefix):
    assert NAMES[c_parse(prefix)[0]] == "SLOW"


LONG = b"X-Pad: " + b"a" * MAX_HEAD
SLOW_CASES = {
    # request line
    "method": make(line=b"PUT /v1/clones HTTP/1.1"),
    "path": make(line=b"POST /v1/clones/ HTTP/1.1"),
    "query": make(line=b"POST /v1/clones?x=1 HTTP/1.1"),
    "other-path": make(line=b"POST /v1/images HTTP/1.1"),
    "http-1.0": make(line=b"POST /v1/clones HTTP/1.0"),
    "lower-method": make(line=b"post /v1/clones HTTP/1.1"),
    "extra-space": make(line=b"POST /v1/clones  HTTP/1.1"),
    "leading-empty-line": b"\r\n" + PLAIN,
    # line ends and bytes
    "bare-lf-request-line": PLAIN.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\n", 1),
    "bare-lf-header": PLAIN.replace(b"localhost\r\n", b"localhost\n", 1),
    "bare-lf-head-end": PLAIN.replace(b"\r\n\r\n", b"\r\n\n", 1),
    "lf-lf-no-body-yet": b"POST /v1/clones HTTP/1.1\r\nContent-Length: 99\n\n",
    "bare-cr": make(headers=[b"Host: a\rb"]),
    "nul": make(headers=[b"Host: a\x00b"]),
    "control": make(headers=[b"Host: a\x01b"]),
    "del": make(headers=[b"Host: a\x7fb"]),
    "latin-1": make(headers=[b"Host: caf\xe9"]),
    # header lines
    "no-colon": make(headers=[b"Host localhost"]),
    "empty-name": make(headers=[b": localhost"]),
    "space-in-name": make(headers=[b"X Y: z"]),
    "space-before-colon": make(headers=[b"Host : localhost"]),
    "folding": make(headers=[b"Host: localhost", b" folded"]),
    "folding-tab": make(headers=[b"Host: localhost", b"\tfolded"]),
    "101-headers": make(headers=[b"X-H%d: v" % i for i in range(100)]),
    "head-too-large": make(headers=[LONG]),
    "head-too-large-incomplete": b"POST /v1/clones HTTP/1.1\r\n" + LONG,
    # Content-Length
    "no-length": make(length=b""),
    "zero-length": make(b"", length=b"0"),
    "empty-length": make(length=b" "),
    "plus-length": make(length=b"+18"),
    "minus-length": make(length=b"-18"),
    "hex-length": make(length=b"0x12"),
    "spaced-length": make(length=b"1 8"),
    "repeated-length": make(headers=[b"Content-Length: 18"]),
    "conflicting-length": make(headers=[b"Content-Length: 17"]),
    "length-above-max": make(length=str(MAX_BODY + 1).encode()),
    "length-huge": make(length=b"9" * 40),
    "transfer-encoding": make(headers=[b"Transfer-Encoding: chunked"]),
    "transfer-encoding-identity": make(headers=[b"transfer-encoding: identity"]),
    "expect": make(headers=[b"Expect: 100-continue"]),
    # Connection: Python closes on the substring "close"
    "connection-closed": make(headers=[b"Connection: closed"]),
    "connection-xclose": make(headers=[b"Connection: keep-alive, xclose"]),
    # the body's JSON
    "array": make(b'["image"]'),
    "empty-object": make(b"{}"),
    "two-objects": make(b'{"image":"a"}{}'),
    "trailing-garbage": make(b'{"image":"a"} x'),
    "trailing-comma": make(b'{"image":"a",}'),
    "missing-colon": make(b'{"image" "a"}'),
    "unknown-key": make(b'{"image":"a","tag":"b"}'),
    "duplicate-key": make(b'{"image":"a","image":"b"}'),
    "missing-image": make(b'{"count":1}'),
    "image-number": make(b'{"image":5}'),
    "image-null": make(b'{"image":null}'),
    "payload-number": make(b'{"image":"a","payload":5}'),
    "count-string": make(b'{"image":"a","count":"1"}'),
    "count-fraction": make(b'{"image":"a","count":1.0}'),
    "count-exponent": make(b'{"image":"a","count":1e2}'),
    "count-bool": make(b'{"image":"a","count":true}'),
    "count-leading-zero": make(b'{"image":"a","count":01}'),
    "count-zero": make(b'{"image":"a","count":0}'),
    "count-negative": make(b'{"image":"a","count":-1}'),
    "count-int64-overflow": make(b'{"image":"a","count":9223372036854775808}'),
    "timeout-zero": make(b'{"image":"a","timeout_ms":0}'),
    "timeout-negative": make(b'{"image":"a","timeout_ms":-5}'),
    "timeout-above-the-api-maximum": make(b'{"image":"a","timeout_ms":3600001}'),
    "timeout-object": make(b'{"image":"a","timeout_ms":{}}'),
    "image-empty": make(b'{"image":""}'),
    "image-65": make(b'{"image":"' + b"x" * 65 + b'"}'),
    "image-slash": make(b'{"image":"a/b"}'),
    "image-dot": make(b'{"image":"a.b"}'),
    "escape": make(b'{"image":"\\u0061"}'),
    "escaped-key": make(b'{"\\u0069mage":"a"}'),
    "tab-in-string": make(b'{"image":"a\tb"}'),
    "non-ascii": make('{"image":"a","payload":"\u00e9"}'.encode()),
    "not-utf8": make(b'{"image":"a","payload":"\xff"}'),
    "bom": make(b'\xef\xbb\xbf{"image":"a"}'),
    "form-feed-ws": make(b'\x0c{"image":"a"}'),
    "unterminated": make(b'{"image":"a"'),
}


@pytest.mark.parametrize("name", list(SLOW_CASES))
def test_slow(name):
    data = SLOW_CASES[name]
    assert NAMES[c_parse(data)[0]] == "SLOW"


def test_max_head_and_body_are_the_callers():
    head_len = PLAIN.index(b"\r\n\r\n") + 4
    assert c_parse(PLAIN, max_head=head_len)[0] == FAST
    assert c_parse(PLAIN, max_head=head_len - 1)[0] == SLOW
    assert c_parse(PLAIN[:head_len - 2], max_head=head_len)[0] == NEED_MORE
    assert c_parse(PLAIN, max_body=len(PLAIN) - head_len)[0] == FAST
    assert c_parse(PLAIN, max_body=len(PLAIN) - head_len - 1)[0] == SLOW
    assert c_parse(PLAIN, max_body=0)[0] == SLOW


def test_body_not_yet_complete():
    data = make(headers=[b"Connection: close"])
    assert c_parse(data[:-1])[0] == NEED_MORE
    assert c_parse(make(b'{"image": "x"}  ', length=b"100"))[0] == NEED_MORE


# -- base64
VALID_B64 = [b"", b"AAAA", b"Zm8=", b"Zm9v", b"Zg==", b"+/+/", b"aGVsbG8gd29ybGQ=", b"////", b"AA=="]
INVALID_B64 = [b"A", b"AB", b"ABC", b"AB=", b"A===", b"====", b"=AAA", b"AB==AB==", b"Zg==Zg==", b"Zm=v", b"Zh==",
               b"Zm9=", b"QR==", b"AB C", b" ABC", b"ABC\n", b"ABC-", b"ABC_", b"AB\x00C", b"AB\xffC", b"Zm9vYg",
               b"Zm9vYg=", b"Zm9vYg===", b"AAAA=", b"AA=A"]


@pytest.mark.parametrize("text", VALID_B64)
def test_base64_valid(text):
    assert c_b64decode(text) == base64.b64decode(text, validate=True)


@pytest.mark.parametrize("text", INVALID_B64)
def test_base64_invalid(text):
    assert c_b64decode(text) == -1


def test_base64_cap():
    assert c_b64decode(b"aGVsbG8=", cap=5) == b"hello"
    assert c_b64decode(b"aGVsbG8=", cap=4) == -2
    assert c_b64decode(b"aGVsbG8*", cap=1) == -1  # not base64 comes before too large
    assert c_b64decode(b"", cap=0) == b""


def test_base64_round_trip_and_differential():
    rng = random.Random(4648)
    for n in range(200):
        data = rng.randbytes(n % 70)
        text = c_b64encode(data)
        assert text == base64.b64encode(data)
        assert c_b64decode(text) == data
    alphabet = b"AZaz09+/=Qg-_ \n"
    for _ in range(4000):
        text = bytes(rng.choice(alphabet) for _ in range(rng.randrange(13)))
        ours = c_b64decode(text)
        try:
            theirs = base64.b64decode(text, validate=True)
        except ValueError:  # binascii.Error
            theirs = None
        if isinstance(ours, bytes):
            assert ours == theirs, text
        elif theirs is not None:  # refused by C: only a non-canonical spelling of something Python takes
            assert base64.b64encode(theirs) != text, text


# -- differential: mutated requests, C against Python
IMAGES = [b'"img-1"', b'"A_b-9"', b'"x"', b'"' + b"y" * 64 + b'"', b'""', b'"a.b"', b'"caf\xc3\xa9"', b'"a\\"b"',
          b"7", b"null", b'"' + b"z" * 65 + b'"']
PAYLOADS = [b'"aGVsbG8="', b'""', b'"Zg=="', b'"Zh=="', b'"Zm9v"', b'"Zm9"', b'"not base64"', b'"a\\/b"', b"[]",
            b'"QUJD\\n"']
INTEGERS = [b"1", b"2", b"10000", b"9223372036854775807", b"9223372036854775808", b"0", b"-1", b"1.0", b"1e3", b"01",
            b'"3"', b"true", b"-0", b"1E0", b"99999999999999999999"]
WS = [b" ", b"\n", b"\t", b"\r\n  "]
HEADERS = [b"Host: localhost", b"User-Agent: snapd-client", b"Accept: */*", b"Content-Type: application/json",
           b"Connection: close", b"Connection: keep-alive", b"Connection: Close", b"Connection: closed",
           b"Connection: upgrade, close", b"Connection:close ", b"Expect: 100-continue", b"Transfer-Encoding: chunked",
           b"X-Empty:", b"X-Tab:\tv\t", b"content-length: 5", b" folded", b"NoColon", b"Host : x", b"X-Y\t: z"]
MUTATION_BYTES = b"\r\n \t:,\"\\{}[]0123456789-+.eE=aZ/\x00\x01\x7f\x80\xff"


def random_body(rng: random.Random) -> bytes:
    def pick(pool):  # mostly values the lane takes, so that many requests stay fast
        return rng.choice(pool[:4]) if rng.random() < 0.8 else rng.choice(pool)
    invoke = rng.random() < 0.3  # a body for an invocation: payload, timeout_ms (anything else: Python's 400)
    items = [(b'"image"', pick(IMAGES))] if rng.random() < (0.05 if invoke else 0.95) else []
    for key, pool in ((b'"payload"', PAYLOADS), (b'"count"', INTEGERS), (b'"timeout_ms"', INTEGERS)):
        if rng.random() < (0.95 if invoke and key == b'"payload"' else 0.05 if invoke and key == b'"count"' else 0.5):
            items.append((key, pick(pool)))
    if rng.random() < 0.05:
        items.append((b'"extra"', b"1"))
    if rng.random() < 0.05 and items:
        items.append(rng.choice(items))  # a duplicate key
    rng.shuffle(items)

    def ws():  # rarely a form feed or vertical tab: Python's str.strip() whitespace, not JSON's
        return rng.choice(WS) if rng.random() < 0.2 else rng.choice([b"\x0c", b"\x0b"]) if rng.random() < 0.005 else b""
    body = ws() + b"{" + b",".join(ws() + k + ws() + b":" + ws() + v + ws() for k, v in items) + b"}" + ws()
    if rng.random() < 0.03:
        body += rng.choice([b"{}", b",", b"x", b"]"])
    return body


def random_request(rng: random.Random) -> bytes:
    body = random_body(rng)
    headers = [rng.choice(HEADERS[:4] if rng.random() < 0.85 else HEADERS) for _ in range(rng.randrange(4))]
    length = str(len(body)).encode()
    if rng.random() < 0.1:
        length = rng.choice([b"", b"0", b" " + length + b" ", b"0" + length, str(len(body) + 1).encode(),
                             str(max(0, len(body) - 1)).encode(), b"+" + length])
    if rng.random() < 0.2:
        headers.append(b"Content-Length: " + length)
        length = b""
    if rng.random() < 0.15:  # header case changes
        headers = [h.swapcase() if rng.random() < 0.5 else h.lower() for h in headers]
    line = b"POST /v1/clones HTTP/1.1"
    if b'"image"' not in body or rng.random() < 0.1:
        line = b"POST /v1/clones/" + rng.choice([b"c-1", b"A_b-9", b"x" * 64, b"x" * 65, b"a.b", b""]) + \
            b"/invoke HTTP/1.1"
    if rng.random() < 0.03:
        line = rng.choice([b"POST /v1/clones HTTP/1.0", b"POST /v1/clones/x HTTP/1.1", b"GET /v1/clones HTTP/1.1",
                           b"POST /v1/clones/x/invoke HTTP/1.0", b"POST /v1/clones/x/snapshot HTTP/1.1"])
    data = make(body, headers, line, length)
    for _ in range(rng.choice([0, 0, 0, 1, 1, 2])):  # byte mutations
        pos = rng.randrange(len(data) + 1)
        kind = rng.random()
        byte = bytes([rng.choice(MUTATION_BYTES)])
        if kind < 0.4 and pos < len(data):
            data = data[:pos] + byte + data[pos + 1:]
        elif kind < 0.7:
            data = data[:pos] + byte + data[pos:]
        else:
            data = data[:pos] + data[pos + 1:]
    if rng.random() < 0.15:
        data += rng.choice([PLAIN, b"GET /metrics HTTP/1.1\r\n\r\n", b"\r\n", b"garbage"])
    return data


def test_differential_mutations():
    rng = random.Random(20240611)
    counts = {NEED_MORE: 0, FAST: 0, SLOW: 0}
    invokes = 0
    for _ in range(8000):
        data = random_request(rng)
        verdict, fields = c_parse(data)
        counts[verdict] += 1
        invokes += verdict == FAST and fields["kind"] == "invoke"
        if verdict == FAST:
            same_meaning(fields, python_meaning(data), data)
        elif verdict == NEED_MORE:  # the lane waits: Python could not have read a request from these bytes either
            assert python_wire(data) is None, data
        # more bytes never change a decision: a prefix is NEED_MORE or the same verdict
        cut = rng.randrange(len(data) + 1)
        before, before_fields = c_parse(data[:cut])
        assert before == NEED_MORE or (before, before_fields) == (verdict, fields), (cut, data)
    assert counts[FAST] > 1000 and counts[SLOW] > 1000 and counts[NEED_MORE] > 50 and invokes > 300, (counts, invokes)

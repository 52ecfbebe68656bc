/* The fast lane's HTTP/JSON parser for `POST /v1/clones` and `POST /v1/clones/{id}/invoke` (lane_http.h).
 *
 * It accepts a strict subset of what snapd/http_wire.py and vmm/api/fields.py
 * accept, and reads it the same way; everything else is LANE_SLOW, never an
 * error: the Python reader then answers from the same bytes, with its own
 * messages. So each check below errs towards SLOW. Nothing here reads past
 * len: the bytes come straight from a client. */
#include "lane_http.h"

#include <pthread.h>
#include <string.h>

#include "lane_proto.h"

static const char CREATE_LINE[] = "POST /v1/clones HTTP/1.1\r\n";
static const char INVOKE_SUFFIX[] = "/invoke HTTP/1.1\r\n";  /* after "POST /v1/clones/" and the id */
#define COMMON_LEN 15  /* "POST /v1/clones", then ' ' (create) or '/' (a clone's path) */
#define ID_MAX 64      /* the router's ids: [A-Za-z0-9_-]{1,64} */
/* http_wire refuses more than 100 distinct header names; counting lines is stricter */
#define MAX_HEADER_LINES 100

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

#define IS_OWS(c) ((c) == ' ' || (c) == '\t')
#define IS_ALNUM(c) (((c) >= 'A' && (c) <= 'Z') || ((c) >= 'a' && (c) <= 'z') || ((c) >= '0' && (c) <= '9'))
#define IS_ID(c) (IS_ALNUM(c) || (c) == '_' || (c) == '-')

/* The request line in buf[0..len): LANE_FAST with its kind, clone id and length (CRLF included), LANE_NEED_MORE
 * while what has come is the start of a line the lane serves, LANE_SLOW as soon as it is not. Byte for byte, so
 * another request goes to Python without waiting for its head. */
static int request_line(const char *buf, size_t len, struct lane_request *out, size_t *line_len)
{
	const char *tail;  /* what the line's remaining bytes must be, from buf[id_end] on */
	size_t i, id_end;

	for (i = 0; i < len && i < COMMON_LEN; i++)
		if (buf[i] != CREATE_LINE[i])
			return LANE_SLOW;
	if (i == len)
		return LANE_NEED_MORE;
	if (buf[COMMON_LEN] == ' ') {
		out->kind = LANE_REQ_CREATE;
		tail = CREATE_LINE + COMMON_LEN;
		id_end = COMMON_LEN;
	} else if (buf[COMMON_LEN] == '/') {
		out->kind = LANE_REQ_INVOKE;
		out->clone = buf + COMMON_LEN + 1;
		for (id_end = COMMON_LEN + 1; id_end < len && IS_ID(buf[id_end]); id_end++)
			if (id_end - COMMON_LEN > ID_MAX)
				return LANE_SLOW;  /* an id the router would not match: Python's 404 */
		if (id_end == len)
			return LANE_NEED_MORE;
		out->clone_len = id_end - COMMON_LEN - 1;
		if (out->clone_len == 0)
			return LANE_SLOW;
		tail = INVOKE_SUFFIX;
	} else {
		return LANE_SLOW;
	}
	size_t total = out->kind == LANE_REQ_CREATE ? sizeof(CREATE_LINE) - 1 : id_end + sizeof(INVOKE_SUFFIX) - 1;
	for (i = id_end; i < total; i++) {
		if (i == len)
			return LANE_NEED_MORE;
		if (buf[i] != tail[i - id_end])
			return LANE_SLOW;
	}
	*line_len = total;
	return LANE_FAST;
}

/* s[0..n) equals the lower-case literal lit, ignoring ASCII case */
static int equals_nocase(const char *s, size_t n, const char *lit)
{
	if (strlen(lit) != n)
		return 0;
	for (size_t i = 0; i < n; i++)
		if ((s[i] >= 'A' && s[i] <= 'Z' ? s[i] + ('a' - 'A') : s[i]) != lit[i])
			return 0;
	return 1;
}

/* Finds the blank line that ends the head, checking every byte on the way:
 * the request line (request_line), then CRLF-only line ends and printable
 * ASCII. A bare LF must be SLOW at once, not NEED_MORE: Python ends a head at
 * "\n\n", and the lane would wait for a "\r\n\r\n" the client never sends. */
static int find_head(const char *buf, size_t len, size_t max_head, struct lane_request *out, size_t *line_len,
		     size_t *head_len)
{
	size_t n = len < max_head ? len : max_head;
	int r = request_line(buf, n, out, line_len);

	if (r != LANE_FAST)
		return r == LANE_NEED_MORE && len >= max_head ? LANE_SLOW : r;
	for (size_t i = *line_len; i < n; i++) {
		unsigned char c = (unsigned char)buf[i];

		if (c == '\n') {
			if (buf[i - 1] != '\r')
				return LANE_SLOW;
			if (buf[i - 2] == '\n') { /* i > line_len >= 26: buf[i - 3] is the CR of that LF */
				*head_len = i + 1;
				return LANE_FAST;
			}
		} else if (c == '\r') {
			if (i + 1 < len && buf[i + 1] != '\n')
				return LANE_SLOW;
		} else if ((c < 0x20 && c != '\t') || c >= 0x7f) {
			return LANE_SLOW;
		}
	}
	/* no end within max_head bytes: the head is too large (Python says 431) */
	return len >= max_head ? LANE_SLOW : LANE_NEED_MORE;
}

/* The Connection header's value: Python decides keep-alive by the substring
 * "close" anywhere in it (so "closed" closes), RFC 9110 by tokens. Where the
 * two differ the lane cannot know what Python would do: SLOW. */
static int connection_header(const char *v, size_t n, int *close)
{
	int token = 0, substring = 0;

	for (size_t i = 0; i + 5 <= n; i++)
		if (equals_nocase(v + i, 5, "close"))
			substring = 1;
	for (size_t i = 0; i <= n;) {
		size_t start = i, end;

		while (i < n && v[i] != ',')
			i++;
		end = i++;
		while (start < end && IS_OWS(v[start]))
			start++;
		while (end > start && IS_OWS(v[end - 1]))
			end--;
		if (equals_nocase(v + start, end - start, "close"))
			token = 1;
	}
	if (token != substring)
		return LANE_SLOW;
	*close |= token;
	return LANE_FAST;
}

/* The header lines of a complete head, buf[line_len..head_len): every line
 * ends in CRLF and holds no other CR or LF (find_head checked). */
static int parse_headers(const char *buf, size_t line_len, size_t head_len, size_t max_body, size_t *content_length,
			 int *close)
{
	size_t p = line_len, blank = head_len - 2;
	int lines = 0, have_length = 0;

	while (p < blank) {
		const char *line = buf + p, *eol = memchr(line, '\r', blank - p), *colon, *v, *ve;

		if (eol == NULL || ++lines > MAX_HEADER_LINES)
			return LANE_SLOW;
		p = (size_t)(eol - buf) + 2;
		if (IS_OWS(line[0])) /* obsolete line folding */
			return LANE_SLOW;
		colon = memchr(line, ':', (size_t)(eol - line));
		if (colon == NULL || colon == line)
			return LANE_SLOW;
		for (const char *c = line; c < colon; c++)
			if (IS_OWS(*c)) /* Python refuses " Name" / "Name ", would take "Na me": neither is ours */
				return LANE_SLOW;
		for (v = colon + 1; v < eol && IS_OWS(*v); v++)
			;
		for (ve = eol; ve > v && IS_OWS(ve[-1]); ve--)
			;
		size_t name_len = (size_t)(colon - line), vlen = (size_t)(ve - v);

		if (equals_nocase(line, name_len, "content-length")) {
			size_t value = 0;

			/* a repeated length Python takes if equal; the lane wants exactly one */
			if (have_length || vlen == 0)
				return LANE_SLOW;
			have_length = 1;
			for (size_t i = 0; i < vlen; i++) {
				unsigned d = (unsigned char)v[i] - '0';

				if (d > 9 || d > max_body || value > (max_body - d) / 10)
					return LANE_SLOW;
				value = value * 10 + d;
			}
			*content_length = value;
		} else if (equals_nocase(line, name_len, "transfer-encoding") ||
			   equals_nocase(line, name_len, "expect")) {
			return LANE_SLOW; /* refused, or a 100 Continue to send: Python's work */
		} else if (equals_nocase(line, name_len, "connection")) {
			if (connection_header(v, vlen, close) != LANE_FAST)
				return LANE_SLOW;
		}
	}
	/* no body (or an empty one) is a 400 from Python */
	return have_length && *content_length > 0 ? LANE_FAST : LANE_SLOW;
}

struct cursor {
	const char *p, *end;
};

static void skip_ws(struct cursor *c)
{
	while (c->p < c->end && (*c->p == ' ' || *c->p == '\t' || *c->p == '\r' || *c->p == '\n'))
		c->p++;
}

static int take(struct cursor *c, char ch)
{
	return c->p < c->end && *c->p == ch ? (c->p++, 1) : 0;
}

/* A JSON string without escapes, control characters or non-ASCII: its raw
 * bytes are then exactly the text Python decodes. */
static int json_string(struct cursor *c, const char **s, size_t *n)
{
	if (!take(c, '"'))
		return 0;
	*s = c->p;
	while (c->p < c->end && *c->p != '"') {
		unsigned char ch = (unsigned char)*c->p;

		if (ch < 0x20 || ch > 0x7e || ch == '\\')
			return 0;
		c->p++;
	}
	*n = (size_t)(c->p - *s);
	return take(c, '"');
}

/* A positive JSON integer that fits int64: [1-9][0-9]*. Zero and negative
 * numbers are valid JSON but below both fields' minimum of 1, so Python
 * answers them; a fraction or exponent fails the caller's next-token check. */
static int json_positive(struct cursor *c, int64_t *out)
{
	int64_t v = 0;

	if (c->p >= c->end || *c->p < '1' || *c->p > '9')
		return 0;
	while (c->p < c->end && *c->p >= '0' && *c->p <= '9') {
		int d = *c->p++ - '0';

		if (v > (INT64_MAX - d) / 10)
			return 0;
		v = v * 10 + d;
	}
	*out = v;
	return 1;
}

enum { KEY_IMAGE = 1, KEY_PAYLOAD = 2, KEY_COUNT = 4, KEY_TIMEOUT = 8 };

/* The body: one object of the CLONES_CREATE fields (create) or the INVOKE fields (invoke), each at most once. */
static int parse_body(const char *body, size_t n, struct lane_request *out)
{
	int allowed = out->kind == LANE_REQ_CREATE ? KEY_IMAGE | KEY_PAYLOAD | KEY_COUNT | KEY_TIMEOUT
						   : KEY_PAYLOAD | KEY_TIMEOUT;
	int required = out->kind == LANE_REQ_CREATE ? KEY_IMAGE : KEY_PAYLOAD;
	struct cursor c = { body, body + n };
	const char *key;
	size_t key_len;
	int seen = 0, ok;

	skip_ws(&c);
	if (!take(&c, '{'))
		return LANE_SLOW;
	do {
		skip_ws(&c);
		if (!json_string(&c, &key, &key_len))
			return LANE_SLOW;
		skip_ws(&c);
		if (!take(&c, ':'))
			return LANE_SLOW;
		skip_ws(&c);
		int bit = key_len == 5 && !memcmp(key, "image", 5) ? KEY_IMAGE
			: key_len == 7 && !memcmp(key, "payload", 7) ? KEY_PAYLOAD
			: key_len == 5 && !memcmp(key, "count", 5) ? KEY_COUNT
			: key_len == 10 && !memcmp(key, "timeout_ms", 10) ? KEY_TIMEOUT : 0;
		if (!(bit & allowed) || (seen & bit)) /* unknown: Python's 400; duplicate: Python keeps the last */
			return LANE_SLOW;
		seen |= bit;
		if (bit == KEY_IMAGE)
			ok = json_string(&c, &out->image, &out->image_len);
		else if (bit == KEY_PAYLOAD)
			ok = json_string(&c, &out->payload, &out->payload_len);
		else
			ok = json_positive(&c, bit == KEY_COUNT ? &out->count : &out->timeout_ms);
		if (!ok)
			return LANE_SLOW;
		skip_ws(&c);
	} while (take(&c, ','));
	if (!take(&c, '}'))
		return LANE_SLOW;
	skip_ws(&c);
	if (c.p != c.end || !(seen & required))
		return LANE_SLOW;
	if (out->kind == LANE_REQ_INVOKE)
		return LANE_FAST;
	/* an id the router would not match gets Python's 404 or 400 */
	if (out->image_len < 1 || out->image_len > LANE_IMAGE_MAX)
		return LANE_SLOW;
	for (size_t i = 0; i < out->image_len; i++)
		if (!IS_ALNUM(out->image[i]) && out->image[i] != '_' && out->image[i] != '-')
			return LANE_SLOW;
	return LANE_FAST;
}

int lane_parse_clone_request(const char *buf, size_t len, size_t max_head, size_t max_body,
			     struct lane_request *out)
{
	size_t head_len = 0, line_len = 0, length = 0;
	int close = 0, r;
	struct lane_request line = { 0 };

	out->need = 0;
	r = find_head(buf, len, max_head, &line, &line_len, &head_len);
	if (r != LANE_FAST)
		return r;
	/* the head alone decides SLOW, before the body arrives: a refused head gets Python's answer now */
	if (parse_headers(buf, line_len, head_len, max_body, &length, &close) != LANE_FAST)
		return LANE_SLOW;
	if (len - head_len < length) {
		out->need = head_len + length;
		return LANE_NEED_MORE;
	}
	memset(out, 0, sizeof(*out));
	out->kind = line.kind;
	out->clone = line.clone;
	out->clone_len = line.clone_len;
	out->count = 1;
	out->timeout_ms = 10000;
	if (parse_body(buf + head_len, length, out) != LANE_FAST || out->timeout_ms > LANE_MAX_TIMEOUT_MS)
		return LANE_SLOW;
	out->consumed = head_len + length;
	out->keep_alive = !close;
	return LANE_FAST;
}

/* 6-bit values by byte, 0xff for a byte outside the alphabet: one load per character (a memchr over the
 * alphabet per character made the decode ~3x slower than Python's) */
static uint8_t b64_values[256];
static pthread_once_t b64_once = PTHREAD_ONCE_INIT;

static void b64_fill(void)
{
	memset(b64_values, 0xff, sizeof(b64_values));
	for (int i = 0; i < 64; i++)
		b64_values[(unsigned char)B64[i]] = (uint8_t)i;
}

static int b64_value(char c)
{
	uint8_t v = b64_values[(unsigned char)c];

	return v == 0xff ? -1 : v;
}

int64_t lane_base64_decode(const char *in, size_t len, uint8_t *out, size_t cap)
{
	size_t pad = 0, total, o = 0;

	pthread_once(&b64_once, b64_fill);
	if (len % 4)
		return -1;
	if (len > 0 && in[len - 1] == '=')
		pad = in[len - 2] == '=' ? 2 : 1;
	total = len / 4 * 3 - pad;
	for (size_t i = 0; i < len; i += 4) {
		size_t chars = i + 4 == len ? 4 - pad : 4; /* '=' only in the last quantum */
		uint32_t w = 0;

		for (size_t k = 0; k < 4; k++) {
			int v = k < chars ? b64_value(in[i + k]) : 0;

			if (v < 0)
				return -1;
			w = w << 6 | (uint32_t)v;
		}
		/* canonical: the bits padding drops must be zero, so one text per byte string */
		if ((pad == 2 && chars == 2 && (w & 0xffff)) || (pad == 1 && chars == 3 && (w & 0xff)))
			return -1;
		for (size_t k = 0; k + 1 < chars; k++, o++)
			if (o < cap) /* keep validating past cap: -1 takes precedence over -2 */
				out[o] = (uint8_t)(w >> (16 - 8 * k));
	}
	return total > cap ? -2 : (int64_t)total;
}

size_t lane_base64_encode(const uint8_t *in, size_t len, char *out)
{
	size_t o = 0;

	for (size_t i = 0; i < len; i += 3) {
		size_t n = len - i < 3 ? len - i : 3;
		uint32_t w = (uint32_t)in[i] << 16 | (n > 1 ? (uint32_t)in[i + 1] << 8 : 0) | (n > 2 ? in[i + 2] : 0);

		out[o++] = B64[w >> 18 & 63];
		out[o++] = B64[w >> 12 & 63];
		out[o++] = n > 1 ? B64[w >> 6 & 63] : '=';
		out[o++] = n > 2 ? B64[w & 63] : '=';
	}
	return o;
}

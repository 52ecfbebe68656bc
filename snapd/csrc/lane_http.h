/* The fast lane's request parser: decides from the bytes read so far whether
 * they are a complete `POST /v1/clones` or `POST /v1/clones/{id}/invoke` the
 * lane can serve without Python.
 * Pure parsing, no I/O. The rule throughout: anything the lane might read
 * differently from snapd/http_wire.py + vmm/api/fields.py is LANE_SLOW, and
 * the Python reader takes it from the same bytes. */
#ifndef SNAPD_LANE_HTTP_H
#define SNAPD_LANE_HTTP_H
#include <stddef.h>
#include <stdint.h>

#define LANE_NEED_MORE 0  /* not complete yet and still possibly a fast request: read more bytes */
#define LANE_FAST 1       /* a complete request the lane serves: fields in *out */
#define LANE_SLOW 2       /* anything else: the Python reader takes it from the same bytes */
#define LANE_MAX_TIMEOUT_MS 3600000  /* snapd/daemon/http.py MAX_TIMEOUT_MS: above it, Python's 400 */
#define LANE_REQ_CREATE 1  /* POST /v1/clones */
#define LANE_REQ_INVOKE 2  /* POST /v1/clones/{clone}/invoke */

struct lane_request {
	int kind;                                 /* LANE_REQ_CREATE or LANE_REQ_INVOKE */
	const char *clone; size_t clone_len;      /* INVOKE: the clone id in the path, into buf */
	size_t consumed;                          /* bytes of buf this request takes (head + body) */
	int keep_alive;                           /* 0 on "Connection: close" */
	const char *image; size_t image_len;      /* CREATE: points into buf */
	const char *payload; size_t payload_len;  /* the base64 text, into buf; payload == NULL when absent */
	int64_t count;                            /* 1 when absent */
	int64_t timeout_ms;                       /* 10000 when absent */
	size_t need;                              /* LANE_NEED_MORE with the head complete: the bytes the whole
	                                             request takes (head + Content-Length); 0 otherwise */
};

/* LANE_NEED_MORE, LANE_FAST or LANE_SLOW for buf[0..len); *out is only
 * meaningful on LANE_FAST. max_head and max_body must not exceed Python's
 * MAX_HEAD and MAX_BODY (http_wire), or the lane would take what it refuses. */
int lane_parse_clone_request(const char *buf, size_t len, size_t max_head, size_t max_body,
                             struct lane_request *out);

/* Strict base64 (RFC 4648 alphabet, padded to a multiple of 4, '=' only as the last 1-2 chars, canonical
   trailing bits). Returns the decoded length, -1 if `in` is not such base64, -2 if the result exceeds cap. */
int64_t lane_base64_decode(const char *in, size_t len, uint8_t *out, size_t cap);

/* Returns 4*((len+2)/3), the bytes written to out (no NUL). */
size_t lane_base64_encode(const uint8_t *in, size_t len, char *out);

#endif

"""cffi API-mode builder for snapd._lane_native: the restore fast lane, in C.

An isolated restore request on these nested hosts is decided by how much code runs on its path after the CPUs
idled (docs/benchmarks.md, "Cold CPUs"): the same Python that takes 20 us warm takes 150-250 us cold. The lane
is the prepared-clone restore without Python on its path: the daemon's side reads and answers the HTTP request
(lane_http.c, lane_daemon.c), the worker's side answers it from the held vCPU (lane_held.c). Anything the lane
does not take goes the ordinary Python way, from the same bytes. Works from setup.py's cffi_modules and when
run directly (`python snapd/_lane_build.py` compiles in place).
"""
import os

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join("snapd", "csrc")  # relative to ROOT: setuptools wants relative sources

HTTP_CDEF = """
/* lane_http.h */
#define LANE_NEED_MORE ...
#define LANE_FAST ...
#define LANE_SLOW ...
#define LANE_REQ_CREATE ...
#define LANE_REQ_INVOKE ...
struct lane_request {
    int kind;
    const char *clone; size_t clone_len;
    size_t consumed;
    int keep_alive;
    const char *image; size_t image_len;
    const char *payload; size_t payload_len;
    int64_t count;
    int64_t timeout_ms;
};
int lane_parse_clone_request(const char *buf, size_t len, size_t max_head, size_t max_body,
                             struct lane_request *out);
int64_t lane_base64_decode(const char *in, size_t len, uint8_t *out, size_t cap);
size_t lane_base64_encode(const uint8_t *in, size_t len, char *out);
"""

HELD_CDEF = """
/* lane_proto.h */
#define LANE_IMAGE_MAX ...
#define LANE_MAX_MESSAGE ...
#define LANE_FLAG_INVOKE ...
#define LANE_FLAG_LIVE ...
#define LANE_OK ...
#define LANE_ERR_TIMEOUT ...
#define LANE_ERR_INVOCATION ...
#define LANE_ERR_VMM ...
#define LANE_ERR_PROTOCOL ...
struct lane_restore_msg { uint32_t flags; uint64_t id; uint64_t timeout_ns; ...; };
struct lane_reply_msg { int32_t status; uint64_t id; uint64_t generation; uint64_t generation_ns;
                        uint64_t invoke_ns; uint64_t total_ns; ...; };

/* lane_held.h */
#define LANE_HELD_MAX_FDS ...
#define LANE_HELD_EOF ...
#define LANE_HELD_MESSAGE ...
#define LANE_HELD_SERVED ...
#define LANE_HELD_FALLBACK ...
struct lane_held {
    int armed; int stop; int live; uint64_t generation; int vcpu_fd; void *run; uint64_t mailbox; uint32_t req_cap, resp_cap; uint64_t seq;
    uint16_t fn_next_port, fn_done_port; char image[...]; uint64_t live_served, live_written;
    ...;
};
struct lane_held_result {
    uint64_t message_len; int32_t nfds; int32_t fds[...]; int32_t truncated;
    uint64_t id, generation, seq; uint32_t flags; uint64_t timeout_ns; uint64_t payload_offset, payload_len;
    int32_t exit_pending; int32_t parked; int32_t run_errno; uint64_t deadline_ns; uint64_t generation_ns, invoke_ns;
    ...;
};
struct lane_channel;
struct lane_channel *lane_channel_new(int fd);
const uint8_t *lane_channel_buffer(struct lane_channel *ch);
void lane_channel_free(struct lane_channel *ch);
int lane_held_serve(struct lane_channel *ch, struct lane_held *held, struct lane_held_result *res);
"""

DAEMON_CDEF = """
/* lane_daemon.h */
#define LANE_CONN_EOF ...
#define LANE_CONN_SLOW ...
#define LANE_CONN_SERVED ...
#define LANE_CONN_HANDOFF ...
#define LANE_STAGE_UNSENT ...
#define LANE_STAGE_SENT ...
#define LANE_STAGE_REFUSED ...
#define LANE_STAGE_UNWRITTEN ...
#define LANE_TICKET_UNKNOWN ...
#define LANE_TICKET_WITHDRAWN ...
#define LANE_TICKET_TAKEN ...
struct lane_served {
    int32_t kind; uint64_t token; uint64_t request_id; int32_t keep_alive; int32_t stage; int32_t status; int32_t invoke;
    int64_t timeout_ms; uint64_t generation; uint64_t generation_ns, invoke_ns;
    double restore_us; double created; uint64_t data_len;
    ...;
};
struct lane_lock;
struct lane_lock *lane_lock_new(void);
void lane_lock_free(struct lane_lock *l);
int lane_lock_acquire(struct lane_lock *l, int blocking);
int lane_lock_release(struct lane_lock *l);
struct lane_board;
struct lane_board *lane_board_new(int64_t capacity, const char *server);
void lane_board_free(struct lane_board *b);
int lane_board_offer(struct lane_board *b, uint64_t token, const char *image, int worker_fd, uint32_t req_cap,
                     uint64_t request_id, const char *fields, size_t fields_len);
int lane_board_offer_clone(struct lane_board *b, uint64_t token, const char *clone, const char *image,
                           int worker_fd, struct lane_lock *lock, uint32_t req_cap, uint64_t first_id);
int lane_board_withdraw(struct lane_board *b, uint64_t token);
void lane_board_untake(struct lane_board *b, uint64_t token);
int lane_board_taken(struct lane_board *b, uint64_t token);
void lane_board_settle(struct lane_board *b, uint64_t token);
int lane_board_close_image(struct lane_board *b, const char *image, int closed);
int lane_board_reserve(struct lane_board *b);
void lane_board_release(struct lane_board *b);
int64_t lane_board_room(struct lane_board *b);
uint64_t lane_board_invocations(struct lane_board *b);
struct lane_conn;
struct lane_conn *lane_conn_new(int fd);
void lane_conn_free(struct lane_conn *c);
int lane_conn_serve(struct lane_conn *c, struct lane_board *b, struct lane_served *out);
size_t lane_conn_pending(struct lane_conn *c);
size_t lane_conn_take(struct lane_conn *c, uint8_t *out, size_t cap);
int lane_conn_push(struct lane_conn *c, const uint8_t *data, size_t len);
const uint8_t *lane_conn_data(struct lane_conn *c);
"""

SOURCES = ["lane_http.c", "lane_held.c", "lane_daemon.c"]

ffibuilder = FFI()
ffibuilder.cdef(HTTP_CDEF + HELD_CDEF + DAEMON_CDEF)
ffibuilder.set_source(
    "snapd._lane_native",
    """
    #include "lane_http.h"
    #include "lane_held.h"
    #include "lane_daemon.h"
    """,
    sources=[os.path.join(CSRC, name) for name in SOURCES],
    include_dirs=[CSRC],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
)

if __name__ == "__main__":
    os.chdir(ROOT)  # paths above are relative to the repo root; cffi builds in tmpdir, so build there
    ffibuilder.compile(tmpdir=ROOT, verbose=False)

"""cffi API-mode builder for snapd._lane_native: the restore fast lane, in C.

An isolated restore request on these nested hosts is decided by how much code runs on its path after the CPUs
idled (docs/benchmarks.md, "Cold CPUs"): the same Python that takes 20 us warm takes 150-250 us cold. The lane
is the prepared-clone restore without Python on its path: the daemon's side reads and answers the HTTP request
(lane_http.c, lane_daemon.c), the worker's side answers it from the held vCPU (lane_held.c); every API connection
of the daemon waits in one epoll set that its handler threads share (lane_server.c). Anything the lane
does not take goes the ordinary Python way, from the same bytes. Works from setup.py's cffi_modules and when
run directly (`python snapd/_lane_build.py` compiles in place).
"""
import os
import re

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join("snapd", "csrc")  # relative to ROOT: setuptools wants relative sources


HELD_CDEF = """
/* lane_proto.h */
#define LANE_IMAGE_MAX ...
#define LANE_MAX_MESSAGE ...
#define LANE_FLAG_INVOKE ...
#define LANE_FLAG_LIVE ...
#define LANE_REPLY_GRACE_MS ...
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
    int armed; int stop; int live; uint64_t generation; uint64_t park_budget_ns; int vcpu_fd; void *run; uint64_t mailbox; uint64_t region_start, region_end;
    uint32_t req_cap, resp_cap; uint64_t seq;
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

def header_cdef(name: str) -> str:
    """One of our headers as cffi's cdef, so that its declarations are written once: preprocessor lines dropped,
    each `#define NAME value` as `#define NAME ...` (cffi takes the value from the compiler). Only for headers
    without macro-sized arrays (lane_http.h, lane_daemon.h); the others keep a hand-written cdef."""
    lines = []
    with open(os.path.join(ROOT, CSRC, name)) as f:
        for line in f:
            define = re.match(r"#define (\w+)\s+\S", line)
            if define:
                lines.append(f"#define {define.group(1)} ...\n")
            elif not line.startswith("#"):
                lines.append(line)
    return "".join(lines)


HTTP_CDEF = header_cdef("lane_http.h")
DAEMON_CDEF = header_cdef("lane_daemon.h")
SERVER_CDEF = header_cdef("lane_server.h")

SOURCES = ["lane_http.c", "lane_held.c", "lane_daemon.c", "lane_server.c"]

ffibuilder = FFI()
ffibuilder.cdef(HTTP_CDEF + HELD_CDEF + DAEMON_CDEF + SERVER_CDEF)
ffibuilder.set_source(
    "snapd._lane_native",
    """
    #include "lane_http.h"
    #include "lane_held.h"
    #include "lane_daemon.h"
    #include "lane_server.h"
    """,
    sources=[os.path.join(CSRC, name) for name in SOURCES],
    include_dirs=[CSRC],
    libraries=["pthread"],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
)

if __name__ == "__main__":
    os.chdir(ROOT)  # paths above are relative to the repo root; cffi builds in tmpdir, so build there
    ffibuilder.compile(tmpdir=ROOT, verbose=False)

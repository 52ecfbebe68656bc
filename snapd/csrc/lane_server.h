/* The daemon's API connections, all in one epoll set that a bounded pool of handler threads waits on together
 * (leader/followers): the thread that gets a connection's event serves that connection's request itself, so no
 * request waits for a hand-off between threads, and a connection holds no thread while it is idle or while a
 * request is still arriving. A connection is owned either by the epoll set (armed, EPOLLONESHOT: at most one
 * thread gets its event) or by exactly one thread (busy); the owner re-arms it or removes it.
 *
 * A connection in lane mode is read here, in C, without the GIL: the bytes go into its lane_conn and a whole
 * request the restore lane takes is served on the spot (lane_daemon.c), so a prepared restore stays C from the
 * request's bytes to its 201. Anything else is handed to Python (snapd/daemon/http.py) with its bytes; a
 * connection in Python mode (the TCP listener's, or one whose request Python is still reading) is only reported
 * readable. Deadlines: an armed connection idle between requests longer than idle_timeout, or whose request
 * began arriving more than request_timeout ago, is claimed by lane_server_expire for Python to answer and close.
 */
#ifndef SNAPD_LANE_SERVER_H
#define SNAPD_LANE_SERVER_H

#include <stdint.h>
#include "lane_daemon.h"

/* what lane_server_wait and lane_server_resume return (the event's kind) */
#define LANE_EV_TIMEOUT 0   /* nothing within the wait's timeout */
#define LANE_EV_STOP 1      /* lane_server_stop was called */
#define LANE_EV_ARMED 2     /* resume: the connection waits for more bytes again (armed; no longer the caller's) */
#define LANE_EV_READY 3     /* a Python-mode connection is readable: Python reads it */
#define LANE_EV_EOF 4       /* the client closed it (or it failed) between requests, or was answered and left */
#define LANE_EV_SLOW 5      /* a request for Python: its bytes are in the lane buffer (lane_conn_take) */
#define LANE_EV_SERVED 6    /* the lane answered a request: served says what Python records */
#define LANE_EV_HANDOFF 7   /* the lane took a ticket and stopped: served says where (lane_daemon.h) */
/* FULL: a request the lane would serve, but no other handler thread is waiting for events: Python adds a thread
 * (if it may) and resumes with force */
#define LANE_EV_FULL 8

/* lane_server_expire's kinds */
#define LANE_EXPIRED_IDLE 1     /* between requests for idle_timeout: close it */
#define LANE_EXPIRED_REQUEST 2  /* a request began arriving request_timeout ago and is not whole: 408, close */

struct lane_event {
    uint64_t handle;
    int32_t kind;
    struct lane_served served;  /* SERVED, HANDOFF */
};

struct lane_server;
struct lane_server *lane_server_new(uint32_t max_conns, struct lane_board *board, int64_t request_timeout_ms,
                                    int64_t idle_timeout_ms);
void lane_server_stop(struct lane_server *s);  /* every wait returns LANE_EV_STOP from now on */
void lane_server_free(struct lane_server *s);  /* after every thread left lane_server_* and all were removed */
/* A connection (fd: a blocking stream socket; lane: its requests may go through the restore lane), owned by the
 * caller until it arms it: its handle, or -ENOSPC at max_conns, -ENOMEM. */
int64_t lane_server_add(struct lane_server *s, int fd, int lane);
int lane_server_wait(struct lane_server *s, int timeout_ms, struct lane_event *ev);
/* The caller's connection back to lane mode: its buffered bytes and what has come are parsed (and served) as
 * an event would; force: serve even if no other thread waits. */
int lane_server_resume(struct lane_server *s, uint64_t handle, int force, struct lane_event *ev);
/* The caller's connection armed in Python mode (lane = 0) or lane mode; request_start_ns: when the first byte
 * of the request Python is still reading came (CLOCK_MONOTONIC), 0 between requests. 0 or -errno. */
int lane_server_arm(struct lane_server *s, uint64_t handle, int lane, uint64_t request_start_ns);
void lane_server_remove(struct lane_server *s, uint64_t handle);  /* the caller's: forgotten (fd not closed) */
/* Armed connections past a deadline, claimed for the caller (to answer and remove): how many, up to cap. */
int lane_server_expire(struct lane_server *s, uint64_t *handles, int32_t *kinds, int cap);
/* Armed connections with bytes waiting unread (requests queued while every handler thread is busy), claimed for
 * the caller (to refuse and remove): how many, up to cap. */
int lane_server_claim_queued(struct lane_server *s, uint64_t *handles, int cap);
struct lane_conn *lane_server_conn(struct lane_server *s, uint64_t handle);  /* NULL: no lane for it */
int lane_server_waiting(struct lane_server *s);  /* threads waiting for events now */
uint32_t lane_server_count(struct lane_server *s);  /* connections open */

#endif

/* The daemon's side of the restore lane: `POST /v1/clones` for an image whose held prepared worker is on the
 * board is read, sent to that worker, and answered on the client's connection in C; the daemon's Python
 * records the clone afterwards (snapd/daemon/lane.py). `POST /v1/clones/{id}/invoke` for a live clone on the
 * board is read, sent to its worker and answered in C too, with nothing left for Python to record. The board
 * also counts clones against the daemon's limit, for both paths, so that neither can start a clone the other
 * has no room for. */
#ifndef SNAPD_LANE_DAEMON_H
#define SNAPD_LANE_DAEMON_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* what lane_conn_serve returns */
#define LANE_CONN_EOF 0       /* the client closed the connection between requests */
#define LANE_CONN_SLOW 1      /* the buffered bytes are a request for Python (lane_conn_take) */
#define LANE_CONN_SERVED 2    /* answered; out says what Python records */
#define LANE_CONN_HANDOFF 3   /* the request is consumed and a ticket taken; out->stage says where it stopped */
#define LANE_CONN_MORE 4      /* lane_conn_step: not a whole request yet, and still possibly the lane's */
#define LANE_CONN_FULL 5      /* lane_conn_step: a request the lane would serve, not served (may_serve = 0) */

#define LANE_STAGE_UNSENT 1   /* the worker refused the message (it is gone) */
#define LANE_STAGE_SENT 2     /* sent; no lane reply read yet (another message came first, or the wait ran out) */
#define LANE_STAGE_REFUSED 3  /* the worker answered with an error: out->status, the text in lane_conn_data */
#define LANE_STAGE_UNWRITTEN 4 /* restored, but the answer could not be written to the client */

/* lane_board_withdraw */
#define LANE_TICKET_UNKNOWN 0
#define LANE_TICKET_WITHDRAWN 1
#define LANE_TICKET_TAKEN 2

struct lane_served {
    int32_t kind;              /* LANE_REQ_CREATE or LANE_REQ_INVOKE (lane_http.h) */
    uint64_t token;            /* the ticket taken */
    uint64_t request_id;       /* in the LANE_RESTORE sent */
    int32_t keep_alive;
    int32_t stage;
    int32_t status;            /* REFUSED: the reply's status (lane_proto.h) */
    int32_t invoke;            /* the request carried a payload */
    int64_t timeout_ms;
    uint64_t generation;
    uint64_t generation_ns, invoke_ns;
    double restore_us;         /* request read -> the worker's reply (the daemon's restore latency) */
    double created;            /* the clone's creation time (wall clock, s), as in its JSON */
    uint64_t data_len;         /* HANDOFF: the payload (UNSENT, SENT), the error text (REFUSED) */
};

/* A worker channel's lock, shared by this C side and the daemon's Python (WorkerHandle.lock): whoever sends a
 * request on the channel holds it until that request's reply is read. */
struct lane_lock;
struct lane_lock *lane_lock_new(void);
void lane_lock_free(struct lane_lock *l);
int lane_lock_acquire(struct lane_lock *l, int blocking);  /* 1: acquired; 0: not (blocking = 0 and held) */
int lane_lock_release(struct lane_lock *l);  /* 0, or EPERM: not held by this thread */

struct lane_board;
struct lane_board *lane_board_new(int64_t capacity, const char *server);
void lane_board_free(struct lane_board *b);
/* A held prepared worker of `image` for the next fast restore, with the clone's JSON fields rendered ahead. */
int lane_board_offer(struct lane_board *b, uint64_t token, const char *image, int worker_fd, uint32_t req_cap,
                     uint64_t request_id, const char *fields, size_t fields_len);
/* A live clone whose invocations the lane may answer; request ids from first_id on (not the Python side's). */
int lane_board_offer_clone(struct lane_board *b, uint64_t token, const char *clone, const char *image,
                           int worker_fd, struct lane_lock *lock, uint32_t req_cap, uint64_t first_id);
/* A taken clone ticket is marked withdrawn instead (LANE_TICKET_TAKEN): it goes when its invocation is over. */
int lane_board_withdraw(struct lane_board *b, uint64_t token);
/* A clone ticket taken by an invocation the lane handed to Python: offered again (Python is done with it). */
void lane_board_untake(struct lane_board *b, uint64_t token);
int lane_board_taken(struct lane_board *b, uint64_t token);  /* 1 while a taken ticket is not settled */
void lane_board_settle(struct lane_board *b, uint64_t token);
/* closed = 1: the image's tickets are taken no more; returns how many of them are taken and not settled */
int lane_board_close_image(struct lane_board *b, const char *image, int closed);
int lane_board_reserve(struct lane_board *b);  /* 1: a clone may start (counted), 0: the daemon is at its limit */
void lane_board_release(struct lane_board *b);
int64_t lane_board_room(struct lane_board *b);
uint64_t lane_board_invocations(struct lane_board *b);  /* live invocations the lane answered */

struct lane_conn;
struct lane_conn *lane_conn_new(int fd);
void lane_conn_free(struct lane_conn *c);
int lane_conn_serve(struct lane_conn *c, struct lane_board *b, struct lane_served *out);
size_t lane_conn_pending(struct lane_conn *c);  /* bytes buffered */
size_t lane_conn_take(struct lane_conn *c, uint8_t *out, size_t cap);
int lane_conn_push(struct lane_conn *c, const uint8_t *data, size_t len);
const uint8_t *lane_conn_data(struct lane_conn *c);
/* Non-blocking use, for a connection an epoll loop watches (lane_server.h): lane_conn_recv reads what has come
 * (MSG_DONTWAIT; the bytes added, or -errno with nothing read; *eof once the client has closed), lane_conn_step
 * serves a whole buffered request the lane takes (SERVED, HANDOFF, EOF: answered, client gone), or says MORE,
 * SLOW, or FULL (a request it would serve, when may_serve is 0: nothing consumed). */
int lane_conn_fd(struct lane_conn *c);
ssize_t lane_conn_recv(struct lane_conn *c, int *eof);
int lane_conn_step(struct lane_conn *c, struct lane_board *b, int may_serve, struct lane_served *out);

#endif

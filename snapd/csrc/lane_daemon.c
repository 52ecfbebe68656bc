/* The daemon's side of the restore lane (lane_daemon.h).
 *
 * An invocation of a live clone (`POST /v1/clones/{id}/invoke`) whose ticket is on the board is sent to its
 * worker as a LANE_RESTORE with LANE_FLAG_LIVE, under the worker channel's lock, and its 200 written here. A
 * clone ticket goes back on the board at once; Python has nothing to record.
 *
 * A connection is read here until a whole request is buffered. lane_http.c decides whether it is a
 * `POST /v1/clones` the lane serves; if the board has a ticket for its image (a held prepared worker, offered
 * by the daemon's Python with the clone's JSON fields rendered ahead) and the daemon has room for a clone, the
 * restore goes to that worker as a LANE_RESTORE struct, its LANE_REPLY comes back, and the 201 is written
 * here. Anything else returns to Python at a defined point: before the request is consumed (SLOW: Python
 * reads it from the same bytes) or after (HANDOFF: the ticket is taken, out->stage says how far it got). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include "lane_buffer.h"
#include "lane_daemon.h"
#include "lane_http.h"
#include "lane_proto.h"

/* as snapd/http_wire.py MAX_HEAD and MAX_BODY */
#define MAX_HEAD (64u << 10)
#define MAX_BODY (1u << 20)
#define IN_CAP (MAX_HEAD + MAX_BODY)
#define MSG_CAP (sizeof(struct lane_restore_msg) + MAX_BODY)
#define REPLY_CAP ((size_t)LANE_MAX_MESSAGE)
#define BODY_CAP (16384 + (LANE_MAX_MESSAGE / 3 + 1) * 4)

enum { FREE, OFFERED, TAKEN };
enum { RESTORE_TICKET = 1, CLONE_TICKET };

struct lane_lock {
    pthread_mutex_t mutex;
};

struct ticket {
    uint64_t token, request_id;  /* CLONE_TICKET: request_id is the next invocation's */
    int kind, state, closed, fd;
    uint32_t req_cap;
    char image[LANE_IMAGE_MAX + 1];
    char clone[LANE_IMAGE_MAX + 1];  /* CLONE_TICKET */
    struct lane_lock *channel;       /* CLONE_TICKET: the worker channel's lock */
    char *fields;
    size_t fields_len;
};

struct lane_board {
    pthread_mutex_t lock;
    uint64_t invocations;  /* live invocations answered here (atomic) */
    int64_t room;         /* clones that may still start, both paths */
    char server[64];      /* the Server header */
    struct ticket *tickets;
    size_t count;
};

struct lane_conn {
    int fd;
    size_t len;           /* bytes buffered in `in` */
    size_t scanned;       /* in[0..scanned) was parsed and holds no end of a head (lane_conn_step) */
    size_t need;          /* the whole request's length, once its head was parsed (0: not known) */
    size_t high;          /* the most bytes `in` held since it was last trimmed */
    uint8_t *in, *msg, *reply, *body;
    const uint8_t *data;  /* lane_conn_data */
    uint8_t *out_map;     /* msg, reply and body: mapped at the first request the lane serves */
};

#define OUT_SIZE (MSG_CAP + REPLY_CAP + BODY_CAP)
#define EARLY_PARSE 128   /* up to here every byte is parsed: the request line decides SLOW early */

/* -- worker channel locks */

struct lane_lock *lane_lock_new(void)
{
    struct lane_lock *l = calloc(1, sizeof(*l));
    pthread_mutexattr_t attr;
    if (!l)
        return NULL;
    /* error-checking: a release by a thread that does not hold it fails, as threading.Lock's would */
    pthread_mutexattr_init(&attr);
    pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(&l->mutex, &attr);
    pthread_mutexattr_destroy(&attr);
    return l;
}

void lane_lock_free(struct lane_lock *l)
{
    if (!l)
        return;
    pthread_mutex_destroy(&l->mutex);
    free(l);
}

int lane_lock_acquire(struct lane_lock *l, int blocking)
{
    return (blocking ? pthread_mutex_lock(&l->mutex) : pthread_mutex_trylock(&l->mutex)) == 0;
}

int lane_lock_release(struct lane_lock *l) { return pthread_mutex_unlock(&l->mutex); }

/* -- the board */

struct lane_board *lane_board_new(int64_t capacity, const char *server)
{
    struct lane_board *b = calloc(1, sizeof(*b));
    if (!b)
        return NULL;
    pthread_mutex_init(&b->lock, NULL);
    b->room = capacity;
    snprintf(b->server, sizeof(b->server), "%s", server);
    return b;
}

void lane_board_free(struct lane_board *b)
{
    if (!b)
        return;
    for (size_t i = 0; i < b->count; i++)
        free(b->tickets[i].fields);
    free(b->tickets);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

static struct ticket *find(struct lane_board *b, uint64_t token)
{
    for (size_t i = 0; i < b->count; i++)
        if (b->tickets[i].state != FREE && b->tickets[i].token == token)
            return &b->tickets[i];
    return NULL;
}

static void clear(struct ticket *t)
{
    free(t->fields);
    memset(t, 0, sizeof(*t));
}

/* A free slot for a new ticket (the board's lock held), or NULL. */
static struct ticket *free_slot(struct lane_board *b)
{
    struct ticket *t = NULL;
    for (size_t i = 0; i < b->count && !t; i++)
        if (b->tickets[i].state == FREE)
            t = &b->tickets[i];
    if (!t) {
        struct ticket *grown = realloc(b->tickets, (b->count + 16) * sizeof(*grown));
        if (!grown)
            return NULL;
        memset(grown + b->count, 0, 16 * sizeof(*grown));
        b->tickets = grown;
        t = &b->tickets[b->count];
        b->count += 16;
    }
    return t;
}

int lane_board_offer(struct lane_board *b, uint64_t token, const char *image, int worker_fd, uint32_t req_cap,
                     uint64_t request_id, const char *fields, size_t fields_len)
{
    if (strlen(image) > LANE_IMAGE_MAX || fields_len > 16384 - 256)
        return -EINVAL;
    char *copy = malloc(fields_len + 1);
    if (!copy)
        return -ENOMEM;
    memcpy(copy, fields, fields_len);
    copy[fields_len] = 0;
    pthread_mutex_lock(&b->lock);
    struct ticket *t = free_slot(b);
    if (!t) {
        pthread_mutex_unlock(&b->lock);
        free(copy);
        return -ENOMEM;
    }
    *t = (struct ticket){ .token = token, .request_id = request_id, .kind = RESTORE_TICKET, .state = OFFERED,
                          .fd = worker_fd, .req_cap = req_cap, .fields = copy, .fields_len = fields_len };
    snprintf(t->image, sizeof(t->image), "%s", image);
    pthread_mutex_unlock(&b->lock);
    return 0;
}

int lane_board_offer_clone(struct lane_board *b, uint64_t token, const char *clone, const char *image,
                           int worker_fd, struct lane_lock *lock, uint32_t req_cap, uint64_t first_id)
{
    if (strlen(image) > LANE_IMAGE_MAX || strlen(clone) > LANE_IMAGE_MAX || !lock)
        return -EINVAL;
    pthread_mutex_lock(&b->lock);
    struct ticket *t = free_slot(b);
    if (t) {
        *t = (struct ticket){ .token = token, .request_id = first_id, .kind = CLONE_TICKET, .state = OFFERED,
                              .fd = worker_fd, .req_cap = req_cap, .channel = lock };
        snprintf(t->image, sizeof(t->image), "%s", image);
        snprintf(t->clone, sizeof(t->clone), "%s", clone);
    }
    pthread_mutex_unlock(&b->lock);
    return t ? 0 : -ENOMEM;
}

int lane_board_withdraw(struct lane_board *b, uint64_t token)
{
    pthread_mutex_lock(&b->lock);
    struct ticket *t = find(b, token);
    int result = !t ? LANE_TICKET_UNKNOWN : t->state == TAKEN ? LANE_TICKET_TAKEN : LANE_TICKET_WITHDRAWN;
    if (result == LANE_TICKET_WITHDRAWN)
        clear(t);
    else if (result == LANE_TICKET_TAKEN && t->kind == CLONE_TICKET)
        t->closed = 1;  /* gone when its invocation is over (untake), never offered again */
    pthread_mutex_unlock(&b->lock);
    return result;
}

int lane_board_taken(struct lane_board *b, uint64_t token)
{
    pthread_mutex_lock(&b->lock);
    struct ticket *t = find(b, token);
    int taken = t && t->state == TAKEN;
    pthread_mutex_unlock(&b->lock);
    return taken;
}

void lane_board_settle(struct lane_board *b, uint64_t token)
{
    pthread_mutex_lock(&b->lock);
    struct ticket *t = find(b, token);
    if (t && t->state == TAKEN)
        clear(t);
    pthread_mutex_unlock(&b->lock);
}

int lane_board_close_image(struct lane_board *b, const char *image, int closed)
{
    int in_flight = 0;
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < b->count; i++) {
        struct ticket *t = &b->tickets[i];
        if (t->state == FREE || t->kind != RESTORE_TICKET || strcmp(t->image, image) != 0)
            continue;
        t->closed = closed;
        in_flight += t->state == TAKEN;
    }
    pthread_mutex_unlock(&b->lock);
    return in_flight;
}

int lane_board_reserve(struct lane_board *b)
{
    pthread_mutex_lock(&b->lock);
    int ok = b->room > 0;
    b->room -= ok;
    pthread_mutex_unlock(&b->lock);
    return ok;
}

void lane_board_release(struct lane_board *b)
{
    pthread_mutex_lock(&b->lock);
    b->room++;
    pthread_mutex_unlock(&b->lock);
}

uint64_t lane_board_invocations(struct lane_board *b) { return __atomic_load_n(&b->invocations, __ATOMIC_RELAXED); }

int64_t lane_board_room(struct lane_board *b)
{
    pthread_mutex_lock(&b->lock);
    int64_t room = b->room;
    pthread_mutex_unlock(&b->lock);
    return room;
}

/* Take the ticket for a request of `image` with a `payload_len`-byte payload (room counted), or NULL. */
static struct ticket take(struct lane_board *b, const char *image, size_t image_len, int64_t payload_len)
{
    struct ticket taken = { .state = FREE };
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < b->count && b->room > 0; i++) {
        struct ticket *t = &b->tickets[i];
        if (t->kind == RESTORE_TICKET && t->state == OFFERED && !t->closed && strlen(t->image) == image_len
            && memcmp(t->image, image, image_len) == 0 && payload_len <= (int64_t)t->req_cap) {
            t->state = TAKEN;
            b->room--;
            taken = *t;  /* its fields stay allocated until lane_board_settle */
            break;
        }
    }
    pthread_mutex_unlock(&b->lock);
    return taken;
}

/* The live clone's ticket for an invocation of `clone` with a `payload_len`-byte payload, its request id
 * reserved, or state FREE. */
static struct ticket take_clone(struct lane_board *b, const char *clone, size_t clone_len, int64_t payload_len)
{
    struct ticket taken = { .state = FREE };
    pthread_mutex_lock(&b->lock);
    for (size_t i = 0; i < b->count; i++) {
        struct ticket *t = &b->tickets[i];
        if (t->kind == CLONE_TICKET && t->state == OFFERED && !t->closed && strlen(t->clone) == clone_len
            && memcmp(t->clone, clone, clone_len) == 0 && payload_len <= (int64_t)t->req_cap) {
            t->state = TAKEN;
            taken = *t;
            t->request_id++;
            break;
        }
    }
    pthread_mutex_unlock(&b->lock);
    return taken;
}

/* A ticket taken for a request the lane then leaves to Python after all (or a clone's, once its invocation
 * is over): offered again, a restore's room given back. */
void lane_board_untake(struct lane_board *b, uint64_t token)
{
    pthread_mutex_lock(&b->lock);
    struct ticket *t = find(b, token);
    if (t && t->state == TAKEN && t->kind == CLONE_TICKET && t->closed) {
        clear(t);  /* withdrawn while taken */
    } else if (t && t->state == TAKEN) {
        t->state = OFFERED;
        b->room += t->kind == RESTORE_TICKET;
    }
    pthread_mutex_unlock(&b->lock);
}

/* The bytes `len` characters of padded base64 decode to (-1: not a padded length). */
static int64_t decoded_length(const char *text, size_t len)
{
    if (len % 4)
        return -1;
    size_t pad = len && text[len - 1] == '=' ? (text[len - 2] == '=' ? 2 : 1) : 0;
    return (int64_t)(len / 4 * 3 - pad);
}

/* -- a connection */

struct lane_conn *lane_conn_new(int fd)
{
    struct lane_conn *c = calloc(1, sizeof(*c));
    if (!c)
        return NULL;
    /* Reservations only: the pages a request or reply reaches are the only ones ever touched. The input buffer
     * is there from the start; the others come with the first request the lane serves (most connections of a
     * busy daemon are idle: they cost a reservation of IN_CAP, not of every buffer). */
    c->in = lane_buffer_map(IN_CAP);
    if (!c->in) {
        free(c);
        return NULL;
    }
    c->fd = fd;
    return c;
}

static int map_out(struct lane_conn *c)
{
    if (c->out_map)
        return 0;
    c->out_map = lane_buffer_map(OUT_SIZE);
    if (!c->out_map)
        return -ENOMEM;
    c->msg = c->out_map;
    c->reply = c->msg + MSG_CAP;
    c->body = c->reply + REPLY_CAP;
    return 0;
}

void lane_conn_free(struct lane_conn *c)
{
    if (!c)
        return;
    munmap(c->in, IN_CAP);
    if (c->out_map)
        munmap(c->out_map, OUT_SIZE);
    free(c);
}

/* The first n buffered bytes are gone (a request taken): what is left is parsed afresh. */
static void consume(struct lane_conn *c, size_t n)
{
    memmove(c->in, c->in + n, c->len - n);
    c->len -= n;
    c->scanned = c->need = 0;
    if (!c->len && c->high) {  /* a large request's pages go back once the buffer is empty */
        lane_buffer_trim(c->in, c->high);
        c->high = 0;
    }
}

size_t lane_conn_pending(struct lane_conn *c) { return c->len; }

size_t lane_conn_take(struct lane_conn *c, uint8_t *out, size_t cap)
{
    size_t n = c->len < cap ? c->len : cap;
    memcpy(out, c->in, n);
    consume(c, n);
    return n;
}

int lane_conn_push(struct lane_conn *c, const uint8_t *data, size_t len)
{
    if (len > IN_CAP - c->len)
        return -ENOSPC;
    memmove(c->in + len, c->in, c->len);
    memcpy(c->in, data, len);
    c->len += len;
    c->scanned = c->need = 0;
    if (c->len > c->high)
        c->high = c->len;
    return 0;
}

const uint8_t *lane_conn_data(struct lane_conn *c) { return c->data; }

#define READ_EOF 3  /* read_request: EOF before a request's first byte (not one of lane_http.h's answers) */

/* Until a whole request is buffered: LANE_FAST / LANE_SLOW, READ_EOF, or -errno. */
static int read_request(struct lane_conn *c, struct lane_request *req)
{
    for (;;) {
        int r = c->len ? lane_parse_clone_request((const char *)c->in, c->len, MAX_HEAD, MAX_BODY, req)
                       : LANE_NEED_MORE;
        if (r != LANE_NEED_MORE || c->len == IN_CAP)
            return r == LANE_NEED_MORE ? LANE_SLOW : r;
        ssize_t n = recv(c->fd, c->in + c->len, IN_CAP - c->len, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)  /* EOF or an error mid-request: Python's reader sees it and answers as it always does */
            return c->len ? LANE_SLOW : (n == 0 ? READ_EOF : -errno);
        c->len += (size_t)n;
        if (c->len > c->high)
            c->high = c->len;
    }
}

static int send_all(int fd, struct iovec *iov, int n)
{
    while (n > 0) {
        struct msghdr msg = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t sent = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        while (n > 0 && (size_t)sent >= iov->iov_len) {
            sent -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + sent;
            iov->iov_len -= (size_t)sent;
        }
    }
    return 0;
}

/* One message to a worker's channel (a signal interrupting the send is no failure); -1: it refused. */
static int send_message(int fd, const void *msg, size_t len)
{
    ssize_t n;
    do
        n = send(fd, msg, len, MSG_NOSIGNAL);
    while (n < 0 && errno == EINTR);
    return n < 0 ? -1 : 0;
}

/* The worker's LANE_REPLY to request `id` into c->reply: its length, 0 when Python must go on waiting. */
static size_t await_reply(struct lane_conn *c, int fd, uint64_t id, int64_t timeout_ms)
{
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int wait = timeout_ms + LANE_REPLY_GRACE_MS > 0x7fffffff ? 0x7fffffff : (int)(timeout_ms + LANE_REPLY_GRACE_MS);
    int r;
    do
        r = poll(&p, 1, wait);
    while (r < 0 && errno == EINTR);
    if (r <= 0 || !(p.revents & POLLIN))
        return 0;
    struct lane_reply_msg head;
    ssize_t n = recv(fd, &head, sizeof(head), MSG_PEEK | MSG_DONTWAIT);
    if (n < (ssize_t)sizeof(head) || memcmp(head.magic, LANE_REPLY_MAGIC, 4) != 0 || head.id != id)
        return 0;  /* an event the worker sent unasked, or not ours: Python's reader handles it */
    n = recv(fd, c->reply, REPLY_CAP, MSG_DONTWAIT);
    return n >= (ssize_t)sizeof(head) ? (size_t)n : 0;
}

/* The worker's LANE_REPLY (n bytes in c->reply) into out, and its result; -1 when it is a refusal (stage
 * REFUSED, its error text as the hand-off's data). */
static int take_reply(struct lane_conn *c, size_t n, uint64_t t0, struct lane_served *out, const uint8_t **result,
                      size_t *result_len)
{
    const struct lane_reply_msg *reply = (const struct lane_reply_msg *)c->reply;
    out->restore_us = (double)(lane_now_ns() - t0) / 1e3;
    *result = c->reply + sizeof(*reply);
    *result_len = n - sizeof(*reply);
    out->status = reply->status;
    out->generation = reply->generation;
    out->generation_ns = reply->generation_ns;
    out->invoke_ns = reply->invoke_ns;
    if (reply->status == LANE_OK)
        return 0;
    out->stage = LANE_STAGE_REFUSED;
    c->data = *result;
    out->data_len = *result_len;
    return -1;
}

static size_t http_date(char *out, size_t cap)
{
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    return strftime(out, cap, "%a, %d %b %Y %H:%M:%S GMT", &tm);
}

/* The head (status line, Server, Date, Content-Type, Content-Length) and `body`, as http_wire.response writes
 * them; 0, or -1 if the client is gone. */
static int write_response(struct lane_conn *c, struct lane_board *b, const char *status, const char *body,
                          size_t len, int keep_alive)
{
    char date[64], head[512];
    http_date(date, sizeof(date));
    int head_len = snprintf(head, sizeof(head), "HTTP/1.1 %s\r\nServer: %s\r\nDate: %s\r\n%s"
                            "Content-Type: application/json\r\nContent-Length: %zu\r\n\r\n", status, b->server,
                            date, keep_alive ? "" : "Connection: close\r\n", len);
    struct iovec iov[2] = { { head, (size_t)head_len }, { (void *)body, len } };
    return send_all(c->fd, iov, 2);
}

/* `POST /v1/clones/{id}/invoke` of a live clone on the board: LANE_RESTORE + LANE_FLAG_LIVE to its worker under
 * the channel's lock, the 200 written here. A stop after the ticket is taken is Python's (HANDOFF); at stage
 * SENT the channel's lock is still held, for Python to read the reply and release it. */
static int serve_invoke(struct lane_conn *c, struct lane_board *b, const struct lane_request *req,
                        struct lane_served *out)
{
    struct lane_restore_msg *msg = (struct lane_restore_msg *)c->msg;
    uint8_t *payload = c->msg + sizeof(*msg);
    int64_t payload_len = decoded_length(req->payload, req->payload_len);
    if (payload_len < 0)
        return LANE_CONN_SLOW;
    struct ticket t = take_clone(b, req->clone, req->clone_len, payload_len);
    if (t.state != TAKEN)
        return LANE_CONN_SLOW;  /* not on the board (failed, gone, busy) or too large: Python's answer */
    if (lane_base64_decode(req->payload, req->payload_len, payload, MAX_BODY) != payload_len) {
        lane_board_untake(b, t.token);
        return LANE_CONN_SLOW;
    }
    uint64_t t0 = lane_now_ns();
    out->token = t.token;
    out->request_id = t.request_id;
    out->keep_alive = req->keep_alive;
    out->timeout_ms = req->timeout_ms;
    out->invoke = 1;
    consume(c, req->consumed);  /* the request is ours now */

    memcpy(msg->magic, LANE_RESTORE_MAGIC, 4);
    msg->flags = LANE_FLAG_INVOKE | LANE_FLAG_LIVE;
    msg->id = t.request_id;
    msg->timeout_ns = (uint64_t)req->timeout_ms * 1000000ull;
    memset(msg->image, 0, sizeof(msg->image));
    memcpy(msg->image, t.image, strlen(t.image));
    c->data = payload;
    out->data_len = (uint64_t)payload_len;
    lane_lock_acquire(t.channel, 1);
    if (send_message(t.fd, msg, sizeof(*msg) + (size_t)payload_len) < 0) {
        lane_lock_release(t.channel);
        out->stage = LANE_STAGE_UNSENT;
        return LANE_CONN_HANDOFF;
    }
    size_t n = await_reply(c, t.fd, t.request_id, req->timeout_ms);
    if (!n) {
        out->restore_us = (double)(lane_now_ns() - t0) / 1e3;  /* waited so far: Python waits only the rest */
        out->stage = LANE_STAGE_SENT;  /* the channel's lock stays held: Python reads on, then releases it */
        return LANE_CONN_HANDOFF;
    }
    lane_lock_release(t.channel);
    const uint8_t *result;
    size_t result_len;
    if (take_reply(c, n, t0, out, &result, &result_len) != 0)
        return LANE_CONN_HANDOFF;
    lane_board_untake(b, t.token);  /* nothing for Python to record: the clone is on the board again */
    __atomic_add_fetch(&b->invocations, 1, __ATOMIC_RELAXED);  /* counted before the client can see the answer */
    char *body = (char *)c->body;
    size_t len = 12;
    memcpy(body, "{\"result\": \"", len);
    len += lane_base64_encode(result, result_len, body + len);
    len += (size_t)snprintf(body + len, BODY_CAP - len, "\", \"latency_us\": %.1f}", (double)out->invoke_ns / 1e3);
    int written = write_response(c, b, "200 OK", body, len, out->keep_alive);
    lane_buffer_trim(c->msg, sizeof(*msg) + (size_t)payload_len);
    lane_buffer_trim(c->reply, n);
    lane_buffer_trim(c->body, len);
    return written < 0 ? LANE_CONN_EOF : LANE_CONN_SERVED;  /* a client gone: nothing else to do */
}

/* A whole request the lane parsed (LANE_FAST) in c->in: served, or left to Python (SLOW, nothing consumed). */
static int serve_parsed(struct lane_conn *c, struct lane_board *b, const struct lane_request *req,
                        struct lane_served *out)
{
    if (map_out(c) < 0)
        return LANE_CONN_SLOW;  /* no memory for the lane's buffers: Python serves it */
    out->kind = req->kind;
    if (req->kind == LANE_REQ_INVOKE)
        return serve_invoke(c, b, req, out);
    if (req->count != 1)
        return LANE_CONN_SLOW;
    struct lane_restore_msg *msg = (struct lane_restore_msg *)c->msg;
    uint8_t *payload = c->msg + sizeof(*msg);
    int64_t payload_len = req->payload ? decoded_length(req->payload, req->payload_len) : 0;
    if (payload_len < 0)
        return LANE_CONN_SLOW;
    struct ticket t = take(b, req->image, req->image_len, payload_len);
    if (t.state != TAKEN)
        return LANE_CONN_SLOW;  /* no held worker for it, or no room: Python waits for one, or says why not */
    /* decoded only now: a request the lane does not take is decoded once, by Python */
    if (req->payload && lane_base64_decode(req->payload, req->payload_len, payload, MAX_BODY) != payload_len) {
        lane_board_untake(b, t.token);
        return LANE_CONN_SLOW;  /* not strict base64: Python's answer */
    }
    uint64_t t0 = lane_now_ns();
    out->token = t.token;
    out->request_id = t.request_id;
    out->keep_alive = req->keep_alive;
    out->timeout_ms = req->timeout_ms;
    out->invoke = req->payload != NULL;
    consume(c, req->consumed);  /* the request is ours now */

    memcpy(msg->magic, LANE_RESTORE_MAGIC, 4);
    msg->flags = out->invoke ? LANE_FLAG_INVOKE : 0;
    msg->id = t.request_id;
    msg->timeout_ns = (uint64_t)req->timeout_ms * 1000000ull;
    memset(msg->image, 0, sizeof(msg->image));
    memcpy(msg->image, t.image, strlen(t.image));
    c->data = payload;
    out->data_len = (uint64_t)payload_len;
    if (send_message(t.fd, msg, sizeof(*msg) + (size_t)payload_len) < 0) {
        out->stage = LANE_STAGE_UNSENT;
        return LANE_CONN_HANDOFF;
    }
    size_t n = await_reply(c, t.fd, t.request_id, req->timeout_ms);
    if (!n) {
        out->stage = LANE_STAGE_SENT;
        return LANE_CONN_HANDOFF;
    }
    const uint8_t *result;
    size_t result_len;
    if (take_reply(c, n, t0, out, &result, &result_len) != 0)
        return LANE_CONN_HANDOFF;
    struct timespec wall;
    clock_gettime(CLOCK_REALTIME, &wall);
    out->created = (double)wall.tv_sec + (double)wall.tv_nsec / 1e9;

    /* The body: the fields rendered at offer time, then what this restore made (snapd/daemon/lane.py). */
    char *body = (char *)c->body;
    size_t len = (size_t)snprintf(body, BODY_CAP, "{\"clones\": [{%s\"new_generation_us\": %.1f}, \"created\": %.6f, "
                                  "\"restore_us\": %.1f", t.fields, (double)out->generation_ns / 1e3, out->created,
                                  out->restore_us);
    if (out->invoke) {
        memcpy(body + len, ", \"result\": \"", 13);
        len += 13;
        len += lane_base64_encode(result, result_len, body + len);
        len += (size_t)snprintf(body + len, BODY_CAP - len, "\", \"invoke_latency_us\": %.1f",
                                (double)out->invoke_ns / 1e3);
    }
    memcpy(body + len, "}]}", 3);
    len += 3;
    int written = write_response(c, b, "201 Created", body, len, out->keep_alive);
    lane_buffer_trim(c->msg, sizeof(*msg) + (size_t)payload_len);
    lane_buffer_trim(c->reply, n);
    lane_buffer_trim(c->body, len);
    if (written < 0) {
        out->stage = LANE_STAGE_UNWRITTEN;
        return LANE_CONN_HANDOFF;
    }
    return LANE_CONN_SERVED;
}

int lane_conn_serve(struct lane_conn *c, struct lane_board *b, struct lane_served *out)
{
    memset(out, 0, sizeof(*out));
    c->data = NULL;
    struct lane_request req;
    int r = read_request(c, &req);
    if (r != LANE_FAST)
        return r == READ_EOF ? LANE_CONN_EOF : r == LANE_SLOW ? LANE_CONN_SLOW : r;
    return serve_parsed(c, b, &req, out);
}

/* -- non-blocking use (lane_server.c) */

int lane_conn_fd(struct lane_conn *c) { return c->fd; }

ssize_t lane_conn_recv(struct lane_conn *c, int *eof)
{
    size_t before = c->len;
    *eof = 0;
    while (c->len < IN_CAP) {
        ssize_t n = recv(c->fd, c->in + c->len, IN_CAP - c->len, MSG_DONTWAIT);
        if (n > 0) {
            c->len += (size_t)n;
            continue;
        }
        if (n == 0) {
            *eof = 1;
            break;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK)
            break;
        if (c->len == before)
            return -errno;
        *eof = 1;  /* an error after some bytes: they are read as the connection's last */
        break;
    }
    if (c->len > c->high)
        c->high = c->len;
    return (ssize_t)(c->len - before);
}

/* Whether the bytes buffered can have changed the parser's verdict since it last said NEED_MORE: the first
 * EARLY_PARSE bytes always (the request line sends anything else to Python at once), then only a head's end
 * (Python's is \r?\n\r?\n, which always holds "\n\n" or "\n\r\n") among the bytes not yet scanned, or a
 * body complete. So a request dribbled byte by byte costs one scan of its head, not one per byte. */
static int worth_parsing(const struct lane_conn *c)
{
    if (c->len <= EARLY_PARSE || c->len >= MAX_HEAD)
        return 1;
    if (c->need)
        return c->len >= c->need;
    size_t from = c->scanned > 2 ? c->scanned - 2 : 0;
    return memmem(c->in + from, c->len - from, "\n\n", 2) || memmem(c->in + from, c->len - from, "\n\r\n", 3);
}

int lane_conn_step(struct lane_conn *c, struct lane_board *b, int may_serve, struct lane_served *out)
{
    memset(out, 0, sizeof(*out));
    c->data = NULL;
    if (!c->len)
        return LANE_CONN_MORE;
    if (!worth_parsing(c))
        return LANE_CONN_MORE;
    struct lane_request req;
    int r = lane_parse_clone_request((const char *)c->in, c->len, MAX_HEAD, MAX_BODY, &req);
    if (r == LANE_NEED_MORE && c->len < IN_CAP) {
        c->need = req.need;
        c->scanned = c->len;
        return LANE_CONN_MORE;
    }
    if (r != LANE_FAST)
        return LANE_CONN_SLOW;
    if (!may_serve)
        return LANE_CONN_FULL;
    return serve_parsed(c, b, &req, out);
}

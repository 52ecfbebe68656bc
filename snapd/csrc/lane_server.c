/* The daemon's connections in one epoll set, served by whichever handler thread gets their event
 * (lane_server.h).
 *
 * Ownership. Each connection is a slot whose word holds a generation and a state: ARMED (in the epoll set with
 * EPOLLONESHOT: no thread has it), BUSY (one thread has it: the one whose compare-and-swap moved it from ARMED),
 * ARMING (its owner is re-arming it: a thread that got an event for it waits the few instructions until it is
 * ARMED) or FREE. A handle is the generation and the slot's index, and is the epoll event's data: an event left
 * over for a connection that was removed (its generation moved on) claims nothing. Slots are never freed while
 * the server lives, so a thread holding a stale handle never reads freed memory. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>
#include "lane_buffer.h"
#include "lane_server.h"

enum { S_FREE, S_ARMED, S_BUSY, S_ARMING };
#define STOP_HANDLE UINT64_MAX
#define NO_SLOT UINT32_MAX

struct slot {
    uint64_t word;            /* generation << 32 | state (atomic) */
    int fd;
    int lane;                 /* 1: read here (lane mode); 0: Python reads it */
    int added;                /* in the epoll set */
    struct lane_conn *conn;   /* NULL: never through the lane */
    uint64_t request_start;   /* ns: the request being read began arriving; 0: between requests */
    uint64_t idle_since;      /* ns: between requests since */
    uint32_t next_free;
};

struct lane_server {
    int epfd, stopfd;
    struct lane_board *board;
    uint32_t cap, hwm, count, free_head;
    int waiting;
    uint64_t request_timeout_ns, idle_timeout_ns;
    pthread_mutex_t lock;  /* slot allocation */
    struct slot *slots;
};

static inline uint64_t word_of(uint64_t gen, int state) { return gen << 32 | (uint32_t)state; }

struct lane_server *lane_server_new(uint32_t max_conns, struct lane_board *board, int64_t request_timeout_ms,
                                    int64_t idle_timeout_ms)
{
    if (!max_conns || max_conns >= NO_SLOT)
        return NULL;
    struct lane_server *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->slots = calloc(max_conns, sizeof(*s->slots));
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->stopfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (!s->slots || s->epfd < 0 || s->stopfd < 0)
        goto fail;
    struct epoll_event e = { .events = EPOLLIN, .data.u64 = STOP_HANDLE };  /* level: wakes every waiter */
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->stopfd, &e) < 0)
        goto fail;
    pthread_mutex_init(&s->lock, NULL);
    s->board = board;
    s->cap = max_conns;
    s->free_head = NO_SLOT;
    s->request_timeout_ns = (uint64_t)request_timeout_ms * 1000000ull;
    s->idle_timeout_ns = (uint64_t)idle_timeout_ms * 1000000ull;
    return s;
fail:
    if (s->epfd >= 0)
        close(s->epfd);
    if (s->stopfd >= 0)
        close(s->stopfd);
    free(s->slots);
    free(s);
    return NULL;
}

void lane_server_stop(struct lane_server *s)
{
    uint64_t one = 1;
    ssize_t n = write(s->stopfd, &one, sizeof(one));
    (void)n;
}

void lane_server_free(struct lane_server *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < s->hwm; i++)
        lane_conn_free(s->slots[i].conn);
    close(s->epfd);
    close(s->stopfd);
    pthread_mutex_destroy(&s->lock);
    free(s->slots);
    free(s);
}

static struct slot *slot_of(struct lane_server *s, uint64_t handle)
{
    uint32_t index = (uint32_t)handle;
    return index < s->cap ? &s->slots[index] : NULL;
}

int64_t lane_server_add(struct lane_server *s, int fd, int lane)
{
    uint32_t index;
    pthread_mutex_lock(&s->lock);
    if (s->free_head != NO_SLOT) {
        index = s->free_head;
        s->free_head = s->slots[index].next_free;
    } else if (s->hwm < s->cap) {
        index = s->hwm;
        __atomic_store_n(&s->hwm, s->hwm + 1, __ATOMIC_RELEASE);
    } else {
        pthread_mutex_unlock(&s->lock);
        return -ENOSPC;
    }
    s->count++;
    pthread_mutex_unlock(&s->lock);
    struct slot *sl = &s->slots[index];
    uint64_t gen = __atomic_load_n(&sl->word, __ATOMIC_ACQUIRE) >> 32;
    sl->fd = fd;
    sl->added = 0;
    sl->lane = lane;
    sl->conn = lane ? lane_conn_new(fd) : NULL;
    sl->request_start = 0;
    sl->idle_since = lane_now_ns();
    if (lane && !sl->conn) {
        pthread_mutex_lock(&s->lock);
        sl->next_free = s->free_head;
        s->free_head = index;
        s->count--;
        pthread_mutex_unlock(&s->lock);
        return -ENOMEM;
    }
    __atomic_store_n(&sl->word, word_of(gen, S_BUSY), __ATOMIC_RELEASE);
    return (int64_t)(gen << 32 | index);
}

/* The connection is this thread's if it was ARMED with this generation. */
static int claim(struct slot *sl, uint64_t handle)
{
    uint64_t gen = handle >> 32;
    for (;;) {
        uint64_t w = __atomic_load_n(&sl->word, __ATOMIC_ACQUIRE);
        if (w >> 32 != gen)
            return 0;
        uint32_t state = (uint32_t)w;
        if (state == S_ARMING) {  /* its owner is between epoll_ctl and the store that follows it */
            sched_yield();
            continue;
        }
        if (state != S_ARMED)
            return 0;
        if (__atomic_compare_exchange_n(&sl->word, &w, word_of(gen, S_BUSY), 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return 1;
    }
}

/* The owner gives the connection to the epoll set: the next event on it goes to one waiting thread. */
static int arm(struct lane_server *s, struct slot *sl, uint64_t handle)
{
    uint64_t gen = handle >> 32;
    struct epoll_event e = { .events = EPOLLIN | EPOLLONESHOT, .data.u64 = handle };
    __atomic_store_n(&sl->word, word_of(gen, S_ARMING), __ATOMIC_RELEASE);
    int r = epoll_ctl(s->epfd, sl->added ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, sl->fd, &e);
    int err = r < 0 ? errno : 0;
    if (!err)
        sl->added = 1;
    __atomic_store_n(&sl->word, word_of(gen, err ? S_BUSY : S_ARMED), __ATOMIC_RELEASE);
    return -err;
}

static int arm_idle(struct lane_server *s, struct slot *sl, uint64_t handle)
{
    sl->request_start = 0;
    sl->idle_since = lane_now_ns();
    return arm(s, sl, handle);
}

/* What a claimed connection's readiness means: read (lane mode) and serve what the lane takes. */
static int process(struct lane_server *s, struct slot *sl, uint64_t handle, int force, struct lane_event *ev)
{
    ev->handle = handle;
    memset(&ev->served, 0, sizeof(ev->served));
    if (!sl->lane)
        return ev->kind = LANE_EV_READY;
    struct lane_conn *c = sl->conn;
    if (!lane_conn_pending(c))
        sl->request_start = 0;
    int eof;
    if (lane_conn_recv(c, &eof) < 0)
        return ev->kind = LANE_EV_EOF;  /* an error before any byte: the connection is unusable */
    if (!lane_conn_pending(c)) {
        if (eof)
            return ev->kind = LANE_EV_EOF;
        return ev->kind = arm_idle(s, sl, handle) < 0 ? LANE_EV_EOF : LANE_EV_ARMED;
    }
    if (!sl->request_start)
        sl->request_start = lane_now_ns();
    int may_serve = force || __atomic_load_n(&s->waiting, __ATOMIC_ACQUIRE) > 0;
    switch (lane_conn_step(c, s->board, may_serve, &ev->served)) {
    case LANE_CONN_MORE:
        if (eof)  /* cut short: Python's reader answers that as it always does */
            return ev->kind = LANE_EV_SLOW;
        return ev->kind = arm(s, sl, handle) < 0 ? LANE_EV_EOF : LANE_EV_ARMED;
    case LANE_CONN_SERVED:
        return ev->kind = LANE_EV_SERVED;
    case LANE_CONN_HANDOFF:
        return ev->kind = LANE_EV_HANDOFF;
    case LANE_CONN_FULL:
        return ev->kind = LANE_EV_FULL;
    case LANE_CONN_EOF:
        return ev->kind = LANE_EV_EOF;
    default:
        return ev->kind = LANE_EV_SLOW;
    }
}

int lane_server_wait(struct lane_server *s, int timeout_ms, struct lane_event *ev)
{
    for (;;) {
        struct epoll_event e;
        __atomic_add_fetch(&s->waiting, 1, __ATOMIC_ACQ_REL);
        int n = epoll_wait(s->epfd, &e, 1, timeout_ms);
        __atomic_sub_fetch(&s->waiting, 1, __ATOMIC_ACQ_REL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return ev->kind = LANE_EV_TIMEOUT;
        if (e.data.u64 == STOP_HANDLE)
            return ev->kind = LANE_EV_STOP;
        struct slot *sl = slot_of(s, e.data.u64);
        if (!sl || !claim(sl, e.data.u64))
            continue;  /* a connection removed or claimed by the reaper meanwhile */
        int kind = process(s, sl, e.data.u64, 0, ev);
        if (kind != LANE_EV_ARMED)
            return kind;
    }
}

int lane_server_resume(struct lane_server *s, uint64_t handle, int force, struct lane_event *ev)
{
    struct slot *sl = slot_of(s, handle);
    if (!sl)
        return ev->kind = LANE_EV_EOF;
    sl->lane = sl->conn != NULL;
    return process(s, sl, handle, force, ev);
}

int lane_server_arm(struct lane_server *s, uint64_t handle, int lane, uint64_t request_start_ns)
{
    struct slot *sl = slot_of(s, handle);
    if (!sl)
        return -EINVAL;
    sl->lane = lane && sl->conn;
    if (sl->lane && lane_conn_pending(sl->conn) && !request_start_ns)
        request_start_ns = lane_now_ns();
    if (!request_start_ns)
        return arm_idle(s, sl, handle);
    sl->request_start = request_start_ns;
    return arm(s, sl, handle);
}

void lane_server_remove(struct lane_server *s, uint64_t handle)
{
    uint32_t index = (uint32_t)handle;
    struct slot *sl = slot_of(s, handle);
    if (!sl)
        return;
    if (sl->added)
        epoll_ctl(s->epfd, EPOLL_CTL_DEL, sl->fd, NULL);
    lane_conn_free(sl->conn);
    sl->conn = NULL;
    sl->added = 0;
    sl->fd = -1;
    /* a new generation (31 bits: a handle is a positive int64): events queued for the old one claim nothing */
    __atomic_store_n(&sl->word, word_of(((handle >> 32) + 1) & 0x7fffffffu, S_FREE), __ATOMIC_RELEASE);
    pthread_mutex_lock(&s->lock);
    sl->next_free = s->free_head;
    s->free_head = index;
    s->count--;
    pthread_mutex_unlock(&s->lock);
}

static int expired(const struct lane_server *s, const struct slot *sl, uint64_t now)
{
    uint64_t start = sl->request_start;
    if (start)
        return now - start >= s->request_timeout_ns ? LANE_EXPIRED_REQUEST : 0;
    return now - sl->idle_since >= s->idle_timeout_ns ? LANE_EXPIRED_IDLE : 0;
}

int lane_server_expire(struct lane_server *s, uint64_t *handles, int32_t *kinds, int cap)
{
    uint64_t now = lane_now_ns();
    uint32_t hwm = __atomic_load_n(&s->hwm, __ATOMIC_ACQUIRE);
    int n = 0;
    for (uint32_t i = 0; i < hwm && n < cap; i++) {
        struct slot *sl = &s->slots[i];
        uint64_t w = __atomic_load_n(&sl->word, __ATOMIC_ACQUIRE);
        if ((uint32_t)w != S_ARMED || !expired(s, sl, now))
            continue;
        uint64_t handle = (w >> 32) << 32 | i;
        if (!__atomic_compare_exchange_n(&sl->word, &w, word_of(w >> 32, S_BUSY), 0, __ATOMIC_ACQ_REL,
                                         __ATOMIC_ACQUIRE))
            continue;  /* a thread took it meanwhile */
        int kind = expired(s, sl, now);  /* again, now that it is ours: it may have been served and re-armed */
        if (kind == LANE_EXPIRED_IDLE) {
            char byte;
            if (recv(sl->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) > 0)
                kind = 0;  /* a request has just come: it is served, not cut */
        }
        if (!kind) {
            if (arm(s, sl, handle) < 0) {  /* cannot happen short of ENOMEM: then it goes */
                handles[n] = handle;
                kinds[n++] = LANE_EXPIRED_IDLE;
            }
            continue;
        }
        handles[n] = handle;
        kinds[n++] = kind;
    }
    return n;
}

int lane_server_claim_queued(struct lane_server *s, uint64_t *handles, int cap)
{
    uint32_t hwm = __atomic_load_n(&s->hwm, __ATOMIC_ACQUIRE);
    int n = 0;
    for (uint32_t i = 0; i < hwm && n < cap; i++) {
        struct slot *sl = &s->slots[i];
        uint64_t w = __atomic_load_n(&sl->word, __ATOMIC_ACQUIRE);
        if ((uint32_t)w != S_ARMED)
            continue;
        char byte;
        if (recv(sl->fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT) <= 0)
            continue;  /* nothing waiting on it (or only its close) */
        if (__atomic_compare_exchange_n(&sl->word, &w, word_of(w >> 32, S_BUSY), 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            handles[n++] = (w >> 32) << 32 | i;
    }
    return n;
}

struct lane_conn *lane_server_conn(struct lane_server *s, uint64_t handle)
{
    struct slot *sl = slot_of(s, handle);
    return sl ? sl->conn : NULL;
}

int lane_server_waiting(struct lane_server *s) { return __atomic_load_n(&s->waiting, __ATOMIC_ACQUIRE); }

uint32_t lane_server_count(struct lane_server *s)
{
    pthread_mutex_lock(&s->lock);
    uint32_t count = s->count;
    pthread_mutex_unlock(&s->lock);
    return count;
}

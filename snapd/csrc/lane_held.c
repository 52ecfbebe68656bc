/* The worker's side of the restore lane (lane_held.h): the held clone's restore and first invocation, in C,
 * and the later invocations of a live clone parked in FN_NEXT between them.
 *
 * What Python does for the same request, this does in the same order and leaves the same state behind
 * (vmm/devices/fnport.py, docs/function-port.md): a new generation id and 32 bytes of entropy in the mailbox,
 * the payload and its sequence number and length, the FN_NEXT read answered "delivered", KVM_RUN until the
 * guest writes FN_DONE, the reply read from the mailbox. Guest memory is written and read through
 * process_vm_writev/readv as vmm/memory.py does for served memory: a page its page server cannot give is an
 * error here, never a SIGSEGV. The first check that fails before anything was written hands the message to
 * Python untouched; after the invocation reached the guest, Python carries it on (LANE_HELD_FALLBACK). */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "lane_buffer.h"
#include "lane_held.h"

/* mailbox layout and FN_NEXT answers: docs/function-port.md, vmm/devices/fnport.py */
#define MAILBOX_HEADER 128
#define MAILBOX_MAX (1u << 20)   /* the largest mailbox the function port takes (fnport.MAILBOX_MAX) */
#define PAGE_MASK 4095u
#define OFF_SEQ 16
#define OFF_GENERATION 24
#define OFF_REQ_LEN 64
#define NEXT_DELIVERED 1u
#define NEXT_RETRY 0u

struct lane_channel {
    int fd;
    uint8_t *buf;     /* received message; mmap'd, so only the pages a message reaches are ever touched */
    uint8_t *reply;   /* the reply being sent: header + result */
};

struct lane_channel *lane_channel_new(int fd)
{
    struct lane_channel *ch = calloc(1, sizeof(*ch));
    if (!ch)
        return NULL;
    ch->buf = lane_buffer_map(2 * (size_t)LANE_MAX_MESSAGE);
    if (!ch->buf) {
        free(ch);
        return NULL;
    }
    ch->fd = fd;
    ch->reply = ch->buf + LANE_MAX_MESSAGE;
    return ch;
}

const uint8_t *lane_channel_buffer(struct lane_channel *ch) { return ch->buf; }

void lane_channel_free(struct lane_channel *ch)
{
    if (!ch)
        return;
    munmap(ch->buf, 2 * (size_t)LANE_MAX_MESSAGE);
    free(ch);
}

/* The mailbox fields a restore writes, in their order there: OFF_SEQ .. OFF_REQ_LEN + 4, one block. */
struct mailbox_fields {
    uint64_t seq;
    struct { uint64_t id, entropy[4]; } generation;  /* 40 bytes, written on every restore */
    uint32_t req_len;
} __attribute__((packed));
_Static_assert(OFF_GENERATION - OFF_SEQ == 8 && OFF_REQ_LEN - OFF_SEQ == 48, "mailbox layout");

static int self_read(void *dst, uint64_t src, size_t len)
{
    struct iovec local = { dst, len }, remote = { (void *)src, len };
    return process_vm_readv(getpid(), &local, 1, &remote, 1, 0) == (ssize_t)len ? 0 : -1;
}

/* One message and its descriptors; 0 on EOF, -errno on error. */
static long receive(struct lane_channel *ch, struct lane_held_result *res)
{
    union { char space[CMSG_SPACE(LANE_HELD_MAX_FDS * sizeof(int))]; struct cmsghdr align; } control;
    struct iovec iov = { ch->buf, LANE_MAX_MESSAGE };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.space,
                          .msg_controllen = sizeof(control.space) };
    ssize_t n;
    do
        n = recvmsg(ch->fd, &msg, MSG_CMSG_CLOEXEC);
    while (n < 0 && errno == EINTR);
    if (n < 0)
        return errno == ECONNRESET ? 0 : -errno;
    res->nfds = 0;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
            continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < count && res->nfds < LANE_HELD_MAX_FDS; i++)
            memcpy(&res->fds[res->nfds++], CMSG_DATA(c) + i * sizeof(int), sizeof(int));
    }
    res->truncated = (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0;
    res->message_len = (uint64_t)n;
    if (n == 0 && res->nfds == 0)
        return 0;
    return n ? n : 1;
}

/* What this side does with guest memory stays within the mailbox the function port took (vmm/devices/fnport.py
 * checked it too): a page-aligned mailbox whose request and reply areas fit MAILBOX_MAX and lie wholly inside
 * the guest memory region it was armed with, and whose reply area fits this side's reply buffer. Checked on
 * every message, so no value the lane was armed with is used unchecked, whatever set it. */
static int mailbox_sane(const struct lane_held *held)
{
    uint64_t total = (uint64_t)MAILBOX_HEADER + held->req_cap + held->resp_cap;
    return held->mailbox && !(held->mailbox & PAGE_MASK) && total <= MAILBOX_MAX
           && held->mailbox + total > held->mailbox
           && held->mailbox >= held->region_start && held->region_start < held->region_end
           && held->mailbox + total <= held->region_end
           && held->resp_cap <= LANE_MAX_MESSAGE - sizeof(struct lane_reply_msg);
}

/* The held vCPU's pending exit is the FN_NEXT read this clone parked in. */
static int parked_in_next(const struct lane_held *held)
{
    const struct kvm_run *run = held->run;
    return run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN
           && run->io.port == held->fn_next_port && run->io.size == 4 && run->io.count == 1;
}

/* SIGALRM has a handler (held_lane.HeldLane installs one and nothing resets it): checked until it is seen
 * once, so a restore pays the sigaction call only before that. */
static int alarm_ready(void)
{
    static int ready;
    struct sigaction current;
    if (!ready)
        ready = sigaction(SIGALRM, NULL, &current) == 0 && current.sa_handler != SIG_DFL
                && current.sa_handler != SIG_IGN;
    return ready;
}

static void set_alarm(uint64_t ns)
{
    uint64_t us = (ns + 999) / 1000;  /* rounded up: the alarm never comes before the deadline */
    struct itimerval t = { { 0, 0 }, { (time_t)(us / 1000000), (suseconds_t)(us % 1000000) } };
    setitimer(ITIMER_REAL, &t, NULL);
}

/* KVM_RUN until the guest answers; 1: its reply length is in *length, 0: Python takes over (res says why). */
static int run_to_reply(struct lane_held *held, struct lane_held_result *res, uint32_t *length)
{
    struct kvm_run *run = held->run;
    uint64_t now = lane_now_ns();
    if (now >= res->deadline_ns)
        return 0;
    run->immediate_exit = 0;
    set_alarm(res->deadline_ns - now);  /* KVM_RUN returns EINTR on it: a guest that never answers is bounded */
    int done = 0;
    for (;;) {
        if (ioctl(held->vcpu_fd, KVM_RUN, 0) < 0) {
            now = lane_now_ns();
            if (errno == EINTR && !run->immediate_exit && now < res->deadline_ns) {
                set_alarm(res->deadline_ns - now);  /* another signal, or the alarm's rounding: armed again */
                continue;
            }
            if (errno != EINTR)
                res->run_errno = errno;
            break;  /* the deadline, a stop request (immediate_exit) or an error: Python's run_here decides */
        }
        if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_OUT
            && run->io.port == held->fn_done_port && run->io.size == 4 && run->io.count == 1) {
            memcpy(length, (uint8_t *)run + run->io.data_offset, 4);
            done = *length <= held->resp_cap;  /* the guest's value: a longer reply is Python's to refuse */
        }
        res->exit_pending = !done;  /* FN_DONE is complete once read; anything else is Python's to dispatch */
        break;
    }
    set_alarm(0);
    return done;
}

/* After the reply: run the guest on to its next FN_NEXT read and park it there, the read left pending and
 * answered "retry" (as Microvm.hold_at_next does), so the next invocation is handed over here again. An exit of
 * any other kind is left pending for Python's dispatch; the budget, a stop request or an error leave the vCPU
 * between two KVM_RUNs, for Python to carry on. */
static void park_in_next(struct lane_held *held, struct lane_held_result *res)
{
    struct kvm_run *run = held->run;
    uint64_t deadline = lane_now_ns() + held->park_budget_ns;
    if (run->immediate_exit || __atomic_load_n(&held->stop, __ATOMIC_RELAXED))
        return;  /* a stop or pause came during the invocation (kick): Python's */
    set_alarm(held->park_budget_ns);
    for (;;) {
        if (ioctl(held->vcpu_fd, KVM_RUN, 0) < 0) {
            uint64_t now = lane_now_ns();
            if (errno == EINTR && !run->immediate_exit && now < deadline) {
                set_alarm(deadline - now);
                continue;
            }
            if (errno != EINTR)
                res->run_errno = errno;
            break;
        }
        if (parked_in_next(held)) {
            uint32_t retry = NEXT_RETRY;
            memcpy((uint8_t *)run + run->io.data_offset, &retry, 4);
            res->parked = 1;
        } else {
            res->exit_pending = 1;
        }
        break;
    }
    set_alarm(0);
}

/* 0, or -errno: the reply did not go (the caller's Python gives up on the channel, as protocol.send would). */
static int send_reply(struct lane_channel *ch, const struct lane_held_result *res, uint64_t t0, size_t result_len)
{
    struct lane_reply_msg *reply = (struct lane_reply_msg *)ch->reply;
    memcpy(reply->magic, LANE_REPLY_MAGIC, 4);
    reply->status = LANE_OK;
    reply->id = res->id;
    reply->generation = res->generation;
    reply->generation_ns = res->generation_ns;
    reply->invoke_ns = res->invoke_ns;
    reply->total_ns = lane_now_ns() - t0;
    ssize_t sent = send(ch->fd, reply, sizeof(*reply) + result_len, MSG_NOSIGNAL);
    lane_buffer_trim(ch->reply, sizeof(*reply) + result_len);
    if (sent < 0)
        return errno == EPIPE || errno == ECONNRESET ? 0 : -errno;  /* a daemon gone: EOF on the next receive */
    return 0;
}

static int serve_one(struct lane_channel *ch, struct lane_held *held, struct lane_held_result *res)
{
    lane_buffer_trim(ch->buf, res->message_len);  /* the last message's pages, now that Python is done with them */
    memset(res, 0, sizeof(*res));
    long n = receive(ch, res);
    if (n <= 0)
        return n == 0 ? LANE_HELD_EOF : (int)n;
    uint64_t t0 = lane_now_ns();
    const struct lane_restore_msg *msg = (const struct lane_restore_msg *)ch->buf;
    int live = (msg->flags & LANE_FLAG_LIVE) != 0;
    if ((size_t)n < sizeof(*msg) || memcmp(msg->magic, LANE_RESTORE_MAGIC, 4) != 0 || res->nfds || res->truncated
        || !held->armed || live != held->live || strncmp(msg->image, held->image, LANE_IMAGE_MAX) != 0
        || !parked_in_next(held) || !mailbox_sane(held) || !alarm_ready())
        return LANE_HELD_MESSAGE;
    res->id = msg->id;
    res->flags = msg->flags;
    res->timeout_ns = msg->timeout_ns;
    res->payload_offset = sizeof(*msg);
    res->payload_len = (uint64_t)n - sizeof(*msg);
    int invoke = (msg->flags & LANE_FLAG_INVOKE) != 0;
    if ((invoke && res->payload_len > held->req_cap) || (live && !invoke))
        return LANE_HELD_MESSAGE;  /* Python refuses it with the function port's own words */

    /* A restore: a new generation id and fresh entropy, as on every resume from a snapshot (VMGenID). With a
     * payload, the invocation as fnport._next hands it over (payload, sequence number, length). One write. A
     * live clone's invocation writes the sequence number, the length and the payload only. */
    struct mailbox_fields fields;
    if (live)
        fields.generation.id = held->generation;
    else if (getrandom(&fields.generation, sizeof(fields.generation), 0) != (ssize_t)sizeof(fields.generation))
        return LANE_HELD_MESSAGE;
    if (!fields.generation.id)
        fields.generation.id = 1;
    fields.seq = held->seq + (uint64_t)invoke;
    fields.req_len = (uint32_t)res->payload_len;
    const uint8_t *payload = ch->buf + res->payload_offset;
    struct iovec local[3], remote[3];
    int count;
    if (live) {
        local[0] = (struct iovec){ &fields.seq, sizeof(fields.seq) };
        remote[0] = (struct iovec){ (void *)(held->mailbox + OFF_SEQ), sizeof(fields.seq) };
        local[1] = (struct iovec){ &fields.req_len, sizeof(fields.req_len) };
        remote[1] = (struct iovec){ (void *)(held->mailbox + OFF_REQ_LEN), sizeof(fields.req_len) };
        count = 2;
    } else if (invoke) {
        local[0] = (struct iovec){ &fields, sizeof(fields) };
        remote[0] = (struct iovec){ (void *)(held->mailbox + OFF_SEQ), sizeof(fields) };
        count = 1;
    } else {
        local[0] = (struct iovec){ &fields.generation, sizeof(fields.generation) };
        remote[0] = (struct iovec){ (void *)(held->mailbox + OFF_GENERATION), sizeof(fields.generation) };
        count = 1;
    }
    ssize_t want = 0;
    for (int i = 0; i < count; i++)
        want += (ssize_t)local[i].iov_len;
    if (invoke) {
        local[count] = (struct iovec){ (void *)payload, res->payload_len };
        remote[count] = (struct iovec){ (void *)(held->mailbox + MAILBOX_HEADER), res->payload_len };
        want += (ssize_t)res->payload_len;
        count++;
    }
    if (process_vm_writev(getpid(), local, (unsigned long)count, remote, (unsigned long)count, 0) != want)
        return LANE_HELD_MESSAGE;  /* nothing the guest acts on yet: Python writes it all again */
    res->generation = fields.generation.id;
    res->seq = fields.seq;
    uint64_t t1 = lane_now_ns();
    res->generation_ns = t1 - t0;
    held->armed = 0;  /* the clone is the request's now, whatever happens next */
    if (!invoke) {
        int sent = send_reply(ch, res, t0, 0);
        res->parked = 1;  /* still in the read it was held in */
        return sent < 0 ? sent : LANE_HELD_SERVED;
    }

    struct kvm_run *run = held->run;
    uint32_t delivered = NEXT_DELIVERED;
    memcpy((uint8_t *)run + run->io.data_offset, &delivered, 4);
    /* capped (146 years), so the deadline neither wraps nor overflows Python's waits when it carries it on */
    res->deadline_ns = t1 + (res->timeout_ns < (1ull << 62) ? res->timeout_ns : (1ull << 62));

    uint32_t length = 0;
    uint8_t *result = ch->reply + sizeof(struct lane_reply_msg);
    if (!run_to_reply(held, res, &length)
        || self_read(result, held->mailbox + MAILBOX_HEADER + held->req_cap, length) < 0) {
        res->invoke_ns = lane_now_ns() - t1;
        if (length && !res->exit_pending)
            res->exit_pending = 1;  /* the FN_DONE whose reply could not be read: Python's _done reports it */
        return LANE_HELD_FALLBACK;
    }
    res->invoke_ns = lane_now_ns() - t1;
    int sent = send_reply(ch, res, t0, length);
    if (sent < 0)
        return sent;
    res->exit_pending = 0;
    park_in_next(held, res);
    return LANE_HELD_SERVED;
}

int lane_held_serve(struct lane_channel *ch, struct lane_held *held, struct lane_held_result *res)
{
    for (;;) {
        int kind = serve_one(ch, held, res);
        if (kind != LANE_HELD_SERVED || !held->live || !res->parked || __atomic_load_n(&held->stop, __ATOMIC_RELAXED))
            return kind;  /* held->stop: Python disarmed the lane meanwhile (another thread): not armed again */
        /* A live clone's invocation, answered and parked again: the next one is served here too, and Python
         * takes the records (the sequence number, the mailbox bytes written) when it is next called. */
        held->seq = res->seq;
        held->live_served++;
        if (res->payload_len > held->live_written)
            held->live_written = res->payload_len;
        held->armed = 1;
    }
}

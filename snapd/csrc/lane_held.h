/* The worker's side of the restore lane: a prepared clone whose only vCPU is held in its FN_NEXT read
 * (snapd/pool/worker.py _prepare) is restored and invoked here, from the daemon's message to the reply, with
 * no Python on the way; so is a later invocation of a live clone parked there again. Everything this cannot
 * finish goes back to Python in a defined state. */
#ifndef SNAPD_LANE_HELD_H
#define SNAPD_LANE_HELD_H

#include <stddef.h>
#include <stdint.h>
#include "lane_proto.h"

#define LANE_HELD_MAX_FDS 4

/* what lane_held_serve returns */
#define LANE_HELD_EOF 0        /* the daemon closed the channel */
#define LANE_HELD_MESSAGE 1    /* any other message (or a lane restore this could not take, untouched): Python's */
#define LANE_HELD_SERVED 2     /* restored and/or invoked, reply sent: Python only updates its records (and
                                  carries the guest on to FN_NEXT if it is not parked there: result.parked) */
#define LANE_HELD_FALLBACK 3   /* restored and the invocation handed to the guest, then an exit this does not
                                  handle, a deadline or an error: Python carries the invocation on */

/* The held clone, as the worker's Python describes it (armed = 0: nothing is held). live = 0: a prepared
 * clone, which takes a restore; live = 1: the worker's running clone, parked in FN_NEXT between invocations
 * (worker.py _settle_held), which takes a LANE_FLAG_LIVE invocation. */
struct lane_held {
    int armed;
    int stop;                     /* set by Python's disarm (from any thread): the lane does not arm itself again */
    int live;
    uint64_t generation;          /* live: the clone's generation id, for the reply */
    uint64_t park_budget_ns;      /* after a reply, how long the guest may take back to FN_NEXT to be parked */
    int vcpu_fd;
    void *run;                    /* the vCPU's struct kvm_run */
    uint64_t mailbox;             /* host address of the guest's mailbox */
    uint64_t region_start, region_end;  /* host addresses of the guest memory region the mailbox must lie in */
    uint32_t req_cap, resp_cap;
    uint64_t seq;                 /* the function port's last sequence number */
    uint16_t fn_next_port, fn_done_port;
    char image[LANE_IMAGE_MAX + 1];
    /* live: invocations served and parked again without returning to Python, and the largest payload they
     * wrote to the mailbox; Python takes them into its records and zeroes them */
    uint64_t live_served, live_written;
};

struct lane_held_result {
    uint64_t message_len;         /* MESSAGE / FALLBACK: bytes in the buffer */
    int32_t nfds;
    int32_t fds[LANE_HELD_MAX_FDS];
    int32_t truncated;            /* the message or its descriptors did not fit */
    /* SERVED and FALLBACK */
    uint64_t id, generation, seq;
    uint32_t flags;
    uint64_t timeout_ns;
    uint64_t payload_offset, payload_len;
    int32_t exit_pending;         /* an exit in kvm_run waits for Python's dispatch (FALLBACK, or SERVED and
                                     not parked) */
    int32_t parked;               /* SERVED: the clone is parked in FN_NEXT again, the read answered "retry" */
    int32_t run_errno;            /* FALLBACK: KVM_RUN failed with this */
    uint64_t deadline_ns;         /* CLOCK_MONOTONIC */
    uint64_t generation_ns, invoke_ns;
};

struct lane_channel;
struct lane_channel *lane_channel_new(int fd);
const uint8_t *lane_channel_buffer(struct lane_channel *ch);
void lane_channel_free(struct lane_channel *ch);
/* Wait for the next message on the channel (blocking) and serve it if it is a lane restore of the held clone;
 * a live clone's invocations are served in a loop, returning only for anything else (held->live_served). */
int lane_held_serve(struct lane_channel *ch, struct lane_held *held, struct lane_held_result *res);

#endif

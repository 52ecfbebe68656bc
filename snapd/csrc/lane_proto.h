/* The lane's two messages on a daemon <-> worker channel (snapd/pool/protocol.py documents the channel).
 * Every other message there is JSON; these are fixed little-endian structs so that neither side parses text
 * on the restore path. Python packs and unpacks the same layouts (protocol.LANE_RESTORE / LANE_REPLY); a test
 * checks the sizes agree. */
#ifndef SNAPD_LANE_PROTO_H
#define SNAPD_LANE_PROTO_H

#include <stdint.h>

#define LANE_RESTORE_MAGIC "SNL1"  /* daemon -> worker: restore the prepared clone (and invoke it), or invoke
                                      the live one (LANE_FLAG_LIVE) */
#define LANE_REPLY_MAGIC "SNL2"    /* worker -> daemon: its answer */
#define LANE_IMAGE_MAX 64           /* the daemon's image ids: [A-Za-z0-9_-]{1,64} */
#define LANE_MAX_MESSAGE (4u << 20) /* any message on the channel, as snapd/pool/protocol.py MAX_MESSAGE */
#define LANE_FLAG_INVOKE 1u        /* the payload that follows is the clone's first invocation */
#define LANE_FLAG_LIVE 2u          /* with INVOKE: an invocation of the worker's live clone (no new generation) */
#define LANE_REPLY_GRACE_MS 2000   /* an invocation's reply is awaited its timeout plus this, no longer: then the
                                      * daemon kills the worker and fails the clone (it is stopped or hung) */

/* status of a reply; anything but OK is followed by the error text instead of a result */
#define LANE_OK 0
#define LANE_ERR_TIMEOUT 1
#define LANE_ERR_INVOCATION 2
#define LANE_ERR_VMM 3
#define LANE_ERR_PROTOCOL 4

struct lane_restore_msg {
    char magic[4];
    uint32_t flags;
    uint64_t id;                  /* the request id, echoed in the reply */
    uint64_t timeout_ns;          /* bound on the invocation */
    char image[LANE_IMAGE_MAX];   /* NUL-padded image id */
};                                /* then the payload */

struct lane_reply_msg {
    char magic[4];
    int32_t status;
    uint64_t id;
    uint64_t generation;          /* the clone's (new, on a restore) generation id */
    uint64_t generation_ns;       /* writing it and the entropy (and the request, if any) */
    uint64_t invoke_ns;           /* the invocation, request to reply */
    uint64_t total_ns;            /* message received to reply sent */
};                                /* then the result, or the error text */

#endif

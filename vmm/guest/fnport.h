/* The function port and its mailbox ("Function port" in docs/function-port.md). */
#ifndef GUEST_FNPORT_H
#define GUEST_FNPORT_H
#include "guest.h"

#define FN_REQ_CAP  8064
#define FN_RESP_CAP 8192

struct fn_mailbox {
    uint32_t magic;             /* "VMFM" */
    uint32_t version;
    uint32_t req_cap;
    uint32_t resp_cap;
    uint64_t seq;               /* written by the VMM */
    uint64_t generation;        /* written by the VMM, new after every restore */
    uint8_t entropy[32];        /* written by the VMM with every new generation */
    uint32_t req_len;           /* written by the VMM */
    uint32_t resp_len;
    uint8_t reserved[56];
    uint8_t request[FN_REQ_CAP];
    uint8_t reply[FN_RESP_CAP];
} __attribute__((aligned(4096)));

_Static_assert(sizeof(struct fn_mailbox) == 16384, "the mailbox is 16 KiB");
_Static_assert(__builtin_offsetof(struct fn_mailbox, request) == 128, "requests start at offset 128");

extern struct fn_mailbox fn_mailbox;

int fnport_present(void);
void fnport_register_mailbox(void);
void fnport_wait_invocation(struct invocation *inv);
void fnport_reply_done(uint32_t reply_len);

#endif

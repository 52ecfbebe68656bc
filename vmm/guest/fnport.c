/* Function port: the VMM hands us requests through a mailbox in our .bss and we answer in place. */
#include "fnport.h"
#include "io.h"

#define FN_ID       0x0f40
#define FN_MAILBOX  0x0f44
#define FN_NEXT     0x0f48
#define FN_DONE     0x0f4c
#define FN_ID_VALUE       0x4e464d56u     /* "VMFN" */
#define FN_MAILBOX_MAGIC  0x4d464d56u     /* "VMFM" */
#define FN_MAILBOX_VERSION 1

struct fn_mailbox fn_mailbox;

int fnport_present(void)
{
    return inl(FN_ID) == FN_ID_VALUE;     /* QEMU reads 0xffffffff from an unassigned port */
}

void fnport_register_mailbox(void)
{
    fn_mailbox.magic = FN_MAILBOX_MAGIC;
    fn_mailbox.version = FN_MAILBOX_VERSION;
    fn_mailbox.req_cap = FN_REQ_CAP;
    fn_mailbox.resp_cap = FN_RESP_CAP;
    /* Identity mapped, so the address of the mailbox is its guest-physical address. */
    outl(FN_MAILBOX, (uint32_t)((uintptr_t)&fn_mailbox >> 12));
}

/* Blocks (in the VMM) until an invocation is in the mailbox. FN_NEXT reads 0 when the VMM had to complete
 * the read early, e.g. to take a snapshot: then we simply ask again. */
void fnport_wait_invocation(struct invocation *inv)
{
    while (inl(FN_NEXT) == 0)
        ;
    uint32_t request_len = fn_mailbox.req_len;
    inv->seq = fn_mailbox.seq;
    inv->generation = fn_mailbox.generation;
    inv->request = fn_mailbox.request;
    inv->request_len = request_len < FN_REQ_CAP ? request_len : FN_REQ_CAP;
    inv->reply = fn_mailbox.reply;
}

void fnport_reply_done(uint32_t reply_len)
{
    fn_mailbox.resp_len = reply_len;
    outl(FN_DONE, reply_len);
}

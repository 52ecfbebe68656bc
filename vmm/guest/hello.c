/* hello: reply "HELO", u32 count, u64 generation, u64 random, u64 fnv1a64(request) (32 bytes). */
#include "guest.h"

static uint32_t invocation_count;   /* since boot; a restored clone continues from its snapshot's count */

static void hello_init(const struct guest_config *config)
{
    (void)config;
}

static uint32_t hello_invoke(const struct invocation *inv)
{
    invocation_count++;
    memcpy(inv->reply, "HELO", 4);
    store_le32(inv->reply + 4, invocation_count);
    store_le64(inv->reply + 8, inv->generation);
    store_le64(inv->reply + 16, rng_next());
    store_le64(inv->reply + 24, fnv1a64(inv->request, inv->request_len));
    return 32;
}

/* Self-driven request `seq`: the 8 bytes of mix64(seed + seq). */
static uint32_t hello_self_request(const struct guest_config *config, uint64_t seq, uint8_t *request)
{
    store_le64(request, mix64(config->seed + seq));
    return 8;
}

const struct workload hello_workload = {
    .name = "hello",
    .init = hello_init,
    .invoke = hello_invoke,
    .self_request = hello_self_request,
};

/* scan: an array of w = scan_mib MiB / 8 words, word[i] = mix64(seed) + i * 0x9e3779b97f4a7c15; each
 * invocation sums a contiguous window. Request: u32 offset_mib, u32 window_mib (clamped to the array).
 * Reply: "SCAN", u32 words summed, u64 sum. */
#include "guest.h"

#define WORDS_PER_MIB (MIB / sizeof(uint64_t))

static uint64_t *words;
static uint64_t word_count;

static void scan_init(const struct guest_config *config)
{
    if (config->scan_mib == 0)
        guest_error("scan_mib must be at least 1", 0);
    word_count = config->scan_mib * WORDS_PER_MIB;
    words = heap_reserve(config, config->scan_mib * MIB, "scan array");
    uint64_t base = mix64(config->seed);
    for (uint64_t i = 0; i < word_count; i++)
        words[i] = base + i * 0x9e3779b97f4a7c15ull;
}

static uint32_t scan_invoke(const struct invocation *inv)
{
    uint8_t request[8] = {0};       /* a short request reads as zero-padded */
    memcpy(request, inv->request, inv->request_len < 8 ? inv->request_len : 8);
    uint64_t start = load_le32(request) * WORDS_PER_MIB;
    uint64_t count = load_le32(request + 4) * WORDS_PER_MIB;
    if (start > word_count)
        start = word_count;
    if (count > word_count - start)
        count = word_count - start;

    uint64_t sum = 0;
    for (uint64_t i = start; i < start + count; i++)
        sum += words[i];
    memcpy(inv->reply, "SCAN", 4);
    store_le32(inv->reply + 4, (uint32_t)count);
    store_le64(inv->reply + 8, sum);
    return 16;
}

/* Self-driven request `seq`: offset mix64(seed + seq) % scan_mib, window half the array (at least 1 MiB),
 * so some windows run past the end and are clamped. */
static uint32_t scan_self_request(const struct guest_config *config, uint64_t seq, uint8_t *request)
{
    uint64_t window_mib = config->scan_mib / 2 ? config->scan_mib / 2 : 1;
    store_le32(request, (uint32_t)(mix64(config->seed + seq) % config->scan_mib));
    store_le32(request + 4, (uint32_t)window_mib);
    return 8;
}

const struct workload scan_workload = {
    .name = "scan",
    .init = scan_init,
    .invoke = scan_invoke,
    .self_request = scan_self_request,
};

/* kv: an open-addressing hash table of {u64 key, u64 value} slots filled to load factor 0.5; each
 * invocation does k scattered lookups. key_i = mix64(seed ^ (i + 1)) | 1 (never 0, the empty key),
 * value = mix64(key ^ seed). Request: u32 k, u32 pad, u64 query_seed. Reply: "KVOK", u32 found, u64 sum. */
#include "guest.h"

struct kv_slot {
    uint64_t key;
    uint64_t value;
};

static struct kv_slot *table;
static uint64_t slot_count;
static uint64_t key_count;
static uint64_t kv_seed;

static uint64_t kv_key(uint64_t i)
{
    return mix64(kv_seed ^ (i + 1)) | 1;
}

/* Linear probing from the key's home slot (keys are already well mixed: scale to [0, slot_count)). */
static struct kv_slot *kv_find_slot(uint64_t key)
{
    uint64_t index = (uint64_t)(((unsigned __int128)key * slot_count) >> 64);
    while (table[index].key != 0 && table[index].key != key)
        index = index + 1 == slot_count ? 0 : index + 1;
    return &table[index];
}

static void kv_init(const struct guest_config *config)
{
    if (config->kv_mib == 0)
        guest_error("kv_mib must be at least 1", 0);
    kv_seed = config->seed;
    slot_count = config->kv_mib * MIB / sizeof(struct kv_slot);
    key_count = slot_count / 2;
    table = heap_reserve(config, config->kv_mib * MIB, "kv table");
    memset(table, 0, config->kv_mib * MIB);     /* a loader need not hand us zeroed memory */
    for (uint64_t i = 0; i < key_count; i++) {
        uint64_t key = kv_key(i);
        struct kv_slot *slot = kv_find_slot(key);
        slot->key = key;
        slot->value = mix64(key ^ kv_seed);
    }
}

static uint32_t kv_invoke(const struct invocation *inv)
{
    uint8_t request[16] = {0};      /* a short request reads as zero-padded */
    memcpy(request, inv->request, inv->request_len < 16 ? inv->request_len : 16);
    uint32_t lookups = load_le32(request);
    uint64_t query_seed = load_le64(request + 8);

    uint32_t found = 0;
    uint64_t sum = 0;
    for (uint32_t t = 0; t < lookups; t++) {
        uint64_t key = kv_key(mix64(query_seed + t) % key_count);
        struct kv_slot *slot = kv_find_slot(key);
        if (slot->key == key) {
            found++;
            sum += slot->value;
        }
    }
    memcpy(inv->reply, "KVOK", 4);
    store_le32(inv->reply + 4, found);
    store_le64(inv->reply + 8, sum);
    return 16;
}

/* Self-driven request `seq`: 1000 lookups with query_seed = mix64(seed + seq). */
static uint32_t kv_self_request(const struct guest_config *config, uint64_t seq, uint8_t *request)
{
    store_le32(request, 1000);
    store_le32(request + 4, 0);
    store_le64(request + 8, mix64(config->seed + seq));
    return 16;
}

const struct workload kv_workload = {
    .name = "kv",
    .init = kv_init,
    .invoke = kv_invoke,
    .self_request = kv_self_request,
};

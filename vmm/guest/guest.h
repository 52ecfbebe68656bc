/* Declarations shared by the built-in function guest's files. The contract is docs/function-port.md. */
#ifndef GUEST_H
#define GUEST_H
#include <stddef.h>
#include <stdint.h>

#define MIB (1ull << 20)

/* The boot configuration from the command line ("Command line" in the contract). */
struct guest_config {
    const char *workload;
    uint64_t seed;
    uint64_t mem_size;          /* bytes: from the loader (RSI), else mem_mib, else 0 = unknown */
    uint64_t kv_mib;
    uint64_t scan_mib;
    uint64_t progress_shift;
    uint64_t invoke;            /* self-driven invocations when no function port answers */
};

/* One invocation as a workload sees it. */
struct invocation {
    uint64_t seq;
    uint64_t generation;
    const uint8_t *request;
    uint32_t request_len;
    uint8_t *reply;             /* room for FN_RESP_CAP bytes */
};

/* A workload: init builds its data, invoke answers one request and returns the reply length,
 * self_request writes the request for self-driven invocation `seq` and returns its length.
 * A workload without invocations has only run, which never returns. */
struct workload {
    const char *name;
    void (*init)(const struct guest_config *config);
    uint32_t (*invoke)(const struct invocation *inv);
    uint32_t (*self_request)(const struct guest_config *config, uint64_t seq, uint8_t *request);
    void (*run)(const struct guest_config *config);
};

extern const struct workload hello_workload, kv_workload, scan_workload, progress_workload;

/* main.c */
__attribute__((noreturn)) void machine_reset(void);
__attribute__((noreturn)) void guest_error(const char *what, const char *quoted);
void *heap_reserve(const struct guest_config *config, uint64_t bytes, const char *what);

/* cmdline.c */
void parse_cmdline(const char *cmdline, uint64_t loader_mem_size, struct guest_config *config);

/* uart.c: COM1 output */
void uart_write(const char *text);
void uart_write_u64(uint64_t value);
void uart_write_hex64(uint64_t value);
void uart_write_hex_bytes(const uint8_t *bytes, size_t count);

/* rng.c: splitmix64, reseeded from the mailbox entropy on every new generation */
void rng_init(uint64_t seed);
void rng_observe_generation(uint64_t generation, const uint8_t entropy[32]);
uint64_t rng_next(void);

/* mem.c: what gcc may call even in freestanding code */
void *memset(void *dest, int byte, size_t count);
void *memcpy(void *restrict dest, const void *restrict src, size_t count);
void *memmove(void *dest, const void *src, size_t count);
int memcmp(const void *a, const void *b, size_t count);

/* splitmix64 finaliser */
static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t fnv1a64(const uint8_t *bytes, size_t count)
{
    uint64_t hash = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < count; i++)
        hash = (hash ^ bytes[i]) * 0x100000001b3ull;
    return hash;
}

/* x86 is little-endian, as the mailbox is; memcpy keeps unaligned accesses defined. */
static inline uint32_t load_le32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t load_le64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void store_le32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void store_le64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

#endif

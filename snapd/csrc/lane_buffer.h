/* The lane's message buffers (worker channel, daemon connection): one mapping reserved up front, whose pages
 * are touched only as far as a message reaches, and given back after one larger than LANE_TRIM_ABOVE, so a
 * long-lived worker or keep-alive connection does not keep a large reply resident. */
#ifndef SNAPD_LANE_BUFFER_H
#define SNAPD_LANE_BUFFER_H

#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include <time.h>

#define LANE_TRIM_ABOVE (256u << 10)

static inline uint8_t *lane_buffer_map(size_t size)
{
    void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    return mem == MAP_FAILED ? NULL : mem;
}

static inline uint64_t lane_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);  /* time.monotonic(): Python compares deadlines with it */
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void lane_buffer_trim(uint8_t *buffer, size_t used)
{
    if (used > LANE_TRIM_ABOVE)
        madvise(buffer, (used + 4095) & ~(size_t)4095, MADV_DONTNEED);
}

#endif

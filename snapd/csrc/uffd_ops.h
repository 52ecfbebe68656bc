/* Thin userfaultfd helpers shared by the Python binding and the fault loop. */
#ifndef SNAPD_UFFD_OPS_H
#define SNAPD_UFFD_OPS_H
#include <stdint.h>
#include <linux/userfaultfd.h>

#define SNAPD_PAGE_SIZE 4096ULL

/* Each returns the result (>= 0) or -errno, so callers never read errno. */
int snapd_uffd_create(int flags);
int snapd_ioctl(int fd, unsigned long request, void *arg);

/* Touch [addr, addr+len) every `stride` bytes (read, or write if `write`);
 * if ns_out is not NULL, store the nanoseconds each touch took. Used by tests
 * and the benchmark to fault pages with the GIL released. Returns a sum of the
 * bytes read so the compiler cannot drop the loads. */
uint64_t snapd_touch(uint64_t addr, uint64_t len, uint64_t stride, int write, uint64_t *ns_out);

uint64_t snapd_now_ns(void);

/* Map pages already in the page cache into this process's page tables for
 * each [addrs[i], addrs[i]+lens[i]) with madvise(MADV_POPULATE_READ) (no
 * copy: a MAP_PRIVATE mapping stays shared until written). For a clone whose
 * loading set was pre-filled: the guest's first touch of those pages then
 * costs a shadow-page-table fill, not a host page fault. Returns 0 or -errno. */
int snapd_populate_read(const uint64_t *addrs, const uint64_t *lens, uint32_t n);
#endif

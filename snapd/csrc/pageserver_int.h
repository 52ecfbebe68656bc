/* Internals of the page server shared by its C files: pageserver.c (the
 * epoll loop), vm_slots.c (attach, release), vm_regions.c (region tables),
 * chunk_install.c (installing chunks), faults.c (fault service),
 * uffd_events.c (reading the uffd), workingset.c (recording), prefetch.c
 * (the prefetch stream) and stage.c (the staging buffer).
 * Everything here runs on the loop thread unless it says otherwise. */
#ifndef SNAPD_PAGESERVER_INT_H
#define SNAPD_PAGESERVER_INT_H
#include <pthread.h>
#include <stdint.h>
#include "pageserver.h"

enum { CHUNK_MISSING = 0, CHUNK_INSTALLED = 1, CHUNK_BAD = 2 };

/* A fault whose address is outside every known region is retried this many
 * loop turns (1 ms apart) while REMAP/UNMAP events catch up, then reported. */
#define DEFER_LIMIT 500
#define EAGER_BUDGET (8ULL << 20) /* bytes installed per VM per loop turn */
/* Prefetch yields to pending faults after this many bytes: a fault waits for
 * at most one such batch (~0.2 ms at the ~3 GB/s decompress+copy rate). */
#define PREFETCH_BUDGET (512ULL << 10)
/* Staged prefetch: bytes installed per loop turn (memcpy speed, ~0.5 ms at
 * 4 GB/s), so a fault waits for at most one such batch. */
#define STAGE_BUDGET (2ULL << 20)
#define EVFD_TAG UINT64_MAX

enum { STAGE_NONE = 0, STAGE_DATA = 1, STAGE_ZERO = 2 };
#define STAGE_NO_SLOT UINT64_MAX

struct snapd_stage {
	int refs;   /* atomic */
	int cancel; /* atomic */
	struct snapd_image *img; /* only used by snapd_stage_run */
	uint32_t nchunks;        /* image chunks */
	uint32_t *chunks, n;     /* the set */
	uint64_t *off;   /* per image chunk: offset in buf, or STAGE_NO_SLOT */
	uint8_t *state;  /* per image chunk: STAGE_*, stored with release after the bytes */
	uint8_t *buf;
	uint64_t cap;
	pthread_mutex_t lock; /* st, err */
	struct snapd_stage_stats st;
	char err[512];
};

/* Loop side: STAGE_DATA with *data, STAGE_ZERO, or STAGE_NONE (not staged: normal path). */
static inline int stage_lookup(struct snapd_stage *st, uint64_t c, const uint8_t **data)
{
	if (!st || c >= st->nchunks)
		return STAGE_NONE;
	int s = __atomic_load_n(&st->state[c], __ATOMIC_ACQUIRE);
	if (s == STAGE_DATA)
		*data = st->buf + st->off[c];
	return s;
}
void stage_get(struct snapd_stage *st); /* stage.c */

/* One registered range of a VM's memory; state[] is per image chunk that the
 * range overlaps, so REMOVE can mark chunks for refill. */
struct region {
	uint64_t addr, size, offset;
	uint64_t first_chunk, nchunks;
	uint8_t *state;
};

struct deferred_fault {
	uint64_t addr, t0;
	uint32_t tries;
};

/* Why a chunk is installed: decides the stats it counts in and, in shared
 * wake mode, whether anyone can be waiting for a wake. */
enum install_why { WHY_FAULT, WHY_EAGER, WHY_PREFETCH };

/* Chunks in first-fault order. Appended by the loop, read and reset by
 * Python threads: guarded by the server lock. */
struct recorder {
	int on;
	uint32_t *chunks;
	uint32_t n, cap;
	uint8_t *seen; /* per image chunk */
};

struct vm {
	int state; /* enum snapd_vm_state, atomic: attach runs on another thread */
	uint32_t gen;
	int id, uffd, sock, parent, flags, dead;
	struct snapd_image *img;
	struct region *regions;
	int nregions;
	int eager, eager_region;
	uint64_t eager_chunk, eager_t0;
	/* prefetch: install these image chunks in order, between faults */
	uint32_t *prefetch;
	uint32_t nprefetch, prefetch_pos;
	uint64_t prefetch_t0;
	struct snapd_stage *stage; /* a reference, or NULL */
	struct recorder rec;
	struct deferred_fault *deferred;
	int ndeferred, cap_deferred;
	struct snapd_vm_stats st;
	uint32_t hist[SNAPD_HIST_BUCKETS];
};

struct snapd_server {
	int epfd, evfd, stop, live;
	pthread_mutex_t lock; /* slot allocation, release, stats copies, recorders */
	struct snapd_scratch scratch; /* one loop thread: one set of buffers */
	struct vm vms[SNAPD_MAX_VMS];
};

static inline uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static inline uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

static inline int vm_live(const struct vm *vm)
{
	int s = __atomic_load_n(&vm->state, __ATOMIC_ACQUIRE);
	return s == SNAPD_VM_ACTIVE || s == SNAPD_VM_FAILED;
}

/* pageserver.c */
unsigned hist_bucket(uint64_t ns);

/* vm_slots.c */
void send_ready(struct vm *vm);
void vm_fail(struct vm *vm, const char *what);
void vm_release(struct snapd_server *srv, struct vm *vm);
int attach_vm(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
	      const struct region *regions, int nregions, const struct snapd_region_spec *specs,
	      int flags, int parent, const uint32_t *prefetch, uint32_t nprefetch, struct snapd_stage *stage);

/* vm_regions.c */
int region_init(struct region *r, const struct snapd_image *img, uint64_t addr, uint64_t size,
		uint64_t offset);
struct region *vm_find(struct vm *vm, uint64_t addr);
int vm_split_at(struct vm *vm, uint64_t at);
void vm_regions_changed(struct vm *vm);
struct region *vm_region_of_chunk(struct vm *vm, uint64_t c, int *count);

/* chunk_install.c */
enum fill_op { FILL_COPY, FILL_ZERO, FILL_CONTINUE };
int fill_range(struct vm *vm, enum fill_op op, uint64_t dst, const uint8_t *src, uint64_t len, uint64_t *installed);
int load_chunk(struct snapd_server *srv, struct vm *vm, uint64_t c, const uint8_t **data,
	       enum install_why why, char *err, size_t errlen);
int install_chunk(struct snapd_server *srv, struct vm *vm, struct region *r, uint64_t c, enum install_why why);
void eager_step(struct snapd_server *srv, struct vm *vm);

/* faults.c */
void serve_fault(struct snapd_server *srv, struct vm *vm, uint64_t addr, uint64_t t0, uint32_t tries);
void vm_retry_deferred(struct snapd_server *srv, struct vm *vm);

/* uffd_events.c */
void vm_drain(struct snapd_server *srv, struct vm *vm);

/* workingset.c */
void record_fault(struct snapd_server *srv, struct vm *vm, uint64_t c);
void recorder_free(struct recorder *rec);

/* prefetch.c */
/* Install the next batch of the VM's loading set; clears vm->prefetch when done. */
void prefetch_step(struct snapd_server *srv, struct vm *vm);
int prefetch_pending(const struct vm *vm);
void prefetch_free(struct vm *vm);
#endif

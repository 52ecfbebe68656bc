/* The page server's fault loop: one epoll loop over every VM's uffd and
 * control socket, resolving MISSING faults from a chunked base image. */
#ifndef SNAPD_PAGESERVER_H
#define SNAPD_PAGESERVER_H
#include <stdint.h>
#include "chunk_source.h"

#define SNAPD_MAX_VMS 256
/* Log-linear histogram of service time in ns: 8 buckets per power of two. */
#define SNAPD_HIST_BUCKETS 328

#define SNAPD_ATTACH_EAGER  1 /* install every chunk, then send {"ready": true} */
#define SNAPD_ATTACH_SHARED 2 /* fill the image's memfd and wake, instead of UFFDIO_COPY */
/* with SHARED: map the chunk with UFFDIO_CONTINUE instead of waking (the
 * mapping is registered MISSING|MINOR), so each chunk costs one fault per VM */
#define SNAPD_ATTACH_CONTINUE 4
/* log the image chunks this VM faults on, in first-fault order, from its
 * first fault (snapd_server_record_*) */
#define SNAPD_ATTACH_RECORD 8

enum snapd_vm_state { SNAPD_VM_FREE = 0, SNAPD_VM_ACTIVE, SNAPD_VM_FAILED, SNAPD_VM_CLOSED };

struct snapd_region_spec {
	uint64_t addr, size, offset;
};

struct snapd_vm_stats {
	int32_t state;          /* enum snapd_vm_state */
	int32_t parent;         /* VM id this one was forked from, or -1 */
	int32_t eager_pending;  /* eager install still running */
	int32_t nregions;
	uint64_t faults;
	uint64_t bytes_installed;
	uint64_t chunks_installed;
	uint64_t zero_chunks;
	uint64_t shared_fills;  /* chunks this VM wrote into the shared memfd */
	uint64_t shared_wakes;  /* faults resolved by a wake only */
	uint64_t service_ns;    /* total time serving faults */
	uint64_t max_service_ns;
	uint64_t eexist;
	uint64_t eagain;
	uint64_t removes, remaps, unmaps, forks;
	uint64_t errors;
	uint64_t eager_bytes;
	uint64_t eager_ns;
	/* prefetch of a loading set (snapd_server_attach_staged with prefetch chunks) */
	uint64_t prefetch_pending;
	uint64_t prefetch_chunks;  /* chunks the prefetch installed (not counting those a fault got first) */
	uint64_t prefetch_bytes;
	uint64_t prefetch_ns;      /* attach to the end of the prefetch */
	uint64_t prefetch_faults;  /* faults taken while the prefetch was still running */
	uint64_t recorded;         /* chunks in the working-set recording */
	/* staged prefetch (snapd_server_attach_staged) */
	uint64_t stage_chunks;     /* chunks installed from the staging buffer by the stream */
	uint64_t stage_faults;     /* faults served from the staging buffer (no decompress) */
	uint64_t stage_fallbacks;  /* set chunks the stream found not staged: installed by the normal path */
	uint64_t stage_ioctls;     /* UFFDIO_COPY/ZEROPAGE calls the staged stream made */
};

struct snapd_server;

struct snapd_server *snapd_server_new(void);
/* Runs the loop until snapd_server_stop; call with the GIL released. */
int snapd_server_run(struct snapd_server *srv);
void snapd_server_stop(struct snapd_server *srv);
/* Closes every VM's fds. Only after run() has returned. */
void snapd_server_free(struct snapd_server *srv);


/* Staging of a loading set (REAP, ahead of the restore): the set's chunks
 * are read, checksum-verified and decompressed once into one anonymous
 * buffer, in set order, up to a byte limit, before any VM connects. A VM
 * attached with the stage gets the set installed from the buffer with large
 * UFFDIO_COPY batches (runs of adjacent chunks, one ioctl each), first-touch
 * order first, and its faults on staged chunks are served from the buffer.
 * Chunks not (yet) staged take the normal path. Reference counted: the
 * creator holds one reference, each VM attached with it another. */
struct snapd_stage;
struct snapd_stage_stats {
	int32_t running;     /* snapd_stage_run in progress */
	int32_t cancelled;
	uint32_t total;      /* chunks in the loading set */
	uint32_t done;       /* dealt with so far, in set order */
	uint64_t staged;     /* chunks whose bytes are in the buffer */
	uint64_t zero_chunks; /* all-zero chunks (nothing stored: UFFDIO_ZEROPAGE) */
	uint64_t bytes;      /* bytes in the buffer */
	uint64_t capacity;   /* buffer size (<= limit) */
	uint64_t over_limit; /* chunks left out by the size limit (normal path) */
	uint64_t errors;     /* chunks that failed to load/verify (normal path reports them) */
	uint64_t ns;         /* run time, or to now while running */
	uint64_t t0;
};
/* Returns NULL with *err set (-ENOMEM, -ERANGE). limit: buffer bytes at most. */
struct snapd_stage *snapd_stage_new(struct snapd_image *img, const uint32_t *chunks, uint32_t n, uint64_t limit,
				    int *err);
/* Fill the buffer; call in a thread of its own with the GIL released. 0, or -EBUSY if run twice. */
int snapd_stage_run(struct snapd_stage *st);
void snapd_stage_cancel(struct snapd_stage *st);
int snapd_stage_stats(struct snapd_stage *st, struct snapd_stage_stats *out, char *err, size_t errlen);
/* Drop a reference; the buffer is unmapped with the last. Never while snapd_stage_run runs. */
void snapd_stage_put(struct snapd_stage *st);
/* Like attach_ex, with a stage of the same image (private memory only: -EINVAL for shared). */
int snapd_server_attach_staged(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
			       const struct snapd_region_spec *regions, int nregions, int flags,
			       const uint32_t *prefetch, uint32_t nprefetch, struct snapd_stage *stage);

/* Working-set recording: start (clearing any earlier log), stop, and copy the
 * log out. take copies up to cap chunk indices into out and returns how many
 * the log holds (call again with a larger buffer if that is above cap). */
int snapd_server_record_start(struct snapd_server *srv, int id);
int snapd_server_record_stop(struct snapd_server *srv, int id);
int64_t snapd_server_record_take(struct snapd_server *srv, int id, uint32_t *out, uint32_t cap);

int snapd_server_vm_stats(struct snapd_server *srv, int id, struct snapd_vm_stats *out, uint32_t *hist);
int snapd_server_live_vms(struct snapd_server *srv);
#endif

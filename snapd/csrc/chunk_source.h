/* A base image as the page server sees it: a chunk table over pack files,
 * and the code that turns one chunk into verified, decompressed bytes. */
#ifndef SNAPD_CHUNK_SOURCE_H
#define SNAPD_CHUNK_SOURCE_H
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

enum snapd_codec { SNAPD_CODEC_ZERO = 0, SNAPD_CODEC_RAW = 1, SNAPD_CODEC_LZ4 = 2, SNAPD_CODEC_ZSTD = 3 };

struct snapd_chunk {
	uint32_t pack;       /* index returned by snapd_image_add_pack */
	uint32_t codec;      /* enum snapd_codec */
	uint64_t offset;     /* byte offset of the stored bytes in the pack */
	uint64_t stored_len;
	uint64_t checksum;   /* XXH3_64bits of the stored bytes */
};

enum snapd_shared_state { SNAPD_SHARED_MISSING = 0, SNAPD_SHARED_PRESENT = 1, SNAPD_SHARED_FILLING = 2 };

/* Progress of the pre-fill of a shared image's memfd from a loading set. */
struct snapd_prefill_stats {
	int32_t running;      /* a pre-fill is in progress */
	int32_t cancelled;    /* the last pre-fill was cancelled before its end */
	uint32_t total;       /* chunks in the loading set */
	uint32_t done;        /* chunks dealt with so far (filled, skipped or failed), in order */
	uint64_t filled;      /* chunks this pre-fill wrote into the memfd */
	uint64_t skipped;     /* chunks already present (a fault, or an earlier fill, got there first) */
	uint64_t busy;        /* chunks a fault was writing at that moment (left to it) */
	uint64_t fault_waits; /* faults that found their chunk being pre-filled and waited for it */
	uint64_t zero_chunks; /* of filled: all-zero chunks (fallocate) */
	uint64_t bytes;       /* bytes written (zero chunks included) */
	uint64_t errors;      /* chunks that could not be loaded (left missing: a fault reports them) */
	uint64_t ns;          /* start to end, or to now while running */
	uint64_t t0;
};

struct snapd_image {
	char name[256];
	uint64_t chunk_size, mem_size;
	uint32_t nchunks;
	struct snapd_chunk *chunks;
	int npacks;
	int *pack_fd;        /* -1 when the pack could not be opened */
	int *pack_errno;
	char **pack_path;
	/* Shared copy-on-write mode: the image's memory lives in one memfd that
	 * every VM maps MAP_PRIVATE; present[c] (enum snapd_shared_state) says
	 * whether chunk c was written to it. A chunk goes MISSING -> FILLING
	 * (claimed by one thread with a CAS) -> PRESENT exactly once, or back to
	 * MISSING if it could not be loaded; only its claimer writes it. */
	int memfd;
	uint8_t *present;
	/* Guards fill_log, pf and pf_error; fill_cond is broadcast whenever a
	 * claimed chunk leaves FILLING (a fault waiting for a pre-fill). */
	pthread_mutex_t fill_lock;
	pthread_cond_t fill_cond;
	uint32_t *fill_log; /* chunks in the order they were written (bit 31: by a pre-fill) */
	uint32_t nfill;
	struct snapd_prefill_stats pf;
	int pf_cancel;
	char pf_error[512];
};

/* Per-thread buffers for reading and decompressing one chunk. */
struct snapd_scratch {
	uint8_t *in, *out;
	size_t in_cap, out_cap;
};

struct snapd_image *snapd_image_new(const char *name, uint64_t chunk_size, uint64_t mem_size, uint32_t nchunks);
int snapd_image_add_pack(struct snapd_image *img, const char *path);
int snapd_image_set_chunks(struct snapd_image *img, const struct snapd_chunk *chunks, uint32_t n);
#define SNAPD_HUGE_PAGE (2u << 20)
int snapd_image_enable_shared(struct snapd_image *img, const char *huge_dir);
void snapd_image_free(struct snapd_image *img);

/* Bytes of guest memory chunk c covers (the last chunk may be short). */
uint64_t snapd_chunk_len(const struct snapd_image *img, uint32_t c);

/* Load chunk c. Returns 1 for an all-zero chunk (nothing loaded), 0 with
 * *data pointing at snapd_chunk_len() verified bytes, or -1 with a reason
 * in err. Never returns data whose checksum did not match. */
int snapd_chunk_load(struct snapd_image *img, uint32_t c, struct snapd_scratch *s,
		     const uint8_t **data, char *err, size_t errlen);
void snapd_scratch_free(struct snapd_scratch *s);

/* Shared mode: make sure chunk c is in the memfd. Returns SNAPD_FILL_DONE
 * (written by this call; *zero set for an all-zero chunk), SNAPD_FILL_PRESENT
 * (already there, or written by another thread while we waited),
 * SNAPD_FILL_BUSY (another thread is writing it and block is 0), or -1 with
 * err filled (nothing usable written; the chunk is MISSING again). With block,
 * waits for a concurrent writer instead of returning BUSY. */
enum { SNAPD_FILL_DONE = 0, SNAPD_FILL_PRESENT = 1, SNAPD_FILL_BUSY = 2 };
int snapd_shared_fill(struct snapd_image *img, uint32_t c, struct snapd_scratch *s, int block, int by_prefill,
		      int *zero, char *err, size_t errlen);

/* Pre-fill: write chunks[0..n) into the shared memfd in that order, in the
 * calling thread (call with the GIL released), skipping present chunks and
 * staying consistent with concurrent faults. Returns 0 (done or cancelled),
 * -EINVAL (not shared), -EBUSY (one is running), -ERANGE (a chunk past the
 * image), -ENOMEM. Chunks that cannot be loaded are counted and left missing. */
int snapd_image_prefill(struct snapd_image *img, const uint32_t *chunks, uint32_t n);
void snapd_image_prefill_cancel(struct snapd_image *img);
int snapd_image_prefill_stats(struct snapd_image *img, struct snapd_prefill_stats *out, char *err, size_t errlen);
/* Copies up to cap entries of the fill log (bit 31: written by a pre-fill);
 * returns how many it holds. */
int64_t snapd_image_fill_log(struct snapd_image *img, uint32_t *out, uint32_t cap);
/* Chunks present in the memfd. */
int64_t snapd_image_present_chunks(struct snapd_image *img);
#endif

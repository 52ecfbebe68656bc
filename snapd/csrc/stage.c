/* Staging a loading set ahead of the restore: decompress and verify it once,
 * in a background thread, into one buffer the VMs attached with it install from. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

/* REAP's "install the working set in bulk before resume", made cheap: the
 * set is decompressed and verified once, when the image is served with it
 * (before any VM connects), into one anonymous buffer laid out in set order,
 * so the install at attach is a memcpy-speed UFFDIO_COPY from the buffer.
 * Adjacent chunks that follow each other in the set are adjacent in the
 * buffer too: one ioctl installs the whole run. */

void stage_get(struct snapd_stage *st)
{
	__atomic_add_fetch(&st->refs, 1, __ATOMIC_ACQ_REL);
}

void snapd_stage_put(struct snapd_stage *st)
{
	if (!st || __atomic_sub_fetch(&st->refs, 1, __ATOMIC_ACQ_REL) != 0)
		return;
	if (st->buf)
		munmap(st->buf, st->cap);
	pthread_mutex_destroy(&st->lock);
	free(st->chunks);
	free(st->off);
	free(st->state);
	free(st);
}

struct snapd_stage *snapd_stage_new(struct snapd_image *img, const uint32_t *chunks, uint32_t n, uint64_t limit,
				    int *err)
{
	*err = 0;
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= img->nchunks) {
			*err = -ERANGE;
			return NULL;
		}
	struct snapd_stage *st = calloc(1, sizeof(*st));
	uint32_t nc = img->nchunks ? img->nchunks : 1;
	if (st) {
		st->chunks = malloc((n ? n : 1) * sizeof(uint32_t));
		st->off = malloc(nc * sizeof(uint64_t));
		st->state = calloc(nc, 1);
	}
	if (!st || !st->chunks || !st->off || !st->state) {
		if (st) {
			free(st->chunks);
			free(st->off);
			free(st->state);
			free(st);
		}
		*err = -ENOMEM;
		return NULL;
	}
	pthread_mutex_init(&st->lock, NULL);
	st->refs = 1;
	st->img = img;
	st->nchunks = img->nchunks;
	st->n = n;
	if (n)
		memcpy(st->chunks, chunks, n * sizeof(uint32_t));
	for (uint32_t c = 0; c < img->nchunks; c++)
		st->off[c] = STAGE_NO_SLOT;
	/* Slots in set order, up to the limit (zero chunks take none). */
	uint64_t used = 0;
	for (uint32_t i = 0; i < n; i++) {
		uint32_t c = chunks[i];
		if (img->chunks[c].codec == SNAPD_CODEC_ZERO || st->off[c] != STAGE_NO_SLOT)
			continue;
		uint64_t len = snapd_chunk_len(img, c);
		if (used + len > limit) {
			st->st.over_limit++;
			continue;
		}
		st->off[c] = used;
		used += (len + SNAPD_PAGE_SIZE - 1) & ~(SNAPD_PAGE_SIZE - 1);
	}
	st->st.total = n;
	if (used) {
		void *p = mmap(NULL, used, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
		if (p == MAP_FAILED) {
			*err = -errno;
			st->refs = 1;
			snapd_stage_put(st);
			return NULL;
		}
		madvise(p, used, MADV_HUGEPAGE); /* fewer TLB misses for the copy; a hint */
		st->buf = p;
		st->cap = used;
	}
	st->st.capacity = used;
	return st;
}

int snapd_stage_run(struct snapd_stage *st)
{
	struct snapd_image *img = st->img;
	pthread_mutex_lock(&st->lock);
	if (st->st.running || st->st.t0) {
		pthread_mutex_unlock(&st->lock);
		return -EBUSY;
	}
	st->st.running = 1;
	st->st.t0 = snapd_now_ns();
	pthread_mutex_unlock(&st->lock);

	struct snapd_scratch scratch = {0}; /* this thread's own buffers */
	char err[400];
	for (uint32_t i = 0; i < st->n; i++) {
		if (__atomic_load_n(&st->cancel, __ATOMIC_ACQUIRE)) {
			pthread_mutex_lock(&st->lock);
			st->st.cancelled = 1;
			pthread_mutex_unlock(&st->lock);
			break;
		}
		uint32_t c = st->chunks[i];
		int kind = -2; /* -2: left out (limit or duplicate) */
		if (__atomic_load_n(&st->state[c], __ATOMIC_RELAXED) != STAGE_NONE) {
			kind = -3; /* duplicate entry: already staged */
		} else if (img->chunks[c].codec == SNAPD_CODEC_ZERO) {
			kind = 1;
			__atomic_store_n(&st->state[c], STAGE_ZERO, __ATOMIC_RELEASE);
		} else if (st->off[c] != STAGE_NO_SLOT) {
			const uint8_t *data = NULL;
			/* The fault path's loader: stored bytes checksum-verified, decoded length checked. */
			kind = snapd_chunk_load(img, c, &scratch, &data, err, sizeof(err));
			if (kind == 0) {
				memcpy(st->buf + st->off[c], data, snapd_chunk_len(img, c));
				__atomic_store_n(&st->state[c], STAGE_DATA, __ATOMIC_RELEASE); /* bytes first */
			} else if (kind == 1) {
				__atomic_store_n(&st->state[c], STAGE_ZERO, __ATOMIC_RELEASE);
			}
		}
		pthread_mutex_lock(&st->lock);
		if (kind == 0) {
			st->st.staged++;
			st->st.bytes += snapd_chunk_len(img, c);
		} else if (kind == 1) {
			st->st.zero_chunks++;
		} else if (kind == -1) {
			if (!st->st.errors)
				snprintf(st->err, sizeof(st->err), "chunk %u: %s", c, err);
			st->st.errors++;
		}
		st->st.done = i + 1;
		pthread_mutex_unlock(&st->lock);
	}
	snapd_scratch_free(&scratch);
	pthread_mutex_lock(&st->lock);
	st->st.ns = snapd_now_ns() - st->st.t0;
	st->st.running = 0;
	pthread_mutex_unlock(&st->lock);
	return 0;
}

void snapd_stage_cancel(struct snapd_stage *st)
{
	__atomic_store_n(&st->cancel, 1, __ATOMIC_RELEASE);
}

int snapd_stage_stats(struct snapd_stage *st, struct snapd_stage_stats *out, char *err, size_t errlen)
{
	pthread_mutex_lock(&st->lock);
	*out = st->st;
	if (out->running)
		out->ns = snapd_now_ns() - out->t0;
	if (err && errlen)
		snprintf(err, errlen, "%s", st->err);
	pthread_mutex_unlock(&st->lock);
	return 0;
}

/* Pre-fill of a shared image's memfd with a loading set, and the shared
 * fill state read back (pre-fill stats, fill log, present chunks). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "chunk_source.h"
#include "uffd_ops.h"

/* REAP/FaaSnap, before any restore: the loading set goes into the memfd that
 * every clone maps MAP_PRIVATE, so a clone finds its working set in the page
 * cache and takes no userfaultfd fault for it. Runs in the caller's thread
 * (Python starts one and releases the GIL), concurrently with the fault loop:
 * both go through snapd_shared_fill, whose per-chunk claim makes exactly one
 * thread write a chunk and makes a fault on a chunk being pre-filled wait for
 * it (never map a page that is not complete). */
int snapd_image_prefill(struct snapd_image *img, const uint32_t *chunks, uint32_t n)
{
	if (img->memfd < 0)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i] >= img->nchunks)
			return -ERANGE;
	pthread_mutex_lock(&img->fill_lock);
	if (img->pf.running) {
		pthread_mutex_unlock(&img->fill_lock);
		return -EBUSY;
	}
	memset(&img->pf, 0, sizeof(img->pf));
	img->pf.running = 1;
	img->pf.total = n;
	img->pf.t0 = snapd_now_ns();
	img->pf_error[0] = 0;
	__atomic_store_n(&img->pf_cancel, 0, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&img->fill_lock);

	struct snapd_scratch scratch = {0}; /* this thread's own buffers; the loop has its own */
	char err[400];
	for (uint32_t i = 0; i < n; i++) {
		if (__atomic_load_n(&img->pf_cancel, __ATOMIC_ACQUIRE)) {
			pthread_mutex_lock(&img->fill_lock);
			img->pf.cancelled = 1;
			pthread_mutex_unlock(&img->fill_lock);
			break;
		}
		uint32_t c = chunks[i];
		int zero = 0;
		/* Not blocking: a chunk a fault is filling now will be there; go on. */
		int rc = snapd_shared_fill(img, c, &scratch, 0, 1, &zero, err, sizeof(err));
		pthread_mutex_lock(&img->fill_lock);
		if (rc == SNAPD_FILL_DONE) {
			img->pf.filled++;
			img->pf.bytes += snapd_chunk_len(img, c);
			img->pf.zero_chunks += zero;
		} else if (rc == SNAPD_FILL_PRESENT) {
			img->pf.skipped++;
		} else if (rc == SNAPD_FILL_BUSY) {
			img->pf.busy++;
		} else {
			if (!img->pf.errors)
				snprintf(img->pf_error, sizeof(img->pf_error), "chunk %u: %s", c, err);
			img->pf.errors++;
		}
		img->pf.done = i + 1;
		pthread_mutex_unlock(&img->fill_lock);
	}
	snapd_scratch_free(&scratch);
	pthread_mutex_lock(&img->fill_lock);
	img->pf.ns = snapd_now_ns() - img->pf.t0;
	img->pf.running = 0;
	pthread_mutex_unlock(&img->fill_lock);
	return 0;
}

void snapd_image_prefill_cancel(struct snapd_image *img)
{
	__atomic_store_n(&img->pf_cancel, 1, __ATOMIC_RELEASE);
}

int snapd_image_prefill_stats(struct snapd_image *img, struct snapd_prefill_stats *out, char *err, size_t errlen)
{
	if (img->memfd < 0)
		return -EINVAL;
	pthread_mutex_lock(&img->fill_lock);
	*out = img->pf;
	if (out->running)
		out->ns = snapd_now_ns() - out->t0;
	if (err && errlen)
		snprintf(err, errlen, "%s", img->pf_error);
	pthread_mutex_unlock(&img->fill_lock);
	return 0;
}

int64_t snapd_image_fill_log(struct snapd_image *img, uint32_t *out, uint32_t cap)
{
	if (img->memfd < 0)
		return -EINVAL;
	pthread_mutex_lock(&img->fill_lock);
	uint32_t n = img->nfill;
	if (out && n)
		memcpy(out, img->fill_log, (n < cap ? n : cap) * sizeof(uint32_t));
	pthread_mutex_unlock(&img->fill_lock);
	return n;
}

int64_t snapd_image_present_chunks(struct snapd_image *img)
{
	if (img->memfd < 0)
		return -EINVAL;
	int64_t n = 0;
	for (uint32_t c = 0; c < img->nchunks; c++)
		n += __atomic_load_n(&img->present[c], __ATOMIC_RELAXED) == SNAPD_SHARED_PRESENT;
	return n;
}

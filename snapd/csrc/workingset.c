/* Working sets: record which image chunks a VM faults on, in first-fault
 * order (a loading set), and prefetch a loading set into a VM in bulk while
 * its faults keep being served first (FaaSnap's concurrent paging). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

/* ---------- recording ---------- */

void record_fault(struct snapd_server *srv, struct vm *vm, uint64_t c)
{
	struct recorder *rec = &vm->rec;
	if (rec->seen[c]) /* unlocked read: only this thread writes seen[] while recording */
		return;
	pthread_mutex_lock(&srv->lock);
	if (rec->on && !rec->seen[c]) {
		if (rec->n == rec->cap) {
			uint32_t cap = rec->cap ? 2 * rec->cap : 256;
			uint32_t *grown = realloc(rec->chunks, cap * sizeof(*grown));
			if (!grown)
				goto out; /* the log misses a chunk: it is a hint, never correctness */
			rec->chunks = grown;
			rec->cap = cap;
		}
		rec->seen[c] = 1;
		rec->chunks[rec->n++] = (uint32_t)c;
		vm->st.recorded = rec->n;
	}
out:
	pthread_mutex_unlock(&srv->lock);
}

void recorder_free(struct recorder *rec)
{
	free(rec->chunks);
	free(rec->seen);
	memset(rec, 0, sizeof(*rec));
}

static struct vm *vm_by_id(struct snapd_server *srv, int id)
{
	return id >= 0 && id < SNAPD_MAX_VMS ? &srv->vms[id] : NULL;
}

int snapd_server_record_start(struct snapd_server *srv, int id)
{
	struct vm *vm = vm_by_id(srv, id);
	if (!vm)
		return -EINVAL;
	pthread_mutex_lock(&srv->lock);
	int rc = 0;
	int s = __atomic_load_n(&vm->state, __ATOMIC_ACQUIRE);
	if (s != SNAPD_VM_ACTIVE && s != SNAPD_VM_FAILED) {
		rc = -ESRCH;
	} else {
		uint8_t *seen = vm->rec.seen ? vm->rec.seen : calloc(vm->img->nchunks ? vm->img->nchunks : 1, 1);
		if (!seen) {
			rc = -ENOMEM;
		} else {
			memset(seen, 0, vm->img->nchunks);
			vm->rec.seen = seen;
			vm->rec.n = 0;
			vm->st.recorded = 0;
			vm->rec.on = 1;
		}
	}
	pthread_mutex_unlock(&srv->lock);
	return rc;
}

int snapd_server_record_stop(struct snapd_server *srv, int id)
{
	struct vm *vm = vm_by_id(srv, id);
	if (!vm)
		return -EINVAL;
	pthread_mutex_lock(&srv->lock);
	vm->rec.on = 0;
	pthread_mutex_unlock(&srv->lock);
	return 0;
}

int64_t snapd_server_record_take(struct snapd_server *srv, int id, uint32_t *out, uint32_t cap)
{
	struct vm *vm = vm_by_id(srv, id);
	if (!vm)
		return -EINVAL;
	pthread_mutex_lock(&srv->lock);
	uint32_t n = vm->rec.n;
	if (out && n)
		memcpy(out, vm->rec.chunks, (n < cap ? n : cap) * sizeof(uint32_t));
	pthread_mutex_unlock(&srv->lock);
	return n;
}

/* ---------- prefetch ---------- */

int prefetch_pending(const struct vm *vm)
{
	return vm->prefetch != NULL;
}

void prefetch_free(struct vm *vm)
{
	free(vm->prefetch);
	vm->prefetch = NULL;
	vm->nprefetch = vm->prefetch_pos = 0;
	vm->st.prefetch_pending = 0;
}

static void prefetch_done(struct vm *vm)
{
	vm->st.prefetch_ns = snapd_now_ns() - vm->prefetch_t0;
	prefetch_free(vm);
}

/* Install chunk c into every region that maps part of it and still misses it.
 * Returns 0, 1 (bad chunk: the VM failed) or -errno (-EAGAIN: retry later). */
static int prefetch_chunk(struct snapd_server *srv, struct vm *vm, uint64_t c)
{
	for (int i = 0; i < vm->nregions; i++) {
		struct region *r = &vm->regions[i];
		if (c < r->first_chunk || c - r->first_chunk >= r->nchunks || r->state[c - r->first_chunk] != CHUNK_MISSING)
			continue;
		int rc = install_chunk(srv, vm, r, c, WHY_PREFETCH);
		if (rc != 0)
			return rc;
	}
	return 0;
}

static void stage_step(struct snapd_server *srv, struct vm *vm);

void prefetch_step(struct snapd_server *srv, struct vm *vm)
{
	if (vm->stage) {
		stage_step(srv, vm);
		return;
	}
	uint64_t budget = PREFETCH_BUDGET;
	while (vm->prefetch_pos < vm->nprefetch) {
		int rc = prefetch_chunk(srv, vm, vm->prefetch[vm->prefetch_pos]);
		if (rc == -EAGAIN)
			return; /* the mm is changing: events first, then this chunk again */
		if (rc == -ESRCH)
			vm->dead = 1;
		if (rc != 0) { /* bad chunk (the VMM was told) or the process is gone */
			prefetch_done(vm);
			return;
		}
		vm->prefetch_pos++;
		uint64_t cs = vm->img->chunk_size;
		if (budget <= cs)
			return;
		budget -= cs;
	}
	prefetch_done(vm);
}

/* ---------- pre-fill of a shared image's memfd ---------- */

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

/* ---------- staging a loading set ahead of the restore ---------- */

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

/* The staged stream: from set position vm->prefetch_pos, install runs of
 * chunks that are adjacent in the image, in the set and in the buffer with one
 * UFFDIO_COPY (or ZEROPAGE) each, until STAGE_BUDGET bytes; a chunk not staged
 * (limit, error, staging still running) goes through the normal path. */
static void stage_step(struct snapd_server *srv, struct vm *vm)
{
	struct snapd_stage *st = vm->stage;
	struct snapd_image *img = vm->img;
	uint64_t cs = img->chunk_size, budget = STAGE_BUDGET;
	while (vm->prefetch_pos < vm->nprefetch) {
		uint32_t pos = vm->prefetch_pos;
		uint64_t c = vm->prefetch[pos];
		const uint8_t *data = NULL;
		int kind = stage_lookup(st, c, &data);
		int nreg = 0;
		struct region *r = vm_region_of_chunk(vm, c, &nreg);
		if (kind == STAGE_NONE || nreg != 1) {
			if (kind == STAGE_NONE)
				vm->st.stage_fallbacks++;
			int rc = prefetch_chunk(srv, vm, c); /* install_chunk still reads the buffer if staged */
			if (rc == -EAGAIN)
				return;
			if (rc == -ESRCH)
				vm->dead = 1;
			if (rc != 0) {
				prefetch_done(vm);
				return;
			}
			vm->prefetch_pos++;
			if (budget <= cs)
				return;
			budget -= cs;
			continue;
		}
		if (r->state[c - r->first_chunk] != CHUNK_MISSING) { /* a fault got there first */
			vm->prefetch_pos++;
			continue;
		}
		/* Extend the run: the next set entry is the next chunk, in r, missing, staged the same way and
		 * (data) right after this one in the buffer. */
		uint32_t k = 1;
		uint64_t run_bytes = snapd_chunk_len(img, c);
		while (pos + k < vm->nprefetch && run_bytes < budget) {
			uint64_t n = vm->prefetch[pos + k];
			const uint8_t *d2 = NULL;
			if (n != c + k || n - r->first_chunk >= r->nchunks || r->state[n - r->first_chunk] != CHUNK_MISSING ||
			    stage_lookup(st, n, &d2) != kind || (kind == STAGE_DATA && d2 != data + k * cs))
				break;
			run_bytes += snapd_chunk_len(img, n);
			k++;
		}
		/* The run's image range clipped to the region's, as addresses. */
		uint64_t fs = c * cs, fe = (c + k - 1) * cs + snapd_chunk_len(img, (uint32_t)(c + k - 1));
		uint64_t s = fs > r->offset ? fs : r->offset;
		uint64_t e = fe < r->offset + r->size ? fe : r->offset + r->size;
		uint64_t installed = 0;
		int rc = fill_range(vm, kind == STAGE_ZERO ? FILL_ZERO : FILL_COPY, r->addr + (s - r->offset),
				    kind == STAGE_ZERO ? NULL : data + (s - fs), e - s, &installed);
		vm->st.stage_ioctls++;
		vm->st.bytes_installed += installed;
		vm->st.prefetch_bytes += installed;
		if (rc == -EAGAIN)
			return; /* the mm is changing: events first, then this run again (EEXIST skips what is in) */
		if (rc < 0) {
			if (rc == -ESRCH)
				vm->dead = 1;
			prefetch_done(vm);
			return;
		}
		for (uint32_t j = 0; j < k; j++)
			r->state[c + j - r->first_chunk] = CHUNK_INSTALLED;
		vm->st.chunks_installed += k;
		vm->st.prefetch_chunks += k;
		vm->st.stage_chunks += k;
		if (kind == STAGE_ZERO)
			vm->st.zero_chunks += k;
		vm->prefetch_pos += k;
		if (budget <= run_bytes)
			return;
		budget -= run_bytes;
	}
	prefetch_done(vm);
}

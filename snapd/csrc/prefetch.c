/* Prefetch a loading set into a VM in bulk while its faults keep being
 * served first (FaaSnap's concurrent paging), in runs from the staging
 * buffer when the VM has one. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

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

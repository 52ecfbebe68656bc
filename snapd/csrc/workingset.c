/* Working sets: record which image chunks a VM faults on, in first-fault
 * order (a loading set), and prefetch a loading set into a VM in bulk while
 * its faults keep being served first (FaaSnap's concurrent paging). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

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

void prefetch_step(struct snapd_server *srv, struct vm *vm)
{
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

/* Working sets: record which image chunks a VM faults on, in first-fault
 * order (a loading set). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "pageserver_int.h"

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

/* Fault service: resolve one MISSING fault by installing its chunk, defer
 * it while the mm is changing, retry deferred faults, and time the service. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

static void defer_fault(struct vm *vm, uint64_t addr, uint64_t t0, uint32_t tries)
{
	if (vm->ndeferred == vm->cap_deferred) {
		int cap = vm->cap_deferred ? 2 * vm->cap_deferred : 16;
		struct deferred_fault *d = realloc(vm->deferred, cap * sizeof(*d));
		if (!d)
			return; /* the fault stays pending in the kernel; nothing better to do */
		vm->deferred = d;
		vm->cap_deferred = cap;
	}
	vm->deferred[vm->ndeferred++] = (struct deferred_fault){.addr = addr, .t0 = t0, .tries = tries};
}

static void record_service(struct vm *vm, uint64_t t0)
{
	uint64_t ns = snapd_now_ns() - t0;
	vm->st.faults++;
	vm->st.service_ns += ns;
	if (ns > vm->st.max_service_ns)
		vm->st.max_service_ns = ns;
	vm->hist[hist_bucket(ns)]++;
}

/* A fault on a chunk already marked installed: it was queued before a prefetch
 * or eager install of its chunk, so the page is almost surely there. Copying
 * just that page settles it (EEXIST: present, and fill_range wakes the
 * thread) instead of retrying the whole chunk one EEXIST page at a time. The
 * chunk is still loaded, because the page might really be missing. */
static int refault_page(struct snapd_server *srv, struct vm *vm, struct region *r, uint64_t c, uint64_t addr)
{
	struct snapd_image *img = vm->img;
	uint64_t file_off = r->offset + (addr - r->addr), installed;
	const uint8_t *data = NULL;
	char err[512];
	int kind = load_chunk(srv, vm, c, &data, WHY_FAULT, err, sizeof(err));
	if (kind < 0) {
		r->state[c - r->first_chunk] = CHUNK_MISSING;
		return install_chunk(srv, vm, r, c, WHY_FAULT); /* reports the bad chunk */
	}
	int rc = fill_range(vm, kind == 1 ? FILL_ZERO : FILL_COPY, addr,
			    kind == 1 ? NULL : data + (file_off - c * img->chunk_size), SNAPD_PAGE_SIZE, &installed);
	vm->st.bytes_installed += installed;
	return rc;
}

void serve_fault(struct snapd_server *srv, struct vm *vm, uint64_t addr, uint64_t t0, uint32_t tries)
{
	addr &= ~(SNAPD_PAGE_SIZE - 1);
	struct region *r = vm_find(vm, addr);
	int rc;
	if (!r) {
		rc = -EAGAIN; /* a REMAP not yet read may explain the address */
		if (tries >= DEFER_LIMIT) {
			char what[128];
			snprintf(what, sizeof(what), "fault at 0x%llx outside every region", (unsigned long long)addr);
			vm_fail(vm, what);
			return;
		}
	} else {
		uint64_t c = (r->offset + (addr - r->addr)) / vm->img->chunk_size;
		if (vm->rec.on)
			record_fault(srv, vm, c);
		if (prefetch_pending(vm))
			vm->st.prefetch_faults++;
		if (r->state[c - r->first_chunk] == CHUNK_INSTALLED && !(vm->flags & SNAPD_ATTACH_SHARED))
			rc = refault_page(srv, vm, r, c, addr);
		else
			rc = install_chunk(srv, vm, r, c, WHY_FAULT);
	}
	if (rc == -EAGAIN)
		defer_fault(vm, addr, t0, tries + 1);
	else if (rc == -ESRCH)
		vm->dead = 1;
	else
		record_service(vm, t0); /* includes faults left pending on a bad chunk */
}

void vm_retry_deferred(struct snapd_server *srv, struct vm *vm)
{
	int n = vm->ndeferred;
	vm->ndeferred = 0; /* serve_fault re-defers into the already-consumed prefix */
	for (int i = 0; i < n; i++)
		serve_fault(srv, vm, vm->deferred[i].addr, vm->deferred[i].t0, vm->deferred[i].tries);
}

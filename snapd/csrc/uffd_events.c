/* Reading a VM's userfaultfd: page faults go to fault service; FORK, REMAP,
 * REMOVE and UNMAP events update the VM slots and region tables. */
#define _GNU_SOURCE
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <linux/userfaultfd.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

/* UFFD_EVENT_FORK: the child gets its own uffd with the same registrations;
 * serve it like the parent (it inherits the parent's installed pages). */
static void handle_fork(struct snapd_server *srv, struct vm *vm, int child_uffd)
{
	vm->st.forks++;
	int id = attach_vm(srv, vm->img, child_uffd, -1, vm->regions, vm->nregions, NULL,
			   vm->flags & (SNAPD_ATTACH_SHARED | SNAPD_ATTACH_CONTINUE), vm->id, NULL, 0, NULL);
	if (id < 0)
		close(child_uffd); /* released: the child's registrations are dropped */
}

static void handle_remap(struct vm *vm, uint64_t from, uint64_t to, uint64_t len)
{
	vm->st.remaps++;
	vm_split_at(vm, from);
	vm_split_at(vm, from + len);
	for (int i = 0; i < vm->nregions; i++) {
		struct region *r = &vm->regions[i];
		if (r->addr >= from && r->addr + r->size <= from + len)
			r->addr = r->addr - from + to;
	}
	vm_regions_changed(vm);
}

static void handle_unmap(struct vm *vm, uint64_t start, uint64_t end)
{
	vm->st.unmaps++;
	vm_split_at(vm, start);
	vm_split_at(vm, end);
	for (int i = 0; i < vm->nregions;) {
		struct region *r = &vm->regions[i];
		if (r->addr >= start && r->addr + r->size <= end) {
			free(r->state);
			memmove(r, r + 1, (vm->nregions - i - 1) * sizeof(*r));
			vm->nregions--;
		} else {
			i++;
		}
	}
	vm_regions_changed(vm);
}

/* UFFD_EVENT_REMOVE (madvise DONTNEED/REMOVE): the pages are gone and the
 * next touch faults again; every chunk the range overlaps needs a refill. */
static void handle_remove(struct vm *vm, uint64_t start, uint64_t end)
{
	vm->st.removes++;
	for (int i = 0; i < vm->nregions; i++) {
		struct region *r = &vm->regions[i];
		uint64_t s = max_u64(start, r->addr), e = min_u64(end, r->addr + r->size);
		if (s >= e)
			continue;
		uint64_t cs = vm->img->chunk_size;
		uint64_t c0 = (r->offset + (s - r->addr)) / cs, c1 = (r->offset + (e - 1 - r->addr)) / cs;
		for (uint64_t c = c0; c <= c1; c++)
			if (r->state[c - r->first_chunk] == CHUNK_INSTALLED)
				r->state[c - r->first_chunk] = CHUNK_MISSING;
	}
	if (vm->eager)
		vm_regions_changed(vm);
}

static void handle_msg(struct snapd_server *srv, struct vm *vm, const struct uffd_msg *m, uint64_t t0)
{
	switch (m->event) {
	case UFFD_EVENT_PAGEFAULT:
		serve_fault(srv, vm, m->arg.pagefault.address, t0, 0);
		break;
	case UFFD_EVENT_FORK:
		handle_fork(srv, vm, (int)m->arg.fork.ufd);
		break;
	case UFFD_EVENT_REMAP:
		handle_remap(vm, m->arg.remap.from, m->arg.remap.to, m->arg.remap.len);
		break;
	case UFFD_EVENT_REMOVE:
		handle_remove(vm, m->arg.remove.start, m->arg.remove.end);
		break;
	case UFFD_EVENT_UNMAP:
		handle_unmap(vm, m->arg.remove.start, m->arg.remove.end);
		break;
	}
}

void vm_drain(struct snapd_server *srv, struct vm *vm)
{
	struct uffd_msg msgs[64];
	for (;;) {
		ssize_t n = read(vm->uffd, msgs, sizeof(msgs));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return; /* EAGAIN: drained */
		uint64_t t0 = snapd_now_ns();
		for (size_t i = 0; i < (size_t)n / sizeof(msgs[0]); i++)
			handle_msg(srv, vm, &msgs[i], t0);
		if ((size_t)n < sizeof(msgs))
			return;
	}
}

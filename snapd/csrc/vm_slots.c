/* VM slots: attach a VM (or a fork child) to a free slot, tell its VMM
 * "ready" or an error, and release everything it holds. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

static void json_escape(char *out, size_t cap, const char *in)
{
	size_t o = 0;
	for (; *in && o + 3 < cap; in++) {
		if (*in == '"' || *in == '\\')
			out[o++] = '\\';
		out[o++] = (unsigned char)*in < 0x20 ? ' ' : *in;
	}
	out[o] = 0;
}

/* Messages to the VMM are best effort: the socket is non-blocking and a VMM
 * that stopped reading must not stall the loop. */
static void send_line(struct vm *vm, const char *line)
{
	if (vm->sock >= 0)
		(void)send(vm->sock, line, strlen(line), MSG_NOSIGNAL | MSG_DONTWAIT);
}

void send_ready(struct vm *vm)
{
	char line[64];
	snprintf(line, sizeof(line), "{\"ready\": true, \"vm\": %d}\n", vm->id);
	send_line(vm, line);
}

void vm_fail(struct vm *vm, const char *what)
{
	char name[300], reason[700], line[1100];
	json_escape(name, sizeof(name), vm->img->name);
	json_escape(reason, sizeof(reason), what);
	snprintf(line, sizeof(line), "{\"error\": \"image %s %s\"}\n", name, reason);
	vm->st.errors++;
	__atomic_store_n(&vm->state, SNAPD_VM_FAILED, __ATOMIC_RELEASE);
	send_line(vm, line);
}

static uint64_t epoll_tag(const struct vm *vm, int is_sock)
{
	return (uint64_t)vm->gen << 32 | (uint64_t)vm->id << 1 | (uint64_t)is_sock;
}

void vm_release(struct snapd_server *srv, struct vm *vm)
{
	if (!vm_live(vm))
		return;
	epoll_ctl(srv->epfd, EPOLL_CTL_DEL, vm->uffd, NULL);
	close(vm->uffd); /* the kernel wakes any fault still pending on it */
	if (vm->sock >= 0) {
		epoll_ctl(srv->epfd, EPOLL_CTL_DEL, vm->sock, NULL);
		close(vm->sock);
	}
	pthread_mutex_lock(&srv->lock);
	for (int i = 0; i < vm->nregions; i++)
		free(vm->regions[i].state);
	free(vm->regions);
	free(vm->deferred);
	vm->regions = NULL;
	vm->deferred = NULL;
	vm->nregions = vm->ndeferred = vm->cap_deferred = 0;
	vm->eager = 0;
	vm->st.eager_pending = 0;
	prefetch_free(vm);
	struct snapd_stage *stage = vm->stage;
	vm->stage = NULL;
	vm->rec.on = 0;
	vm->uffd = vm->sock = -1;
	__atomic_store_n(&vm->state, SNAPD_VM_CLOSED, __ATOMIC_RELEASE);
	srv->live--;
	pthread_mutex_unlock(&srv->lock);
	if (stage)
		snapd_stage_put(stage); /* the last reference unmaps the buffer */
	/* Forked children live as long as the VM they came from. */
	for (int i = 0; i < SNAPD_MAX_VMS; i++)
		if (srv->vms[i].parent == vm->id && vm_live(&srv->vms[i]))
			vm_release(srv, &srv->vms[i]);
}

/* Regions come either from specs (a new VM) or from an existing VM (a fork
 * child, whose installed state is inherited). */
int attach_vm(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
	      const struct region *regions, int nregions, const struct snapd_region_spec *specs,
	      int flags, int parent, const uint32_t *prefetch, uint32_t nprefetch, struct snapd_stage *stage)
{
	if (flags & SNAPD_ATTACH_CONTINUE)
		flags |= SNAPD_ATTACH_SHARED;
	if ((flags & SNAPD_ATTACH_SHARED) && img->memfd < 0)
		return -EINVAL;
	pthread_mutex_lock(&srv->lock);
	int slot = -1;
	for (int pass = 0; pass < 2 && slot < 0; pass++) /* free slots first, then closed ones */
		for (int i = 0; i < SNAPD_MAX_VMS && slot < 0; i++)
			if (srv->vms[i].state == (pass ? SNAPD_VM_CLOSED : SNAPD_VM_FREE))
				slot = i;
	if (slot < 0) {
		pthread_mutex_unlock(&srv->lock);
		return -ENOSPC;
	}
	struct vm *vm = &srv->vms[slot];
	uint32_t gen = vm->gen + 1;
	recorder_free(&vm->rec); /* a closed VM's recording stays readable until its slot is reused */
	memset(vm, 0, sizeof(*vm));
	vm->state = SNAPD_VM_CLOSED; /* reserved: not FREE, not live */
	pthread_mutex_unlock(&srv->lock);

	vm->gen = gen;
	vm->id = slot;
	vm->uffd = uffd;
	vm->sock = sock;
	vm->parent = parent;
	vm->flags = flags;
	vm->img = img;
	vm->st.parent = parent;
	vm->regions = calloc(nregions ? nregions : 1, sizeof(struct region));
	int rc = vm->regions ? 0 : -ENOMEM;
	for (int i = 0; i < nregions && rc == 0; i++) {
		if (regions) {
			rc = region_init(&vm->regions[i], img, regions[i].addr, regions[i].size, regions[i].offset);
			if (rc == 0)
				memcpy(vm->regions[i].state, regions[i].state, regions[i].nchunks);
		} else {
			rc = region_init(&vm->regions[i], img, specs[i].addr, specs[i].size, specs[i].offset);
		}
		if (rc == 0)
			vm->nregions++;
	}
	vm->st.nregions = vm->nregions;
	if (rc == 0 && nprefetch) {
		vm->prefetch = malloc(nprefetch * sizeof(uint32_t));
		if (vm->prefetch) {
			memcpy(vm->prefetch, prefetch, nprefetch * sizeof(uint32_t));
			vm->nprefetch = nprefetch;
			vm->st.prefetch_pending = 1;
			vm->prefetch_t0 = snapd_now_ns();
		} else {
			rc = -ENOMEM;
		}
	}
	if (rc == 0 && stage) {
		stage_get(stage);
		vm->stage = stage;
	}
	if (rc == 0 && (flags & SNAPD_ATTACH_RECORD)) {
		vm->rec.seen = calloc(img->nchunks ? img->nchunks : 1, 1);
		vm->rec.on = vm->rec.seen != NULL;
		rc = vm->rec.on ? 0 : -ENOMEM;
	}
	if (flags & SNAPD_ATTACH_EAGER) {
		vm->eager = 1;
		vm->st.eager_pending = 1;
		vm->eager_t0 = snapd_now_ns();
	}
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = epoll_tag(vm, 0)};
	if (rc == 0 && epoll_ctl(srv->epfd, EPOLL_CTL_ADD, uffd, &ev) < 0)
		rc = -errno;
	struct epoll_event sev = {.events = EPOLLIN | EPOLLRDHUP, .data.u64 = epoll_tag(vm, 1)};
	if (rc == 0 && sock >= 0 && epoll_ctl(srv->epfd, EPOLL_CTL_ADD, sock, &sev) < 0) {
		rc = -errno;
		epoll_ctl(srv->epfd, EPOLL_CTL_DEL, uffd, NULL);
	}
	if (rc < 0) {
		for (int i = 0; i < vm->nregions; i++)
			free(vm->regions[i].state);
		free(vm->regions);
		vm->regions = NULL;
		vm->nregions = 0;
		prefetch_free(vm);
		recorder_free(&vm->rec);
		if (vm->stage)
			snapd_stage_put(vm->stage);
		vm->stage = NULL;
		return rc; /* the caller still owns uffd and sock */
	}
	if (!(flags & SNAPD_ATTACH_EAGER))
		send_ready(vm);
	pthread_mutex_lock(&srv->lock);
	srv->live++;
	__atomic_store_n(&vm->state, SNAPD_VM_ACTIVE, __ATOMIC_RELEASE);
	pthread_mutex_unlock(&srv->lock);
	if ((flags & SNAPD_ATTACH_EAGER) || vm->nprefetch) { /* the loop may be asleep in epoll_wait */
		uint64_t one = 1;
		(void)!write(srv->evfd, &one, sizeof(one));
	}
	return slot;
}

int snapd_server_attach_staged(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
			       const struct snapd_region_spec *regions, int nregions, int flags,
			       const uint32_t *prefetch, uint32_t nprefetch, struct snapd_stage *stage)
{
	if (nregions <= 0)
		return -EINVAL;
	if (stage && (stage->img != img || (flags & (SNAPD_ATTACH_SHARED | SNAPD_ATTACH_CONTINUE)) || img->memfd >= 0))
		return -EINVAL;
	for (int i = 0; i < nregions; i++) {
		const struct snapd_region_spec *r = &regions[i];
		if ((r->addr | r->size | r->offset) & (SNAPD_PAGE_SIZE - 1) || r->size == 0 ||
		    r->offset + r->size > img->mem_size)
			return -EINVAL;
	}
	for (uint32_t i = 0; i < nprefetch; i++)
		if (prefetch[i] >= img->nchunks)
			return -ERANGE; /* Python names the chunk; here it is only refused */
	return attach_vm(srv, img, uffd, sock, NULL, nregions, regions, flags, -1, prefetch, nprefetch, stage);
}

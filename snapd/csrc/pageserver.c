/* The page server's epoll loop: one thread over every VM's uffd and control
 * socket, with deferred faults, eager install and prefetch between events;
 * server create/stop/free and the stats copies. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pageserver.h"
#include "pageserver_int.h"
#include "uffd_ops.h"

/* The service-time histogram bucket of ns (SNAPD_HIST_BUCKETS, pageserver.h). */
unsigned hist_bucket(uint64_t ns)
{
	if (ns < 8)
		return (unsigned)ns;
	unsigned msb = 63 - (unsigned)__builtin_clzll(ns);
	unsigned b = msb * 8 + (unsigned)((ns >> (msb - 3)) & 7);
	return b < SNAPD_HIST_BUCKETS ? b : SNAPD_HIST_BUCKETS - 1;
}

struct snapd_server *snapd_server_new(void)
{
	struct snapd_server *srv = calloc(1, sizeof(*srv));
	if (!srv)
		return NULL;
	srv->epfd = epoll_create1(EPOLL_CLOEXEC);
	srv->evfd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
	struct epoll_event ev = {.events = EPOLLIN, .data.u64 = EVFD_TAG};
	if (srv->epfd < 0 || srv->evfd < 0 || epoll_ctl(srv->epfd, EPOLL_CTL_ADD, srv->evfd, &ev) < 0) {
		if (srv->epfd >= 0)
			close(srv->epfd);
		if (srv->evfd >= 0)
			close(srv->evfd);
		free(srv);
		return NULL;
	}
	pthread_mutex_init(&srv->lock, NULL);
	for (int i = 0; i < SNAPD_MAX_VMS; i++) {
		srv->vms[i].id = i;
		srv->vms[i].parent = srv->vms[i].st.parent = -1;
		srv->vms[i].uffd = srv->vms[i].sock = -1;
	}
	return srv;
}

static void handle_sock(struct snapd_server *srv, struct vm *vm, uint32_t events)
{
	char buf[512];
	ssize_t n = recv(vm->sock, buf, sizeof(buf), MSG_DONTWAIT);
	/* Nothing is expected from the VMM after the handshake: EOF or an error
	 * means it is gone, and everything held for it is released. */
	if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR) || (events & (EPOLLHUP | EPOLLERR)))
		vm_release(srv, vm);
}

int snapd_server_run(struct snapd_server *srv)
{
	struct epoll_event evs[64];
	while (!__atomic_load_n(&srv->stop, __ATOMIC_ACQUIRE)) {
		int busy = 0, waiting = 0;
		for (int i = 0; i < SNAPD_MAX_VMS; i++) {
			struct vm *vm = &srv->vms[i];
			if (vm_live(vm)) {
				busy |= vm->eager | prefetch_pending(vm);
				waiting |= vm->ndeferred > 0;
			}
		}
		int n = epoll_wait(srv->epfd, evs, 64, busy ? 0 : waiting ? 1 : -1);
		if (n < 0 && errno != EINTR)
			return -errno;
		for (int i = 0; i < n; i++) {
			uint64_t tag = evs[i].data.u64;
			if (tag == EVFD_TAG) {
				uint64_t v;
				(void)!read(srv->evfd, &v, sizeof(v));
				continue;
			}
			struct vm *vm = &srv->vms[(uint32_t)(tag & 0xffffffff) >> 1];
			if (!vm_live(vm) || vm->gen != (uint32_t)(tag >> 32))
				continue; /* released earlier in this batch */
			if (tag & 1)
				handle_sock(srv, vm, evs[i].events);
			else
				vm_drain(srv, vm);
			if (vm->dead)
				vm_release(srv, vm);
		}
		for (int i = 0; i < SNAPD_MAX_VMS; i++) {
			struct vm *vm = &srv->vms[i];
			if (!vm_live(vm))
				continue;
			if (vm->ndeferred) {
				vm_drain(srv, vm); /* read the events that made the copy fail first */
				vm_retry_deferred(srv, vm);
			}
			if (vm->eager)
				eager_step(srv, vm);
			/* One batch per turn: faults that arrived meanwhile are served first
			 * on the next turn (epoll_wait does not sleep while this is pending). */
			if (prefetch_pending(vm) && !vm->dead)
				prefetch_step(srv, vm);
			if (vm->dead)
				vm_release(srv, vm);
		}
	}
	return 0;
}

void snapd_server_stop(struct snapd_server *srv)
{
	uint64_t one = 1;
	__atomic_store_n(&srv->stop, 1, __ATOMIC_RELEASE);
	(void)!write(srv->evfd, &one, sizeof(one));
}

void snapd_server_free(struct snapd_server *srv)
{
	if (!srv)
		return;
	for (int i = 0; i < SNAPD_MAX_VMS; i++)
		if (srv->vms[i].parent < 0)
			vm_release(srv, &srv->vms[i]);
	for (int i = 0; i < SNAPD_MAX_VMS; i++)
		vm_release(srv, &srv->vms[i]);
	for (int i = 0; i < SNAPD_MAX_VMS; i++)
		recorder_free(&srv->vms[i].rec);
	close(srv->epfd);
	close(srv->evfd);
	snapd_scratch_free(&srv->scratch);
	pthread_mutex_destroy(&srv->lock);
	free(srv);
}

int snapd_server_vm_stats(struct snapd_server *srv, int id, struct snapd_vm_stats *out, uint32_t *hist)
{
	if (id < 0 || id >= SNAPD_MAX_VMS)
		return -EINVAL;
	pthread_mutex_lock(&srv->lock);
	struct vm *vm = &srv->vms[id];
	*out = vm->st;
	out->state = __atomic_load_n(&vm->state, __ATOMIC_ACQUIRE);
	if (hist)
		memcpy(hist, vm->hist, sizeof(vm->hist));
	pthread_mutex_unlock(&srv->lock);
	return 0;
}

int snapd_server_live_vms(struct snapd_server *srv)
{
	pthread_mutex_lock(&srv->lock);
	int n = srv->live;
	pthread_mutex_unlock(&srv->lock);
	return n;
}

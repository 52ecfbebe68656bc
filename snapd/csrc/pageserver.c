#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#include "pageserver.h"
#include "pageserver_int.h"
#include "uffd_ops.h"

/* ---------- small helpers ---------- */

static uint64_t min_u64(uint64_t a, uint64_t b) { return a < b ? a : b; }
static uint64_t max_u64(uint64_t a, uint64_t b) { return a > b ? a : b; }

static unsigned hist_bucket(uint64_t ns)
{
	if (ns < 8)
		return (unsigned)ns;
	unsigned msb = 63 - (unsigned)__builtin_clzll(ns);
	unsigned b = msb * 8 + (unsigned)((ns >> (msb - 3)) & 7);
	return b < SNAPD_HIST_BUCKETS ? b : SNAPD_HIST_BUCKETS - 1;
}

static int vm_live(const struct vm *vm)
{
	int s = __atomic_load_n(&vm->state, __ATOMIC_ACQUIRE);
	return s == SNAPD_VM_ACTIVE || s == SNAPD_VM_FAILED;
}

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

static void send_ready(struct vm *vm)
{
	char line[64];
	snprintf(line, sizeof(line), "{\"ready\": true, \"vm\": %d}\n", vm->id);
	send_line(vm, line);
}

static void vm_fail(struct vm *vm, const char *what)
{
	char name[300], reason[700], line[1100];
	json_escape(name, sizeof(name), vm->img->name);
	json_escape(reason, sizeof(reason), what);
	snprintf(line, sizeof(line), "{\"error\": \"image %s %s\"}\n", name, reason);
	vm->st.errors++;
	__atomic_store_n(&vm->state, SNAPD_VM_FAILED, __ATOMIC_RELEASE);
	send_line(vm, line);
}

/* ---------- regions ---------- */

static int region_init(struct region *r, const struct snapd_image *img, uint64_t addr, uint64_t size,
		       uint64_t offset)
{
	r->addr = addr;
	r->size = size;
	r->offset = offset;
	r->first_chunk = offset / img->chunk_size;
	r->nchunks = (offset + size - 1) / img->chunk_size - r->first_chunk + 1;
	r->state = calloc(r->nchunks, 1);
	return r->state ? 0 : -ENOMEM;
}

static struct region *vm_find(struct vm *vm, uint64_t addr)
{
	for (int i = 0; i < vm->nregions; i++)
		if (addr - vm->regions[i].addr < vm->regions[i].size)
			return &vm->regions[i];
	return NULL;
}

static void region_copy_state(struct region *dst, const struct region *src)
{
	for (uint64_t k = 0; k < dst->nchunks; k++) {
		uint64_t c = dst->first_chunk + k;
		if (c >= src->first_chunk && c - src->first_chunk < src->nchunks)
			dst->state[k] = src->state[c - src->first_chunk];
	}
}

/* Split the region containing `at` (strictly inside) into two, so REMAP and
 * UNMAP ranges always cover whole regions. */
static int vm_split_at(struct vm *vm, uint64_t at)
{
	for (int i = 0; i < vm->nregions; i++) {
		struct region *r = &vm->regions[i];
		if (!(r->addr < at && at < r->addr + r->size))
			continue;
		struct region a, b;
		if (region_init(&a, vm->img, r->addr, at - r->addr, r->offset))
			return -ENOMEM;
		if (region_init(&b, vm->img, at, r->addr + r->size - at, r->offset + (at - r->addr))) {
			free(a.state);
			return -ENOMEM;
		}
		region_copy_state(&a, r);
		region_copy_state(&b, r);
		struct region *grown = realloc(vm->regions, (vm->nregions + 1) * sizeof(*grown));
		if (!grown) {
			free(a.state);
			free(b.state);
			return -ENOMEM;
		}
		vm->regions = grown;
		free(grown[i].state);
		memmove(&grown[i + 2], &grown[i + 1], (vm->nregions - i - 1) * sizeof(*grown));
		grown[i] = a;
		grown[i + 1] = b;
		vm->nregions++;
		return 0;
	}
	return 0;
}

static void vm_regions_changed(struct vm *vm)
{
	vm->st.nregions = vm->nregions;
	/* Eager install walks regions by index: restart it; installed chunks are skipped. */
	vm->eager_region = 0;
	vm->eager_chunk = 0;
}

/* ---------- installing one chunk ---------- */

/* One UFFDIO_COPY / ZEROPAGE / CONTINUE call; returns 0 or -errno, *progress the bytes done
 * (or -errno) as the kernel reports it. */
static int fill_ioctl(struct vm *vm, enum fill_op op, uint64_t dst, const uint8_t *src, uint64_t len,
		      int64_t *progress)
{
	int rc;
	if (op == FILL_COPY) {
		struct uffdio_copy cp = {.dst = dst, .src = (uint64_t)(uintptr_t)src, .len = len};
		rc = snapd_ioctl(vm->uffd, UFFDIO_COPY, &cp);
		*progress = cp.copy;
	} else if (op == FILL_ZERO) {
		struct uffdio_zeropage zp = {.range = {.start = dst, .len = len}};
		rc = snapd_ioctl(vm->uffd, UFFDIO_ZEROPAGE, &zp);
		*progress = zp.zeropage;
	} else {
		struct uffdio_continue co = {.range = {.start = dst, .len = len}};
		rc = snapd_ioctl(vm->uffd, UFFDIO_CONTINUE, &co);
		*progress = co.mapped;
	}
	return rc;
}

/* Fill [dst, dst+len) with one ioctl. Pages that already exist (a racing
 * fault or eager install got there first) are skipped one by one; then the
 * range is woken, since a fault whose page was installed by someone else is
 * not woken by our failed call. */
int fill_range(struct vm *vm, enum fill_op op, uint64_t dst, const uint8_t *src, uint64_t len,
		      uint64_t *installed)
{
	uint64_t done = 0;
	int skipped = 0;
	*installed = 0;
	while (done < len) {
		int64_t progress = 0;
		int rc = fill_ioctl(vm, op, dst + done, src ? src + done : NULL, len - done, &progress);
		if (rc == 0) {
			*installed += len - done;
			break;
		}
		if (progress > 0) { /* partial: stopped at an existing page or a signal */
			done += (uint64_t)progress;
			*installed += (uint64_t)progress;
			continue;
		}
		if (rc == -EEXIST) {
			vm->st.eexist++;
			skipped = 1;
			done += SNAPD_PAGE_SIZE;
			continue;
		}
		if (rc == -EAGAIN) /* the mm is changing: an event is queued for us */
			vm->st.eagain++;
		return rc;
	}
	if (skipped) {
		struct uffdio_range wake = {.start = dst, .len = len};
		int rc = snapd_ioctl(vm->uffd, UFFDIO_WAKE, &wake);
		if (rc < 0)
			return rc;
	}
	return 0;
}

/* Shared mode: the chunk goes into the image's memfd once for all VMs; each
 * VM's MAP_PRIVATE mapping then just needs its waiting threads woken.
 * Returns 1 with err filled when the chunk cannot be loaded. */
static int fill_shared(struct snapd_server *srv, struct vm *vm, uint64_t c, uint64_t dst, uint64_t len,
		       enum install_why why, char *err, size_t errlen)
{
	struct snapd_image *img = vm->img;
	int zero = 0;
	/* Blocks while another thread (a pre-fill) writes this chunk: at most one chunk's copy. */
	int rc = snapd_shared_fill(img, (uint32_t)c, &srv->scratch, 1, 0, &zero, err, errlen);
	if (rc < 0)
		return 1;
	if (rc == SNAPD_FILL_DONE) {
		vm->st.shared_fills++;
		vm->st.bytes_installed += snapd_chunk_len(img, (uint32_t)c);
		if (zero)
			vm->st.zero_chunks++;
	} else {
		vm->st.shared_wakes++;
	}
	if (vm->flags & SNAPD_ATTACH_CONTINUE) { /* map the whole chunk now: no fault per page */
		uint64_t mapped;
		return fill_range(vm, FILL_CONTINUE, dst, NULL, len, &mapped);
	}
	if (why == WHY_PREFETCH) /* a fault already queued on this chunk is woken when it is served */
		return 0;
	struct uffdio_range wake = {.start = dst, .len = len};
	return snapd_ioctl(vm->uffd, UFFDIO_WAKE, &wake);
}

/* Chunk c's verified bytes: from the VM's staging buffer when staged there,
 * else read and decompressed (snapd_chunk_load). Returns as snapd_chunk_load. */
static int load_chunk(struct snapd_server *srv, struct vm *vm, uint64_t c, const uint8_t **data,
		      enum install_why why, char *err, size_t errlen)
{
	int s = stage_lookup(vm->stage, c, data);
	if (s != STAGE_NONE) {
		if (why == WHY_FAULT)
			vm->st.stage_faults++;
		return s == STAGE_ZERO ? 1 : 0;
	}
	return snapd_chunk_load(vm->img, (uint32_t)c, &srv->scratch, data, err, errlen);
}

/* The region holding chunk c (the first of *count regions that overlap it). */
struct region *vm_region_of_chunk(struct vm *vm, uint64_t c, int *count)
{
	struct region *found = NULL;
	*count = 0;
	for (int i = 0; i < vm->nregions; i++) {
		struct region *r = &vm->regions[i];
		if (c >= r->first_chunk && c - r->first_chunk < r->nchunks) {
			if (!found)
				found = r;
			++*count;
		}
	}
	return found;
}

/* Install image chunk c into region r. Returns 0 when installed, 1 when the
 * chunk is bad (VM marked failed and told; nothing installed), or -errno
 * (-EAGAIN: retry after the queued events, -ESRCH: the process is gone). */
int install_chunk(struct snapd_server *srv, struct vm *vm, struct region *r, uint64_t c, enum install_why why)
{
	struct snapd_image *img = vm->img;
	uint8_t *state = &r->state[c - r->first_chunk];
	if (*state == CHUNK_BAD)
		return 1;
	/* The chunk's file range clipped to the region's, as addresses. */
	uint64_t fs = c * img->chunk_size, fe = fs + snapd_chunk_len(img, c);
	uint64_t s = max_u64(fs, r->offset), e = min_u64(fe, r->offset + r->size);
	uint64_t dst = r->addr + (s - r->offset), len = e - s;
	char err[512], what[600];
	int rc;
	if (vm->flags & SNAPD_ATTACH_SHARED) {
		rc = fill_shared(srv, vm, c, dst, len, why, err, sizeof(err));
	} else {
		const uint8_t *data = NULL;
		uint64_t installed = 0;
		int kind = load_chunk(srv, vm, c, &data, why, err, sizeof(err));
		if (kind < 0) {
			rc = 1;
		} else {
			rc = fill_range(vm, kind == 1 ? FILL_ZERO : FILL_COPY, dst, kind == 1 ? NULL : data + (s - fs), len,
					&installed);
			vm->st.bytes_installed += installed;
			if (why == WHY_EAGER)
				vm->st.eager_bytes += installed;
			else if (why == WHY_PREFETCH)
				vm->st.prefetch_bytes += installed;
			if (rc == 0 && kind == 1)
				vm->st.zero_chunks++;
		}
	}
	if (rc == 1) {
		snprintf(what, sizeof(what), "chunk %llu: %s", (unsigned long long)c, err);
		*state = CHUNK_BAD;
		vm_fail(vm, what);
		return 1;
	}
	if (rc == 0) {
		*state = CHUNK_INSTALLED;
		vm->st.chunks_installed++;
		if (why == WHY_PREFETCH)
			vm->st.prefetch_chunks++;
	}
	return rc;
}

/* ---------- faults and events ---------- */

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

static void serve_fault(struct snapd_server *srv, struct vm *vm, uint64_t addr, uint64_t t0, uint32_t tries)
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

static int attach_vm(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
		     const struct region *regions, int nregions, const struct snapd_region_spec *specs,
		     int flags, int parent, const uint32_t *prefetch, uint32_t nprefetch, struct snapd_stage *stage);

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

static void vm_drain(struct snapd_server *srv, struct vm *vm)
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

static void vm_retry_deferred(struct snapd_server *srv, struct vm *vm)
{
	int n = vm->ndeferred;
	vm->ndeferred = 0; /* serve_fault re-defers into the already-consumed prefix */
	for (int i = 0; i < n; i++)
		serve_fault(srv, vm, vm->deferred[i].addr, vm->deferred[i].t0, vm->deferred[i].tries);
}

static void eager_step(struct snapd_server *srv, struct vm *vm)
{
	uint64_t budget = EAGER_BUDGET;
	while (vm->eager_region < vm->nregions) {
		struct region *r = &vm->regions[vm->eager_region];
		for (; vm->eager_chunk < r->nchunks; vm->eager_chunk++) {
			if (r->state[vm->eager_chunk] != CHUNK_MISSING)
				continue;
			if (budget == 0)
				return;
			int rc = install_chunk(srv, vm, r, r->first_chunk + vm->eager_chunk, WHY_EAGER);
			if (rc == -EAGAIN)
				return;
			if (rc == -ESRCH)
				vm->dead = 1;
			if (rc == 1 || rc == -ESRCH) {
				vm->eager = 0; /* failed: the VMM got an error instead of ready */
				vm->st.eager_pending = 0;
				return;
			}
			budget -= min_u64(budget, vm->img->chunk_size);
		}
		vm->eager_region++;
		vm->eager_chunk = 0;
	}
	vm->eager = 0;
	vm->st.eager_pending = 0;
	vm->st.eager_ns = snapd_now_ns() - vm->eager_t0;
	send_ready(vm);
}

/* ---------- VM slots ---------- */

static uint64_t epoll_tag(const struct vm *vm, int is_sock)
{
	return (uint64_t)vm->gen << 32 | (uint64_t)vm->id << 1 | (uint64_t)is_sock;
}

static void vm_release(struct snapd_server *srv, struct vm *vm)
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
static int attach_vm(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
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

/* ---------- public API ---------- */

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

int snapd_server_attach(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
			const struct snapd_region_spec *regions, int nregions, int flags)
{
	return snapd_server_attach_ex(srv, img, uffd, sock, regions, nregions, flags, NULL, 0);
}

int snapd_server_attach_ex(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
			   const struct snapd_region_spec *regions, int nregions, int flags,
			   const uint32_t *prefetch, uint32_t nprefetch)
{
	return snapd_server_attach_staged(srv, img, uffd, sock, regions, nregions, flags, prefetch, nprefetch, NULL);
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

/* Installing image chunks into a VM: one chunk (for a fault, the eager
 * install or a prefetch) by UFFDIO_COPY/ZEROPAGE/CONTINUE or a shared-memfd
 * fill and wake, and the eager install of every chunk before "ready". */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <linux/userfaultfd.h>

#include "pageserver_int.h"
#include "uffd_ops.h"

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
int load_chunk(struct snapd_server *srv, struct vm *vm, uint64_t c, const uint8_t **data,
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

void eager_step(struct snapd_server *srv, struct vm *vm)
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

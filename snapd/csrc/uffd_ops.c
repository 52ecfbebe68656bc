#define _GNU_SOURCE
#include <errno.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "uffd_ops.h"

int snapd_uffd_create(int flags)
{
	long fd = syscall(SYS_userfaultfd, flags);
	return fd < 0 ? -errno : (int)fd;
}

int snapd_ioctl(int fd, unsigned long request, void *arg)
{
	int rc = ioctl(fd, request, arg);
	return rc < 0 ? -errno : rc;
}

uint64_t snapd_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

uint64_t snapd_touch(uint64_t addr, uint64_t len, uint64_t stride, int write, uint64_t *ns_out)
{
	uint64_t sum = 0, i = 0;
	for (uint64_t off = 0; off < len; off += stride, i++) {
		volatile uint8_t *p = (volatile uint8_t *)(uintptr_t)(addr + off);
		uint64_t t0 = ns_out ? snapd_now_ns() : 0;
		if (write)
			*p = *p; /* write the value it already has: a write fault, content unchanged */
		else
			sum += *p;
		if (ns_out)
			ns_out[i] = snapd_now_ns() - t0;
	}
	return sum;
}

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22
#endif

int snapd_populate_read(const uint64_t *addrs, const uint64_t *lens, uint32_t n)
{
	for (uint32_t i = 0; i < n; i++) {
		int rc;
		do
			rc = madvise((void *)(uintptr_t)addrs[i], lens[i], MADV_POPULATE_READ);
		while (rc < 0 && errno == EINTR);
		if (rc < 0)
			return -errno;
	}
	return 0;
}

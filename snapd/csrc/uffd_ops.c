#define _GNU_SOURCE
#include <errno.h>
#include <sys/ioctl.h>
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

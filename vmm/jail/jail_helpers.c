/* C side of vmm.jail._native: thin syscall wrappers that return -errno, so every Python caller goes through
 * one checker (vmm.jail.native.check) that names the failing call. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/openat2.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <seccomp.h>

#define RET(expr) do { long r_ = (expr); return r_ < 0 ? -errno : (int)r_; } while (0)

uint32_t jail_scmp_act_errno(uint16_t errno_value) { return SCMP_ACT_ERRNO(errno_value); }

int jail_unshare(int flags) { RET(unshare(flags)); }

int jail_mount(const char *source, const char *target, const char *fstype, unsigned long flags, const char *data)
{
    RET(mount(source, target, fstype, flags, data));
}

int jail_umount2(const char *target, int flags) { RET(umount2(target, flags)); }

/* glibc has no wrapper for pivot_root(2). */
int jail_pivot_root(const char *new_root, const char *put_old) { RET(syscall(SYS_pivot_root, new_root, put_old)); }

int jail_prctl(int option, unsigned long a2, unsigned long a3, unsigned long a4, unsigned long a5)
{
    RET(prctl(option, a2, a3, a4, a5));
}

/* Empty the bounding and ambient sets (needs CAP_SETPCAP, so before the uid change): nothing dropped later can
 * come back, even through a set-uid program. */
int jail_drop_bounding_set(void)
{
    for (int cap = 0; cap <= CAP_LAST_CAP; cap++) {
        if (prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            return -errno;
    }
    if (prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL)
        return -errno;
    return 0;
}

/* Empty the effective, permitted and inheritable sets. */
int jail_clear_capabilities(void)
{
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    memset(data, 0, sizeof data);
    RET(syscall(SYS_capset, &header, data));
}

/* 1 if the effective, permitted and inheritable sets are all empty. */
int jail_capabilities_empty(void)
{
    struct __user_cap_header_struct header = { .version = _LINUX_CAPABILITY_VERSION_3, .pid = 0 };
    struct __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3];
    if (syscall(SYS_capget, &header, data) < 0)
        return -errno;
    for (int i = 0; i < _LINUX_CAPABILITY_U32S_3; i++)
        if (data[i].effective || data[i].permitted || data[i].inheritable)
            return 0;
    return 1;
}

int jail_setresuid(unsigned int uid) { RET(setresuid(uid, uid, uid)); }
int jail_setresgid(unsigned int gid) { RET(setresgid(gid, gid, gid)); }
int jail_setgroups_none(void) { RET(setgroups(0, NULL)); }
int jail_sethostname(const char *name) { RET(sethostname(name, strlen(name))); }

int jail_openat2(int dirfd, const char *path, uint64_t flags, uint64_t mode, uint64_t resolve)
{
    struct open_how how = { .flags = flags, .mode = mode, .resolve = resolve };
    RET(syscall(SYS_openat2, dirfd, path, &how, sizeof how));
}

/* Close every descriptor >= 3 except those in keep (sorted or not), with close_range(2) over the gaps. */
static int cmp_int(const void *a, const void *b) { return *(const int *)a - *(const int *)b; }

int jail_close_range_except(const int *keep, int nkeep)
{
    int sorted[256];
    if (nkeep < 0 || nkeep > 256)
        return -EINVAL;
    memcpy(sorted, keep, sizeof(int) * (size_t)nkeep);
    qsort(sorted, (size_t)nkeep, sizeof(int), cmp_int);
    unsigned int next = 3;
    for (int i = 0; i < nkeep; i++) {
        if (sorted[i] < (int)next)
            continue;
        if ((unsigned int)sorted[i] > next && syscall(SYS_close_range, next, (unsigned int)sorted[i] - 1, 0) < 0)
            return -errno;
        next = (unsigned int)sorted[i] + 1;
    }
    RET(syscall(SYS_close_range, next, ~0U, 0));
}

int jail_clearenv(void) { RET(clearenv()); }

/* Install a BPF program libseccomp compiled earlier (seccomp_export_bpf), e.g. in the zygote before the fork:
 * the child then loads it without building it again. Needs no_new_privs. */
int jail_load_filter(const void *program, size_t length)
{
    if (length == 0 || length % sizeof(struct sock_filter) || length / sizeof(struct sock_filter) > BPF_MAXINSNS)
        return -EINVAL;
    struct sock_fprog prog = { .len = (unsigned short)(length / sizeof(struct sock_filter)),
                               .filter = (struct sock_filter *)program };
    RET(prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog, 0, 0));
}

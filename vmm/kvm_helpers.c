/* C side of vmm._kvm_native: header includes, accessors for kvm_run's anonymous union,
 * and syscall wrappers that return -errno instead of setting errno. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
#include <linux/kvm.h>

typedef struct { uint8_t direction; uint8_t size; uint16_t port; uint32_t count; uint64_t data_offset; } vmm_exit_io;
typedef struct { uint64_t phys_addr; uint8_t data[8]; uint32_t len; uint8_t is_write; } vmm_exit_mmio;
typedef struct { uint32_t suberror; uint32_t ndata; uint64_t data[16]; } vmm_exit_internal;
typedef struct { uint32_t type; uint32_t ndata; uint64_t data[16]; } vmm_exit_system_event;
typedef struct { uint64_t hardware_entry_failure_reason; uint32_t cpu; } vmm_exit_fail_entry;

/* The typedefs above mirror the union members; fail the build if the kernel ever disagrees. */
_Static_assert(sizeof(vmm_exit_io) == sizeof(((struct kvm_run *)0)->io), "kvm_run.io layout");
_Static_assert(sizeof(vmm_exit_mmio) == sizeof(((struct kvm_run *)0)->mmio), "kvm_run.mmio layout");

vmm_exit_io *vmm_run_io(struct kvm_run *run) { return (vmm_exit_io *)&run->io; }
vmm_exit_mmio *vmm_run_mmio(struct kvm_run *run) { return (vmm_exit_mmio *)&run->mmio; }
vmm_exit_internal *vmm_run_internal(struct kvm_run *run) { return (vmm_exit_internal *)&run->internal; }
vmm_exit_system_event *vmm_run_system_event(struct kvm_run *run) { return (vmm_exit_system_event *)&run->system_event; }
vmm_exit_fail_entry *vmm_run_fail_entry(struct kvm_run *run) { return (vmm_exit_fail_entry *)&run->fail_entry; }

static long neg_errno(long ret) { return ret < 0 ? -errno : ret; }

long vmm_open(const char *path, int flags) { return neg_errno(open(path, flags | O_CLOEXEC)); }
long vmm_close(int fd) { return neg_errno(close(fd)); }
long vmm_ioctl_ptr(int fd, unsigned long request, void *arg) { return neg_errno(ioctl(fd, request, arg)); }
long vmm_ioctl_val(int fd, unsigned long request, unsigned long arg) { return neg_errno(ioctl(fd, request, arg)); }

void *vmm_mmap(void *addr, size_t length, int prot, int flags, int fd, int64_t offset, long *err)
{
    void *p = mmap(addr, length, prot, flags, fd, offset);
    *err = (p == MAP_FAILED) ? -errno : 0;
    return p == MAP_FAILED ? NULL : p;
}
long vmm_munmap(void *addr, size_t length) { return neg_errno(munmap(addr, length)); }
long vmm_madvise(void *addr, size_t length, int advice) { return neg_errno(madvise(addr, length, advice)); }
long vmm_memfd_create(const char *name, unsigned int flags) { return neg_errno(memfd_create(name, flags)); }
long vmm_ftruncate(int fd, int64_t length) { return neg_errno(ftruncate(fd, length)); }

static int kick_signo;
static void kick_handler(int signo) { (void)signo; }

long vmm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler; /* no SA_RESTART: KVM_RUN must come back with -EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(signo, &sa, NULL) < 0)
        return -errno;
    kick_signo = signo;
    return 0;
}
int vmm_kick_signal(void) { return kick_signo; }

/* True when [p, p+len) is all zero: lets snapshots leave holes for untouched guest memory at memory speed. */
int vmm_is_zero(const void *p, size_t len)
{
    const unsigned char *b = p;
    size_t i = 0;
    for (; i + 8 <= len; i += 8) {
        uint64_t word;
        memcpy(&word, b + i, 8);
        if (word)
            return 0;
    }
    for (; i < len; i++)
        if (b[i])
            return 0;
    return 1;
}

/* True when [p, p+len) may hold non-zero data. For anonymous memory, pages that were never touched are not
 * resident (mincore) and read as zero, so they are skipped without faulting them in. */
int vmm_range_has_data(void *p, size_t len, int anonymous)
{
    const size_t page = 4096;
    if (anonymous) {
        unsigned char vec[256]; /* one byte per page: 1 MiB per call */
        for (size_t off = 0; off < len; off += sizeof(vec) * page) {
            size_t span = len - off < sizeof(vec) * page ? len - off : sizeof(vec) * page;
            if (mincore((char *)p + off, span, vec) < 0)
                return vmm_is_zero((char *)p + off, span) ? 0 : 1; /* be safe: look at the bytes */
            for (size_t i = 0; i < (span + page - 1) / page; i++)
                if ((vec[i] & 1) && !vmm_is_zero((char *)p + off + i * page, page))
                    return 1;
        }
        return 0;
    }
    return !vmm_is_zero(p, len);
}

long vmm_mprotect(void *addr, size_t length, int prot) { return neg_errno(mprotect(addr, length, prot)); }

/* Copies in and out of this process's own memory through process_vm_readv/writev: a page that is missing is
 * faulted in by the kernel (a userfaultfd-backed page waits for its page server like any fault), and a page
 * that cannot be had gives -EFAULT instead of killing the process with SIGSEGV. */
#include <sys/uio.h>
long vmm_self_read(void *dst, const void *src, size_t len)
{
    struct iovec local = { dst, len }, remote = { (void *)src, len };
    ssize_t n = process_vm_readv(getpid(), &local, 1, &remote, 1, 0);
    return n < 0 ? -errno : (n == (ssize_t)len ? 0 : -EFAULT);
}
long vmm_self_write(void *dst, const void *src, size_t len)
{
    struct iovec local = { (void *)src, len }, remote = { dst, len };
    ssize_t n = process_vm_writev(getpid(), &local, 1, &remote, 1, 0);
    return n < 0 ? -errno : (n == (ssize_t)len ? 0 : -EFAULT);
}

/* Collect the dirty entries of one vCPU's dirty ring from *fetch_index on, marking each for reset (the caller
 * then issues KVM_RESET_DIRTY_RINGS). Writes (slot << 48 | page offset) per entry; returns how many. */
long vmm_harvest_dirty_ring(struct kvm_dirty_gfn *ring, uint32_t entries, uint32_t *fetch_index,
                            uint64_t *slots_and_offsets, long max_out)
{
    long n = 0;
    while (n < max_out) {
        struct kvm_dirty_gfn *gfn = &ring[*fetch_index & (entries - 1)];
        if (!(__atomic_load_n(&gfn->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
            break;
        slots_and_offsets[n++] = ((uint64_t)gfn->slot << 48) | gfn->offset;
        __atomic_store_n(&gfn->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
        (*fetch_index)++;
    }
    return n;
}

/* The page numbers of the set bits of a KVM dirty bitmap (bit i = page first_page + i). */
long vmm_bitmap_to_pages(const uint64_t *bitmap, size_t words, uint64_t first_page, uint64_t *pages, long max_out)
{
    long n = 0;
    for (size_t w = 0; w < words; w++) {
        uint64_t word = bitmap[w];
        while (word && n < max_out) {
            pages[n++] = first_page + w * 64 + (uint64_t)__builtin_ctzll(word);
            word &= word - 1;
        }
    }
    return n;
}

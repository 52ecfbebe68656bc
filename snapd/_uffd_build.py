"""cffi API-mode builder for snapd._uffd_native: userfaultfd ioctls and the C page-server loop.

Constants and struct layouts come from <linux/userfaultfd.h> at compile time (`...` in the cdef),
never from numbers copied here. The C code lives in snapd/csrc/. Works from setup.py's
cffi_modules and when run directly (`python snapd/_uffd_build.py` compiles in place).
"""
import os

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join("snapd", "csrc")  # relative to ROOT: setuptools wants relative sources

CDEF = """
#define UFFD_API ...
#define UFFDIO_API ...
#define UFFDIO_REGISTER ...
#define UFFDIO_UNREGISTER ...
#define UFFDIO_WAKE ...
#define UFFDIO_COPY ...
#define UFFDIO_ZEROPAGE ...
#define UFFDIO_CONTINUE ...
#define UFFDIO_REGISTER_MODE_MISSING ...
#define UFFDIO_REGISTER_MODE_WP ...
#define UFFDIO_REGISTER_MODE_MINOR ...
#define UFFDIO_COPY_MODE_DONTWAKE ...
#define UFFDIO_ZEROPAGE_MODE_DONTWAKE ...
#define UFFDIO_CONTINUE_MODE_DONTWAKE ...
#define UFFD_EVENT_PAGEFAULT ...
#define UFFD_EVENT_FORK ...
#define UFFD_EVENT_REMAP ...
#define UFFD_EVENT_REMOVE ...
#define UFFD_EVENT_UNMAP ...
#define UFFD_PAGEFAULT_FLAG_WRITE ...
#define UFFD_PAGEFAULT_FLAG_MINOR ...
#define UFFD_FEATURE_EVENT_FORK ...
#define UFFD_FEATURE_EVENT_REMAP ...
#define UFFD_FEATURE_EVENT_REMOVE ...
#define UFFD_FEATURE_EVENT_UNMAP ...
#define UFFD_FEATURE_MISSING_SHMEM ...
#define UFFD_FEATURE_MINOR_SHMEM ...
#define UFFD_FEATURE_THREAD_ID ...
#define UFFD_USER_MODE_ONLY ...
#define USERFAULTFD_IOC_NEW ...
#define O_CLOEXEC ...
#define O_NONBLOCK ...

struct uffdio_api { uint64_t api; uint64_t features; uint64_t ioctls; };
struct uffdio_range { uint64_t start; uint64_t len; };
struct uffdio_register { struct uffdio_range range; uint64_t mode; uint64_t ioctls; };
struct uffdio_copy { uint64_t dst; uint64_t src; uint64_t len; uint64_t mode; int64_t copy; };
struct uffdio_zeropage { struct uffdio_range range; uint64_t mode; int64_t zeropage; };
struct uffdio_continue { struct uffdio_range range; uint64_t mode; int64_t mapped; };
struct uffd_msg { uint8_t event; ...; };

int snapd_uffd_create(int flags);
int snapd_ioctl(int fd, unsigned long request, void *arg);
uint64_t snapd_touch(uint64_t addr, uint64_t len, uint64_t stride, int write, uint64_t *ns_out);
uint64_t snapd_now_ns(void);
int snapd_populate_read(const uint64_t *addrs, const uint64_t *lens, uint32_t n);

/* chunk_source.h */
#define SNAPD_CODEC_ZERO ...
#define SNAPD_CODEC_RAW ...
#define SNAPD_CODEC_LZ4 ...
#define SNAPD_CODEC_ZSTD ...
struct snapd_chunk { uint32_t pack; uint32_t codec; uint64_t offset; uint64_t stored_len; uint64_t checksum; };
struct snapd_image { uint64_t chunk_size; uint64_t mem_size; uint32_t nchunks; int memfd; ...; };
struct snapd_image *snapd_image_new(const char *name, uint64_t chunk_size, uint64_t mem_size, uint32_t nchunks);
int snapd_image_add_pack(struct snapd_image *img, const char *path);
int snapd_image_set_chunks(struct snapd_image *img, const struct snapd_chunk *chunks, uint32_t n);
#define SNAPD_HUGE_PAGE ...
int snapd_image_enable_shared(struct snapd_image *img, const char *huge_dir);
void snapd_image_free(struct snapd_image *img);
struct snapd_prefill_stats {
    int32_t running; int32_t cancelled; uint32_t total; uint32_t done;
    uint64_t filled; uint64_t skipped; uint64_t busy; uint64_t fault_waits; uint64_t zero_chunks; uint64_t bytes; uint64_t errors;
    uint64_t ns; uint64_t t0;
};
int snapd_image_prefill(struct snapd_image *img, const uint32_t *chunks, uint32_t n);
void snapd_image_prefill_cancel(struct snapd_image *img);
int snapd_image_prefill_stats(struct snapd_image *img, struct snapd_prefill_stats *out, char *err, size_t errlen);
int64_t snapd_image_fill_log(struct snapd_image *img, uint32_t *out, uint32_t cap);
int64_t snapd_image_present_chunks(struct snapd_image *img);

/* pageserver.h */
#define SNAPD_MAX_VMS ...
#define SNAPD_HIST_BUCKETS ...
#define SNAPD_ATTACH_EAGER ...
#define SNAPD_ATTACH_SHARED ...
#define SNAPD_ATTACH_CONTINUE ...
#define SNAPD_ATTACH_RECORD ...
#define SNAPD_VM_FREE ...
#define SNAPD_VM_ACTIVE ...
#define SNAPD_VM_FAILED ...
#define SNAPD_VM_CLOSED ...
struct snapd_region_spec { uint64_t addr; uint64_t size; uint64_t offset; };
struct snapd_vm_stats {
    int32_t state; int32_t parent; int32_t eager_pending; int32_t nregions;
    uint64_t faults; uint64_t bytes_installed; uint64_t chunks_installed; uint64_t zero_chunks;
    uint64_t shared_fills; uint64_t shared_wakes; uint64_t service_ns; uint64_t max_service_ns;
    uint64_t eexist; uint64_t eagain; uint64_t removes; uint64_t remaps; uint64_t unmaps; uint64_t forks;
    uint64_t errors; uint64_t eager_bytes; uint64_t eager_ns;
    uint64_t prefetch_pending; uint64_t prefetch_chunks; uint64_t prefetch_bytes; uint64_t prefetch_ns;
    uint64_t prefetch_faults; uint64_t recorded;
    uint64_t stage_chunks; uint64_t stage_faults; uint64_t stage_fallbacks; uint64_t stage_ioctls;
};
struct snapd_stage;
struct snapd_stage_stats {
    int32_t running; int32_t cancelled; uint32_t total; uint32_t done;
    uint64_t staged; uint64_t zero_chunks; uint64_t bytes; uint64_t capacity; uint64_t over_limit; uint64_t errors;
    uint64_t ns; uint64_t t0;
};
struct snapd_stage *snapd_stage_new(struct snapd_image *img, const uint32_t *chunks, uint32_t n, uint64_t limit,
                                    int *err);
int snapd_stage_run(struct snapd_stage *st);
void snapd_stage_cancel(struct snapd_stage *st);
int snapd_stage_stats(struct snapd_stage *st, struct snapd_stage_stats *out, char *err, size_t errlen);
void snapd_stage_put(struct snapd_stage *st);
int snapd_server_attach_staged(struct snapd_server *srv, struct snapd_image *img, int uffd, int sock,
                               const struct snapd_region_spec *regions, int nregions, int flags,
                               const uint32_t *prefetch, uint32_t nprefetch, struct snapd_stage *stage);
struct snapd_server;
struct snapd_server *snapd_server_new(void);
int snapd_server_run(struct snapd_server *srv);
void snapd_server_stop(struct snapd_server *srv);
void snapd_server_free(struct snapd_server *srv);
int snapd_server_record_start(struct snapd_server *srv, int id);
int snapd_server_record_stop(struct snapd_server *srv, int id);
int64_t snapd_server_record_take(struct snapd_server *srv, int id, uint32_t *out, uint32_t cap);
int snapd_server_vm_stats(struct snapd_server *srv, int id, struct snapd_vm_stats *out, uint32_t *hist);
int snapd_server_live_vms(struct snapd_server *srv);
"""

# The enum codec/state names are enum constants in C; cffi reads them as integer constants.
SOURCES = [
    "uffd_ops.c", "chunk_source.c",
    "pageserver.c", "vm_slots.c", "vm_regions.c", "chunk_install.c", "faults.c", "uffd_events.c",
    "workingset.c", "prefetch.c", "stage.c", "prefill.c",
]

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source(
    "snapd._uffd_native",
    """
    #include <fcntl.h>
    #include <sys/ioctl.h>
    #include <linux/userfaultfd.h>
    #include "uffd_ops.h"
    #include "chunk_source.h"
    #include "pageserver.h"
    """,
    sources=[os.path.join(CSRC, name) for name in SOURCES],
    include_dirs=[CSRC],
    libraries=["lz4", "zstd", "xxhash", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-std=gnu11"],
)

if __name__ == "__main__":
    # Paths above are relative to the repo root; cffi builds in tmpdir, so build there.
    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=ROOT, verbose=False)

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <lz4.h>
#include <xxhash.h>
#include <zstd.h>

#include "chunk_source.h"

struct snapd_image *snapd_image_new(const char *name, uint64_t chunk_size, uint64_t mem_size, uint32_t nchunks)
{
	if (chunk_size == 0 || chunk_size % 4096 || (mem_size + chunk_size - 1) / chunk_size != nchunks)
		return NULL;
	struct snapd_image *img = calloc(1, sizeof(*img));
	if (!img)
		return NULL;
	snprintf(img->name, sizeof(img->name), "%s", name);
	img->chunk_size = chunk_size;
	img->mem_size = mem_size;
	img->nchunks = nchunks;
	img->memfd = -1;
	img->chunks = calloc(nchunks ? nchunks : 1, sizeof(*img->chunks));
	if (!img->chunks) {
		free(img);
		return NULL;
	}
	return img;
}

int snapd_image_add_pack(struct snapd_image *img, const char *path)
{
	int n = img->npacks + 1;
	int *fds = realloc(img->pack_fd, n * sizeof(int));
	if (fds)
		img->pack_fd = fds;
	int *errs = realloc(img->pack_errno, n * sizeof(int));
	if (errs)
		img->pack_errno = errs;
	char **paths = realloc(img->pack_path, n * sizeof(char *));
	if (paths)
		img->pack_path = paths;
	if (!fds || !errs || !paths)
		return -ENOMEM;
	/* A pack that cannot be opened is not fatal here: only VMs that fault on
	 * one of its chunks fail, with the reason recorded now. */
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	img->pack_fd[img->npacks] = fd;
	img->pack_errno[img->npacks] = fd < 0 ? errno : 0;
	img->pack_path[img->npacks] = strdup(path);
	return img->npacks++;
}

int snapd_image_set_chunks(struct snapd_image *img, const struct snapd_chunk *chunks, uint32_t n)
{
	if (n != img->nchunks)
		return -EINVAL;
	for (uint32_t i = 0; i < n; i++)
		if (chunks[i].codec > SNAPD_CODEC_ZSTD ||
		    (chunks[i].codec != SNAPD_CODEC_ZERO && chunks[i].pack >= (uint32_t)img->npacks))
			return -EINVAL;
	memcpy(img->chunks, chunks, n * sizeof(*chunks));
	return 0;
}

/* huge_dir (or NULL): a directory on a tmpfs mounted huge=always. The image's
 * shared file is made there (unnamed, O_TMPFILE) and gets 2 MiB pages: a clone
 * then maps 2 MiB per host fault and KVM 2 MiB per guest fault. Only for images
 * made of whole 2 MiB pages: shmem zero-fills the rest of a huge page that a
 * partial write lands in and marks all of it present, so with smaller chunks a
 * neighbour chunk would read as zeros without ever faulting. */
int snapd_image_enable_shared(struct snapd_image *img, const char *huge_dir)
{
	if (img->memfd >= 0)
		return img->memfd;
	int fd;
	if (huge_dir) {
		if (img->chunk_size % SNAPD_HUGE_PAGE || img->mem_size % SNAPD_HUGE_PAGE)
			return -EINVAL;
		fd = open(huge_dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
	} else {
		fd = memfd_create(img->name, MFD_CLOEXEC);
	}
	if (fd < 0)
		return -errno;
	if (ftruncate(fd, (off_t)img->mem_size) < 0) {
		int e = errno;
		close(fd);
		return -e;
	}
	img->present = calloc(img->nchunks ? img->nchunks : 1, 1);
	img->fill_log = calloc(img->nchunks ? img->nchunks : 1, sizeof(uint32_t));
	if (!img->present || !img->fill_log) {
		free(img->present);
		free(img->fill_log);
		img->present = NULL;
		img->fill_log = NULL;
		close(fd);
		return -ENOMEM;
	}
	pthread_mutex_init(&img->fill_lock, NULL);
	pthread_cond_init(&img->fill_cond, NULL);
	img->memfd = fd;
	return fd;
}

void snapd_image_free(struct snapd_image *img)
{
	if (!img)
		return;
	for (int i = 0; i < img->npacks; i++) {
		if (img->pack_fd[i] >= 0)
			close(img->pack_fd[i]);
		free(img->pack_path[i]);
	}
	if (img->memfd >= 0) {
		close(img->memfd);
		pthread_mutex_destroy(&img->fill_lock);
		pthread_cond_destroy(&img->fill_cond);
	}
	free(img->fill_log);
	free(img->pack_fd);
	free(img->pack_errno);
	free(img->pack_path);
	free(img->present);
	free(img->chunks);
	free(img);
}

uint64_t snapd_chunk_len(const struct snapd_image *img, uint32_t c)
{
	uint64_t start = (uint64_t)c * img->chunk_size;
	uint64_t left = img->mem_size - start;
	return left < img->chunk_size ? left : img->chunk_size;
}

static int grow(uint8_t **buf, size_t *cap, size_t need)
{
	if (*cap >= need)
		return 0;
	void *p = NULL;
	/* Page-aligned so UFFDIO_COPY reads whole source pages. */
	if (posix_memalign(&p, 4096, need))
		return -1;
	free(*buf);
	*buf = p;
	*cap = need;
	return 0;
}

void snapd_scratch_free(struct snapd_scratch *s)
{
	free(s->in);
	free(s->out);
	memset(s, 0, sizeof(*s));
}

int snapd_chunk_load(struct snapd_image *img, uint32_t c, struct snapd_scratch *s,
		     const uint8_t **data, char *err, size_t errlen)
{
	const struct snapd_chunk *ch = &img->chunks[c];
	uint64_t len = snapd_chunk_len(img, c);
	if (ch->codec == SNAPD_CODEC_ZERO)
		return 1;
	/* Bound what a corrupt table can make us allocate. */
	if (ch->stored_len == 0 || ch->stored_len > 2 * img->chunk_size + 65536) {
		snprintf(err, errlen, "implausible stored length %llu", (unsigned long long)ch->stored_len);
		return -1;
	}
	int fd = img->pack_fd[ch->pack];
	if (fd < 0) {
		snprintf(err, errlen, "pack %s unavailable: %s", img->pack_path[ch->pack],
			 strerror(img->pack_errno[ch->pack]));
		return -1;
	}
	if (grow(&s->in, &s->in_cap, ch->stored_len) || grow(&s->out, &s->out_cap, img->chunk_size)) {
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	uint64_t got = 0;
	while (got < ch->stored_len) {
		ssize_t r = pread(fd, s->in + got, ch->stored_len - got, (off_t)(ch->offset + got));
		if (r < 0 && errno == EINTR)
			continue;
		if (r < 0) {
			snprintf(err, errlen, "read of pack %s failed: %s", img->pack_path[ch->pack], strerror(errno));
			return -1;
		}
		if (r == 0) {
			snprintf(err, errlen, "pack %s ends at %llu, before the chunk's end %llu",
				 img->pack_path[ch->pack], (unsigned long long)(ch->offset + got),
				 (unsigned long long)(ch->offset + ch->stored_len));
			return -1;
		}
		got += (uint64_t)r;
	}
	uint64_t sum = XXH3_64bits(s->in, ch->stored_len);
	if (sum != ch->checksum) {
		snprintf(err, errlen, "checksum mismatch (xxh3 %016llx, expected %016llx)",
			 (unsigned long long)sum, (unsigned long long)ch->checksum);
		return -1;
	}
	switch (ch->codec) {
	case SNAPD_CODEC_RAW:
		if (ch->stored_len != len) {
			snprintf(err, errlen, "raw chunk holds %llu bytes, expected %llu",
				 (unsigned long long)ch->stored_len, (unsigned long long)len);
			return -1;
		}
		*data = s->in;
		return 0;
	case SNAPD_CODEC_LZ4: {
		int n = LZ4_decompress_safe((const char *)s->in, (char *)s->out, (int)ch->stored_len, (int)len);
		if (n < 0 || (uint64_t)n != len) {
			snprintf(err, errlen, "lz4 block decoded to %d bytes, expected %llu", n, (unsigned long long)len);
			return -1;
		}
		*data = s->out;
		return 0;
	}
	case SNAPD_CODEC_ZSTD: {
		size_t n = ZSTD_decompress(s->out, len, s->in, ch->stored_len);
		if (ZSTD_isError(n) || n != len) {
			snprintf(err, errlen, "zstd frame: %s", ZSTD_isError(n) ? ZSTD_getErrorName(n) : "wrong decoded size");
			return -1;
		}
		*data = s->out;
		return 0;
	}
	}
	snprintf(err, errlen, "unknown codec %u", ch->codec);
	return -1;
}

/* ---------- shared mode: one memfd filled once for every VM ---------- */

static int write_chunk(struct snapd_image *img, uint32_t c, int kind, const uint8_t *data)
{
	uint64_t fs = (uint64_t)c * img->chunk_size, clen = snapd_chunk_len(img, c);
	if (kind == 1) /* a hole in shmem still faults; fallocate puts zero pages in the cache */
		return fallocate(img->memfd, 0, (off_t)fs, (off_t)clen) < 0 ? -errno : 0;
	/* pwrite, never a store through a mapping: shmem keeps each page locked
	 * until its bytes are all copied, so a VM faulting on it meanwhile waits
	 * and then maps complete data (a page is never visible half written). */
	for (uint64_t w = 0; w < clen;) {
		ssize_t n = pwrite(img->memfd, data + w, clen - w, (off_t)(fs + w));
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return n < 0 ? -errno : -EIO;
		w += (uint64_t)n;
	}
	return 0;
}

static void fill_settle(struct snapd_image *img, uint32_t c, uint8_t state, int by_prefill)
{
	pthread_mutex_lock(&img->fill_lock);
	__atomic_store_n(&img->present[c], state, __ATOMIC_RELEASE);
	if (state == SNAPD_SHARED_PRESENT && img->nfill < img->nchunks)
		img->fill_log[img->nfill++] = c | (by_prefill ? 0x80000000u : 0);
	pthread_cond_broadcast(&img->fill_cond);
	pthread_mutex_unlock(&img->fill_lock);
}

int snapd_shared_fill(struct snapd_image *img, uint32_t c, struct snapd_scratch *s, int block, int by_prefill,
		      int *zero, char *err, size_t errlen)
{
	*zero = 0;
	for (;;) {
		uint8_t st = __atomic_load_n(&img->present[c], __ATOMIC_ACQUIRE);
		if (st == SNAPD_SHARED_PRESENT)
			return SNAPD_FILL_PRESENT;
		if (st == SNAPD_SHARED_FILLING) {
			if (!block)
				return SNAPD_FILL_BUSY;
			pthread_mutex_lock(&img->fill_lock);
			if (!by_prefill)
				img->pf.fault_waits++;
			while (__atomic_load_n(&img->present[c], __ATOMIC_ACQUIRE) == SNAPD_SHARED_FILLING)
				pthread_cond_wait(&img->fill_cond, &img->fill_lock);
			pthread_mutex_unlock(&img->fill_lock);
			continue; /* PRESENT, or MISSING again if the writer failed: then try ourselves */
		}
		uint8_t expect = SNAPD_SHARED_MISSING;
		if (__atomic_compare_exchange_n(&img->present[c], &expect, SNAPD_SHARED_FILLING, 0, __ATOMIC_ACQ_REL,
						__ATOMIC_ACQUIRE))
			break;
	}
	const uint8_t *data = NULL;
	int kind = snapd_chunk_load(img, c, s, &data, err, errlen);
	int rc = kind < 0 ? -1 : write_chunk(img, c, kind, data);
	if (rc < 0) {
		if (kind >= 0)
			snprintf(err, errlen, "filling the shared memfd failed: %s", strerror(-rc));
		fill_settle(img, c, SNAPD_SHARED_MISSING, by_prefill);
		return -1;
	}
	fill_settle(img, c, SNAPD_SHARED_PRESENT, by_prefill);
	*zero = kind == 1;
	return SNAPD_FILL_DONE;
}

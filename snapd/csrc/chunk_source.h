/* A base image as the page server sees it: a chunk table over pack files,
 * and the code that turns one chunk into verified, decompressed bytes. */
#ifndef SNAPD_CHUNK_SOURCE_H
#define SNAPD_CHUNK_SOURCE_H
#include <stddef.h>
#include <stdint.h>

enum snapd_codec { SNAPD_CODEC_ZERO = 0, SNAPD_CODEC_RAW = 1, SNAPD_CODEC_LZ4 = 2, SNAPD_CODEC_ZSTD = 3 };

struct snapd_chunk {
	uint32_t pack;       /* index returned by snapd_image_add_pack */
	uint32_t codec;      /* enum snapd_codec */
	uint64_t offset;     /* byte offset of the stored bytes in the pack */
	uint64_t stored_len;
	uint64_t checksum;   /* XXH3_64bits of the stored bytes */
};

struct snapd_image {
	char name[256];
	uint64_t chunk_size, mem_size;
	uint32_t nchunks;
	struct snapd_chunk *chunks;
	int npacks;
	int *pack_fd;        /* -1 when the pack could not be opened */
	int *pack_errno;
	char **pack_path;
	/* Shared copy-on-write mode: the image's memory lives in one memfd that
	 * every VM maps MAP_PRIVATE; present[c] says chunk c was written to it. */
	int memfd;
	uint8_t *present;
};

/* Per-thread buffers for reading and decompressing one chunk. */
struct snapd_scratch {
	uint8_t *in, *out;
	size_t in_cap, out_cap;
};

struct snapd_image *snapd_image_new(const char *name, uint64_t chunk_size, uint64_t mem_size, uint32_t nchunks);
int snapd_image_add_pack(struct snapd_image *img, const char *path);
int snapd_image_set_chunks(struct snapd_image *img, const struct snapd_chunk *chunks, uint32_t n);
int snapd_image_enable_shared(struct snapd_image *img);
void snapd_image_free(struct snapd_image *img);

/* Bytes of guest memory chunk c covers (the last chunk may be short). */
uint64_t snapd_chunk_len(const struct snapd_image *img, uint32_t c);

/* Load chunk c. Returns 1 for an all-zero chunk (nothing loaded), 0 with
 * *data pointing at snapd_chunk_len() verified bytes, or -1 with a reason
 * in err. Never returns data whose checksum did not match. */
int snapd_chunk_load(struct snapd_image *img, uint32_t c, struct snapd_scratch *s,
		     const uint8_t **data, char *err, size_t errlen);
void snapd_scratch_free(struct snapd_scratch *s);
#endif

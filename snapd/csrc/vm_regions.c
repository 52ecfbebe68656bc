/* A VM's region table: the registered ranges of its memory, each with the
 * install state of the image chunks it overlaps, and the lookups and splits
 * that faults and REMAP/UNMAP events need. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "pageserver_int.h"

int region_init(struct region *r, const struct snapd_image *img, uint64_t addr, uint64_t size,
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

struct region *vm_find(struct vm *vm, uint64_t addr)
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
int vm_split_at(struct vm *vm, uint64_t at)
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

void vm_regions_changed(struct vm *vm)
{
	vm->st.nregions = vm->nregions;
	/* Eager install walks regions by index: restart it; installed chunks are skipped. */
	vm->eager_region = 0;
	vm->eager_chunk = 0;
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

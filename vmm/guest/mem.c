/* The functions gcc may emit calls to even with -ffreestanding (struct copies, large zeroing).
 * rep stosb/movsb are ordinary CPL 3 instructions and fast on current CPUs (ERMSB). */
#include "guest.h"

void *memset(void *dest, int byte, size_t count)
{
    void *d = dest;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(count) : "a"(byte) : "memory");
    return dest;
}

void *memcpy(void *restrict dest, const void *restrict src, size_t count)
{
    void *d = dest;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(count) : : "memory");
    return dest;
}

void *memmove(void *dest, const void *src, size_t count)
{
    uint8_t *d = dest;
    const uint8_t *s = src;
    if (d <= s || d >= s + count)
        return memcpy(dest, src, count);
    while (count--)             /* overlapping, dest above src: copy backwards */
        d[count] = s[count];
    return dest;
}

int memcmp(const void *a, const void *b, size_t count)
{
    const uint8_t *x = a, *y = b;
    for (size_t i = 0; i < count; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

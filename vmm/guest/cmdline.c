/* Command line: space-separated key=value words. Unknown keys are ignored; a bad number is an error. */
#include "guest.h"

#define CMDLINE_MAX 4096

/* A private copy, cut into NUL-terminated words, so config->workload can point into it. */
static char cmdline_words[CMDLINE_MAX];

static int streq(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

/* Decimal, or hexadecimal with a 0x prefix. Returns 0 on a malformed or overflowing number. */
static int parse_u64(const char *text, uint64_t *value)
{
    uint64_t base = 10, result = 0;
    if (text[0] == '0' && (text[1] == 'x' || text[1] == 'X')) {
        base = 16;
        text += 2;
    }
    if (!*text)
        return 0;
    for (; *text; text++) {
        uint64_t digit;
        char c = *text;
        if (c >= '0' && c <= '9')
            digit = (uint64_t)(c - '0');
        else if (base == 16 && c >= 'a' && c <= 'f')
            digit = (uint64_t)(c - 'a' + 10);
        else if (base == 16 && c >= 'A' && c <= 'F')
            digit = (uint64_t)(c - 'A' + 10);
        else
            return 0;
        if (result > (UINT64_MAX - digit) / base)
            return 0;
        result = result * base + digit;
    }
    *value = result;
    return 1;
}

static void set_number(const char *key, const char *text, uint64_t *value)
{
    if (!parse_u64(text, value))
        guest_error(key, text);
}

void parse_cmdline(const char *cmdline, uint64_t loader_mem_size, struct guest_config *config)
{
    uint64_t mem_mib = 0;

    config->workload = "hello";
    config->seed = 1;
    config->kv_mib = 16;
    config->scan_mib = 16;
    config->progress_shift = 22;
    config->invoke = 3;

    size_t length = 0;
    if (cmdline)
        while (length < CMDLINE_MAX - 1 && cmdline[length])
            length++;
    memcpy(cmdline_words, cmdline, length);
    cmdline_words[length] = '\0';

    char *p = cmdline_words;
    while (*p) {
        while (*p == ' ' || *p == '\t' || *p == '\n')
            p++;
        char *key = p, *value = 0;
        while (*p && *p != ' ' && *p != '\t' && *p != '\n') {
            if (*p == '=' && !value) {
                *p = '\0';
                value = p + 1;
            }
            p++;
        }
        if (*p)
            *p++ = '\0';
        if (!value)
            continue;
        if (streq(key, "workload"))
            config->workload = value;
        else if (streq(key, "seed"))
            set_number("bad seed", value, &config->seed);
        else if (streq(key, "mem_mib"))
            set_number("bad mem_mib", value, &mem_mib);
        else if (streq(key, "kv_mib"))
            set_number("bad kv_mib", value, &config->kv_mib);
        else if (streq(key, "scan_mib"))
            set_number("bad scan_mib", value, &config->scan_mib);
        else if (streq(key, "progress_shift"))
            set_number("bad progress_shift", value, &config->progress_shift);
        else if (streq(key, "invoke"))
            set_number("bad invoke", value, &config->invoke);
    }

    if (mem_mib > (UINT64_MAX >> 20))
        guest_error("bad mem_mib (too large)", 0);
    /* The loader's figure wins: mem_mib is for loaders that pass none. */
    config->mem_size = loader_mem_size ? loader_mem_size : mem_mib << 20;
    if (config->progress_shift > 63)
        guest_error("bad progress_shift (at most 63)", 0);
}

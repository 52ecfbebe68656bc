/* A hostile guest for the tests (issue #12, "Hostile guests"), linked with the built-in guest's start, UART,
 * command-line, random-generator and function-port code (tests/guests/Makefile). It boots as the built-in guest
 * does, registers a valid mailbox, prints "vmguest: hostile ready" and waits in FN_NEXT: the state a snapshot is
 * taken of. Each invocation's request then names what it does (its first word, then numbers):
 *
 *   echo ...            reply "ECHO" + the request: the guest is alive and its mailbox works
 *   flood               write to COM1 forever, one outb per byte (never answers)
 *   flood-rep           the same with `rep outsb` of 4 KiB per exit
 *   ports FIRST COUNT   for every port in [FIRST, FIRST+COUNT) and every width (1, 2, 4) that stays below
 *                       0x10000: `in`, then `out` of a random value; then string I/O (rep ins/outs) on a few
 *                       ports; then reply "PORT" u32 accesses u64 xor of what was read. Skipped: the i8042 reset
 *                       value (0xfe to 0x64 stops the VM, which would end the sweep) and the three 4-byte accesses
 *                       the function port's protocol is made of (FN_NEXT read, FN_MAILBOX and FN_DONE writes:
 *                       the mbox and done modes below drive those with out-of-range values on purpose)
 *   silent              take the invocation and never answer: a loop with no exits
 *   spin                the same (a busy loop at CPL 3)
 *   halt                `hlt` at CPL 3: #GP with no IDT, a triple fault
 *   triple              `ud2`: a triple fault
 *   abandon             ask FN_NEXT again without answering (the invocation is dropped)
 *   done LEN            FN_DONE with LEN (after writing 32 reply bytes)
 *   done-twice          reply (32 bytes), FN_DONE again, and a third time: two FN_DONE with no FN_NEXT before
 *   caps                overwrite req_cap and resp_cap in the mailbox with 0xffffffff, then reply 32 bytes: the
 *                       VMM must go on with the capacities it took at registration
 *   mbox PFN REQ RESP [MAGIC]
 *                       write a mailbox header (magic, version 1, REQ, RESP) at guest page PFN (if it is inside
 *                       guest memory) and register PFN through FN_MAILBOX; then FN_DONE(32), then register the
 *                       real mailbox again
 *   odd                 odd-sized and misaligned accesses of the function port (inb/inw FN_NEXT, inb/inw FN_ID,
 *                       inw 0xf41, inb FN_DONE, outb/outw FN_DONE and FN_MAILBOX, rep insl of FN_NEXT), then reply
 *                       "ODD!" + the 9 values read (u32 each), then rep outsl of two lengths to FN_DONE
 *
 * Boot argument `workload=nomailbox`: the mailbox registered at boot declares capacities out of range (refused),
 * so the snapshot holds no mailbox at all. */
#include "fnport.h"
#include "guest.h"
#include "io.h"

#define FN_ID       0x0f40
#define FN_MAILBOX  0x0f44
#define FN_NEXT     0x0f48
#define FN_DONE     0x0f4c
#define COM1        0x3f8
#define I8042_COMMAND 0x64
#define I8042_RESET   0xfe
#define MAILBOX_MAGIC 0x4d464d56u

static uint64_t mem_size;

static inline uint8_t inb(uint16_t port)
{
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

static inline uint16_t inw(uint16_t port)
{
    uint16_t value;
    __asm__ volatile("inw %1, %0" : "=a"(value) : "Nd"(port) : "memory");
    return value;
}

static inline void outw(uint16_t port, uint16_t value)
{
    __asm__ volatile("outw %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

/* -- the request: a first word and numbers after it */
static const uint8_t *req;
static uint32_t req_len, req_pos;

static int word_is(const char *word)
{
    uint32_t i = 0;
    while (word[i] && i < req_len && req[i] == (uint8_t)word[i])
        i++;
    if (word[i] || (i < req_len && req[i] != ' '))
        return 0;
    req_pos = i;
    return 1;
}

static uint64_t number(uint64_t fallback)
{
    while (req_pos < req_len && req[req_pos] == ' ')
        req_pos++;
    if (req_pos >= req_len)
        return fallback;
    uint64_t base = 10, value = 0;
    if (req_pos + 1 < req_len && req[req_pos] == '0' && (req[req_pos + 1] == 'x' || req[req_pos + 1] == 'X')) {
        base = 16;
        req_pos += 2;
    }
    for (; req_pos < req_len && req[req_pos] != ' '; req_pos++) {
        uint8_t c = req[req_pos];
        uint64_t digit = c >= '0' && c <= '9' ? (uint64_t)(c - '0')
                         : c >= 'a' && c <= 'f' ? (uint64_t)(c - 'a' + 10)
                         : c >= 'A' && c <= 'F' ? (uint64_t)(c - 'A' + 10) : 99;
        if (digit >= base)
            return fallback;
        value = value * base + digit;
    }
    return value;
}

static void reply(const void *bytes, uint32_t length)
{
    memcpy(fn_mailbox.reply, bytes, length);
    fnport_reply_done(length);
}

static void reply_32(const char tag[4])
{
    uint8_t out[32];
    memset(out, 0, sizeof(out));
    memcpy(out, tag, 4);
    reply(out, sizeof(out));
}

/* -- the behaviours */
__attribute__((noreturn)) static void flood(void)
{
    static const char line[] = "flood flood flood flood flood flood flood flood flood flood flood flood\n";
    for (;;)
        uart_write(line);
}

__attribute__((noreturn)) static void flood_rep(void)
{
    static char block[4096];
    for (size_t i = 0; i < sizeof(block); i++)
        block[i] = (char)('a' + i % 26);
    for (;;) {
        const char *p = block;
        size_t count = sizeof(block);
        __asm__ volatile("rep outsb" : "+S"(p), "+c"(count) : "d"((uint16_t)COM1) : "memory");
    }
}

__attribute__((noreturn)) static void spin(void)
{
    for (;;)
        __asm__ volatile("" ::: "memory");
}

static int protocol_access(uint32_t port, int width, int out)
{
    return width == 4 && ((!out && port == FN_NEXT) || (out && (port == FN_MAILBOX || port == FN_DONE)));
}

static void ports(uint64_t first, uint64_t count)
{
    uint64_t accesses = 0, folded = 0;
    uint64_t end = first + count > 0x10000 ? 0x10000 : first + count;
    for (uint64_t p = first; p < end; p++) {
        uint16_t port = (uint16_t)p;
        for (int width = 1; width <= 4; width *= 2) {
            if (p + (uint64_t)width > 0x10000)
                continue;   /* the TSS bitmap ends at 0xffff: an access past it is #GP, a triple fault */
            uint64_t value = rng_next();
            if (!protocol_access(port, width, 0)) {
                folded ^= (uint64_t)(width == 1 ? inb(port) : width == 2 ? inw(port) : inl(port)) << (accesses % 32);
                accesses++;
            }
            if (protocol_access(port, width, 1))
                continue;
            if (port == I8042_COMMAND && (uint8_t)value == I8042_RESET)
                value ^= 1;
            if (width == 1)
                outb(port, (uint8_t)value);
            else if (width == 2)
                outw(port, (uint16_t)value);
            else
                outl(port, (uint32_t)value);
            accesses++;
        }
    }
    /* String I/O: `rep ins` comes as one exit of many items (the VMM loops over them), `rep outs` as one exit
     * per item on these hosts. */
    static uint8_t block[256];
    static const uint16_t string_ports[] = { COM1, COM1 + 5, 0x80, 0xcf8, 0x61 };
    for (size_t i = 0; i < sizeof(string_ports) / sizeof(string_ports[0]); i++) {
        uint8_t *d = block;
        size_t n = sizeof(block);
        __asm__ volatile("rep insb" : "+D"(d), "+c"(n) : "d"(string_ports[i]) : "memory");
        const uint8_t *s = block;
        n = sizeof(block) / 4;
        __asm__ volatile("rep outsl" : "+S"(s), "+c"(n) : "d"(string_ports[i]) : "memory");
        accesses += 2;
    }
    fnport_register_mailbox();  /* nothing above touched it, but a sweep that did would leave it broken */
    uint8_t out[16];
    memcpy(out, "PORT", 4);
    store_le32(out + 4, (uint32_t)accesses);
    store_le64(out + 8, folded);
    reply(out, sizeof(out));
}

static void mbox(uint64_t pfn, uint64_t req_cap, uint64_t resp_cap, uint64_t magic)
{
    uint64_t gpa = pfn << 12;
    if (gpa >= 0x200000 && gpa + 16 <= mem_size) {   /* above the image (which ends below 2 MiB) */
        uint32_t *header = (uint32_t *)(uintptr_t)gpa;
        header[0] = (uint32_t)magic;
        header[1] = 1;
        header[2] = (uint32_t)req_cap;
        header[3] = (uint32_t)resp_cap;
    }
    outl(FN_MAILBOX, (uint32_t)pfn);
    reply_32("MBOX");
    fnport_register_mailbox();
}

static void odd(void)
{
    uint32_t got[9];
    got[0] = inb(FN_NEXT);
    got[1] = inw(FN_NEXT);
    got[2] = inb(FN_ID);
    got[3] = inw(FN_ID);
    got[4] = inw(FN_ID + 1);
    got[5] = inb(FN_DONE);
    outb(FN_DONE, 0x20);
    outw(FN_DONE, 0x20);
    outb(FN_MAILBOX, 0xff);
    outw(FN_MAILBOX + 2, 0xffff);
    uint32_t pair[2] = { 0, 0 };
    uint32_t *d = pair;
    size_t n = 2;
    __asm__ volatile("rep insl" : "+D"(d), "+c"(n) : "d"((uint16_t)FN_NEXT) : "memory");
    got[6] = pair[0];
    got[7] = pair[1];
    got[8] = inl(FN_ID);
    uint8_t out[4 + sizeof(got)];
    memcpy(out, "ODD!", 4);
    memcpy(out + 4, got, sizeof(got));
    reply(out, sizeof(out));
    /* After the reply, FN_DONE by string I/O: KVM hands `rep outs` over one item per exit here, so these are two
     * more FN_DONE writes with no invocation in flight (ignored). */
    static const uint32_t lengths[2] = { 0xffffffffu, 16 };
    const uint32_t *s = lengths;
    n = 2;
    __asm__ volatile("rep outsl" : "+S"(s), "+c"(n) : "d"((uint16_t)FN_DONE) : "memory");
}

static void serve(void)
{
    for (;;) {
        struct invocation inv;
        fnport_wait_invocation(&inv);
        rng_observe_generation(inv.generation, fn_mailbox.entropy);
        req = inv.request;
        req_len = inv.request_len;
        req_pos = 0;
        if (word_is("echo")) {
            uint8_t out[4 + 256];
            uint32_t n = req_len < 256 ? req_len : 256;
            memcpy(out, "ECHO", 4);
            memcpy(out + 4, req, n);
            reply(out, 4 + n);
        } else if (word_is("flood")) {
            flood();
        } else if (word_is("flood-rep")) {
            flood_rep();
        } else if (word_is("ports")) {
            uint64_t first = number(0);
            ports(first, number(0x10000));
        } else if (word_is("silent") || word_is("spin")) {
            spin();
        } else if (word_is("halt")) {
            __asm__ volatile("hlt");
            spin();
        } else if (word_is("triple")) {
            __asm__ volatile("ud2");
            spin();
        } else if (word_is("abandon")) {
            continue;
        } else if (word_is("done")) {
            uint64_t length = number(32);
            memcpy(fn_mailbox.reply, "DONE", 4);
            fn_mailbox.resp_len = (uint32_t)length;
            outl(FN_DONE, (uint32_t)length);
        } else if (word_is("done-twice")) {
            reply_32("TWO1");
            outl(FN_DONE, 32);
            outl(FN_DONE, 8);
        } else if (word_is("caps")) {
            fn_mailbox.req_cap = 0xffffffffu;
            fn_mailbox.resp_cap = 0xffffffffu;
            reply_32("CAPS");
            fn_mailbox.req_cap = FN_REQ_CAP;
            fn_mailbox.resp_cap = FN_RESP_CAP;
        } else if (word_is("mbox")) {
            uint64_t pfn = number(0), req_cap = number(FN_REQ_CAP), resp_cap = number(FN_RESP_CAP);
            mbox(pfn, req_cap, resp_cap, number(MAILBOX_MAGIC));
        } else if (word_is("odd")) {
            odd();
        } else {
            reply_32("WHAT");
        }
    }
}

void guest_main(const char *cmdline, uint64_t loader_mem_size)
{
    static struct guest_config config;
    parse_cmdline(cmdline, loader_mem_size, &config);
    mem_size = config.mem_size;
    rng_init(config.seed);
    if (!fnport_present())
        guest_error("no function port", 0);
    const char *w = config.workload;
    int nomailbox = w[0] == 'n' && w[1] == 'o' && w[2] == 'm';
    fnport_register_mailbox();
    if (nomailbox) {   /* declare capacities that cannot fit: the VMM refuses this mailbox */
        fn_mailbox.req_cap = 0x80000000u;
        fn_mailbox.resp_cap = 0x80000000u;
        outl(FN_MAILBOX, (uint32_t)((uintptr_t)&fn_mailbox >> 12));
    }
    uart_write("vmguest: hostile ready\n");
    serve();
    machine_reset();
}

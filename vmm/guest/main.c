/* The built-in function guest: parse the command line, build the workload's data, then answer invocations
 * through the function port, or, with no port (QEMU), run `invoke` requests of its own and print the replies. */
#include "fnport.h"
#include "guest.h"
#include "io.h"

#define HEAP_ALIGN    (2 * MIB)     /* heaps start on their own 2 MiB pages, apart from the image */

extern char _image_end[];           /* guest.ld */

static const struct workload *const workloads[] = {
    &hello_workload, &kv_workload, &scan_workload, &progress_workload,
};

static uint64_t heap_next;

void *heap_reserve(const struct guest_config *config, uint64_t bytes, const char *what)
{
    if (!heap_next)
        heap_next = ((uint64_t)(uintptr_t)_image_end + HEAP_ALIGN - 1) & ~(HEAP_ALIGN - 1);
    if (!config->mem_size)
        guest_error("guest memory size unknown (the loader passed none): add mem_mib=", 0);
    if (bytes > config->mem_size || heap_next > config->mem_size - bytes) {
        uart_write("vmguest: error: ");
        uart_write(what);
        uart_write(" needs ");
        uart_write_u64(bytes >> 20);
        uart_write(" MiB from ");
        uart_write_u64(heap_next >> 20);
        uart_write(" MiB but guest memory ends at ");
        uart_write_u64(config->mem_size >> 20);
        uart_write(" MiB\n");
        machine_reset();
    }
    void *block = (void *)(uintptr_t)heap_next;
    heap_next += bytes;
    return block;
}

static const struct workload *find_workload(const char *name)
{
    for (size_t i = 0; i < sizeof(workloads) / sizeof(workloads[0]); i++) {
        const char *a = workloads[i]->name, *b = name;
        while (*a && *a == *b)
            a++, b++;
        if (*a == *b)
            return workloads[i];
    }
    return 0;
}

static void serve_invocations(const struct workload *workload)
{
    for (;;) {
        struct invocation inv;
        fnport_wait_invocation(&inv);
        rng_observe_generation(inv.generation, fn_mailbox.entropy);
        fnport_reply_done(workload->invoke(&inv));
    }
}

/* No function port: invoke ourselves and print "vmguest: reply <seq> <reply in hex>" for each. */
static void run_self_driven(const struct workload *workload, const struct guest_config *config)
{
    for (uint64_t seq = 1; seq <= config->invoke; seq++) {
        struct invocation inv = {
            .seq = seq,
            .generation = 0,
            .request = fn_mailbox.request,
            .reply = fn_mailbox.reply,
        };
        inv.request_len = workload->self_request(config, seq, fn_mailbox.request);
        uint32_t reply_len = workload->invoke(&inv);
        uart_write("vmguest: reply ");
        uart_write_u64(seq);
        uart_write(" ");
        uart_write_hex_bytes(inv.reply, reply_len);
        uart_write("\n");
    }
    uart_write("vmguest: done\n");
}

void guest_main(const char *cmdline, uint64_t mem_size)
{
    static struct guest_config config;
    parse_cmdline(cmdline, mem_size, &config);
    const struct workload *workload = find_workload(config.workload);
    if (!workload)
        guest_error("unknown workload", config.workload);

    rng_init(config.seed);
    int port_present = workload->invoke && fnport_present();
    if (port_present)
        fnport_register_mailbox();
    if (workload->init)
        workload->init(&config);
    uart_write("vmguest: ");
    uart_write(workload->name);
    uart_write(" ready\n");

    if (workload->run)
        workload->run(&config);     /* never returns */
    else if (port_present)
        serve_invocations(workload);
    else
        run_self_driven(workload, &config);
    machine_reset();
}

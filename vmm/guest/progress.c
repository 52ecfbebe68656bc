/* progress: an endless computation with visible state, for pausing and snapshotting mid-run. From
 * x = mix64(seed), step t = 1, 2, ... does x = mix64(x + t); after every 2^progress_shift-th step it prints
 * "progress <t> <x as 16 hex digits>". No invocations. */
#include "guest.h"

static void progress_run(const struct guest_config *config)
{
    uint64_t line_mask = (1ull << config->progress_shift) - 1;
    uint64_t x = mix64(config->seed);
    for (uint64_t t = 1;; t++) {
        x = mix64(x + t);
        if ((t & line_mask) == 0) {
            uart_write("progress ");
            uart_write_u64(t);
            uart_write(" ");
            uart_write_hex64(x);
            uart_write("\n");
        }
    }
}

const struct workload progress_workload = {
    .name = "progress",
    .run = progress_run,
};

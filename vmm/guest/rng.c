/* The guest's random generator: splitmix64 seeded with `seed`. Clones resumed from one snapshot share its
 * state, so whenever the mailbox shows a new generation we fold that generation's entropy into the state,
 * one 64-bit word at a time: state = mix64(state ^ word). vmm/workloads.py (GuestRng) mirrors this. */
#include "guest.h"

static uint64_t rng_state;
static uint64_t rng_generation;     /* the generation whose entropy is in the state; 0 = none yet */

void rng_init(uint64_t seed)
{
    rng_state = seed;
    rng_generation = 0;
}

void rng_observe_generation(uint64_t generation, const uint8_t entropy[32])
{
    if (generation == rng_generation)
        return;
    for (int i = 0; i < 4; i++)
        rng_state = mix64(rng_state ^ load_le64(entropy + 8 * i));
    rng_generation = generation;
}

uint64_t rng_next(void)
{
    rng_state += 0x9e3779b97f4a7c15ull;
    return mix64(rng_state);
}

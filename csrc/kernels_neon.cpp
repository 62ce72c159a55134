// Arm NEON kernels without dotprod (Armv8-A baseline, e.g. Cortex-A72 / Raspberry Pi 4).
#if defined(__aarch64__)
#define BITLLM_NEON_TABLE kTableNEON
#include "kernels_neon_impl.h"
#endif

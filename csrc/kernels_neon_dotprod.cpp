// Arm NEON kernels with the Armv8.2-A dot-product extension (vdotq_s32; e.g. Cortex-A76 / Pi 5).
// Compiled with -march=armv8.2-a+dotprod; only called after the HWCAP_ASIMDDP probe.
#if defined(__aarch64__)
#define BITLLM_NEON_DOTPROD 1
#define BITLLM_NEON_TABLE kTableNEONDotprod
#include "kernels_neon_impl.h"
#endif

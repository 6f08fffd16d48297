// Function multi-versioning for the CPU kernels' inner loops: compiled for AVX-512, AVX2 and
// baseline x86-64 and picked at load time, so that float16/bfloat16 conversions and float
// arithmetic vectorise on whatever CPU loads the library (GCC on x86-64; elsewhere a no-op).
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define EDAAN_FAST_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define EDAAN_FAST_CPU_CLONES
#endif

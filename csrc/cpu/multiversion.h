// Function multiversioning for the CPU kernels' leaf loops: a function marked FASTNAS_MULTIVERSION is
// compiled for several x86 instruction sets and the best one the CPU has is picked at load time
// (GCC/Clang target_clones), so a portable build still runs AVX2/AVX-512 code where the CPU has it.
// Loops inlined into such a function (FASTNAS_INLINE) are vectorised for each set.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FASTNAS_NO_MULTIVERSION)
#define FASTNAS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTNAS_MULTIVERSION
#endif
#define FASTNAS_INLINE inline __attribute__((always_inline))

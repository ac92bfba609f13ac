// Run-time choice of the widest x86 vector ISA for the CPU kernels.
//
// The extension is compiled for the baseline ISA (a wheel must run on any x86-64), so each hot loop
// is instantiated three times with GCC/Clang `target` attributes and the widest one the CPU supports
// is picked at run time, the way ATen's CPU_CAPABILITY dispatch does. The loops are written with
// fixed-width vector types (vector_size(64)): the compiler lowers them to one zmm, two ymm or four
// xmm registers per vector depending on the variant.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SA_X86_MULTIVERSION 1
#define SA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))
#define SA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define SA_X86_MULTIVERSION 0
#define SA_TARGET_AVX512
#define SA_TARGET_AVX2
#endif

#define SA_ALWAYS_INLINE inline __attribute__((always_inline))

namespace sparseadapter {

enum class CpuIsa { kBaseline, kAvx2, kAvx512 };

inline CpuIsa cpu_isa() {
#if SA_X86_MULTIVERSION
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return CpuIsa::kAvx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return CpuIsa::kAvx2;
    }
    return CpuIsa::kBaseline;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

}  // namespace sparseadapter

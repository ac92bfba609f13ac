// Run-time choice of the widest x86 vector ISA for the CPU kernels.
//
// The extension is compiled for the baseline ISA (a wheel must run on any x86-64), so each hot loop
// is instantiated three times with GCC/Clang `target` attributes and the widest one the CPU supports
// is picked at run time, the way ATen's CPU_CAPABILITY dispatch does. The loops are written with
// GCC vector types of the variant's register width (Vec): a vector wider than the registers is not
// split into them but kept in memory, which made the AVX2 and baseline variants 20x slower.
#pragma once

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define SA_X86_MULTIVERSION 1
#define SA_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma,f16c")))
#define SA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define SA_TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,fma,f16c")))
#else
#define SA_X86_MULTIVERSION 0
#define SA_TARGET_AVX512
#define SA_TARGET_AVX2
#define SA_TARGET_AVX512_BF16
#endif

#define SA_ALWAYS_INLINE inline __attribute__((always_inline))

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace sparseadapter {

// kAvx512Bf16: AVX-512 with the bf16 dot-product instruction (vdpbf16ps). Every kernel runs its
// AVX-512 variant there (SA_CPU_ISA_SWITCH); the bfloat16 SpMM also has a variant that uses the
// instruction (bf16_pairs.h).
enum class CpuIsa { kBaseline, kAvx2, kAvx512, kAvx512Bf16 };

inline const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512Bf16: return "avx512bf16";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kBaseline: return "baseline";
  }
  return "baseline";
}

inline CpuIsa widest_supported_isa() {
#if SA_X86_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq")) {
    return __builtin_cpu_supports("avx512bf16") ? CpuIsa::kAvx512Bf16 : CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kBaseline;
}

// The variant the kernels run: the widest the CPU supports, capped by SPARSEADAPTER_CPU_ISA
// (baseline, avx2, avx512 or avx512bf16; read once) to run or test a narrower variant, as ATEN_CPU_CAPABILITY
// does for ATen. A cap above what the CPU supports changes nothing; an unknown name is an error.
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = [] {
    const CpuIsa widest = widest_supported_isa();
    const char* cap = std::getenv("SPARSEADAPTER_CPU_ISA");
    if (cap == nullptr || *cap == '\0') {
      return widest;
    }
    for (const CpuIsa level : {CpuIsa::kBaseline, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Bf16}) {
      if (std::strcmp(cap, cpu_isa_name(level)) == 0) {
        return std::min(level, widest);
      }
    }
    TORCH_CHECK(false, "SPARSEADAPTER_CPU_ISA=", cap, ": expected baseline, avx2, avx512 or avx512bf16");
  }();
  return isa;
}

// The vector a variant computes with: one zmm, ymm or xmm register of acc_t.
template <CpuIsa kIsa>
constexpr int kVectorBytes = kIsa >= CpuIsa::kAvx512 ? 64
                             : kIsa == CpuIsa::kAvx2 ? 32
                                                     : 16;

template <CpuIsa kIsa, typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(kVectorBytes<kIsa>)));
  static constexpr int kLanes = kVectorBytes<kIsa> / static_cast<int>(sizeof(acc_t));
};

// The most lanes of any variant: buffers read a vector at a time are padded by this much.
template <typename acc_t>
constexpr int kMaxLanes = 64 / static_cast<int>(sizeof(acc_t));

template <typename vec_t, typename acc_t>
SA_ALWAYS_INLINE vec_t load_vec(const acc_t* p) {
  vec_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename vec_t, typename acc_t>
SA_ALWAYS_INLINE void store_vec(acc_t* p, vec_t v) {
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace sparseadapter

// The switches from run-time values to compile-time ones, written once for every kernel:
//
//   SA_DISPATCH_VALUE_TYPES(type, name, ...)                     scalar_t over the value dtypes
//   SA_DISPATCH_INDEX_TYPES(type, name, ...)                     index_t over int32 and int64
//   SA_DISPATCH_VALUE_AND_INDEX_TYPES(value, index, name, ...)   both at once
//   SA_CPU_ISA_SWITCH(isa, kIsa, ...)                            constexpr CpuIsa kIsa (CPU only)
//   SA_DEFINE_ISA_VARIANTS(Name, body)                           body compiled once per ISA (CPU only)
//
// The last argument of a switch is a lambda taking no arguments; inside it the names above are
// compile-time constants, as in flash-attention's static_switch.h. The CPU macros use the names of
// cpu/cpu_isa.h, which the files that expand them include. The value dtypes are those the validation layer
// accepts (is_value_dtype in validation.h): float32, float64, float16 and bfloat16.
#pragma once

#include <ATen/Dispatch.h>

#define SA_DISPATCH_VALUE_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

#define SA_DISPATCH_INDEX_TYPES(TYPE, NAME, ...) AT_DISPATCH_INDEX_TYPES(TYPE, NAME, __VA_ARGS__)

#define SA_DISPATCH_VALUE_AND_INDEX_TYPES(VALUE_TYPE, INDEX_TYPE, NAME, ...) \
  SA_DISPATCH_VALUE_TYPES(VALUE_TYPE, NAME, [&] { SA_DISPATCH_INDEX_TYPES(INDEX_TYPE, NAME, __VA_ARGS__); })

// CONST_NAME is ISA's value in the body. The switch alone does not change how the body is compiled
// (the instruction set is a property of a function): a body that must run as AVX-512 or AVX2 code
// calls a variant defined by SA_DEFINE_ISA_VARIANTS. kAvx512Bf16 runs the AVX-512 body (the one kernel
// with a variant of its own tests cpu_isa() itself).
#define SA_CPU_ISA_SWITCH(ISA, CONST_NAME, ...)                                            \
  [&] {                                                                                    \
    switch (ISA) {                                                                         \
      case ::sparseadapter::CpuIsa::kAvx512Bf16:                                           \
      case ::sparseadapter::CpuIsa::kAvx512: {                                             \
        constexpr ::sparseadapter::CpuIsa CONST_NAME = ::sparseadapter::CpuIsa::kAvx512;   \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case ::sparseadapter::CpuIsa::kAvx2: {                                               \
        constexpr ::sparseadapter::CpuIsa CONST_NAME = ::sparseadapter::CpuIsa::kAvx2;     \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case ::sparseadapter::CpuIsa::kBaseline:                                             \
      default: {                                                                           \
        constexpr ::sparseadapter::CpuIsa CONST_NAME = ::sparseadapter::CpuIsa::kBaseline; \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
    }                                                                                      \
  }()

// Defines the class template NAME<kIsa> whose static run(args...) calls BODY<kIsa>(args...) from a
// function compiled for kIsa's instruction set (GCC/Clang `target` attributes). BODY must be
// SA_ALWAYS_INLINE, so that each variant holds its own copy compiled for its ISA.
#define SA_DEFINE_ISA_VARIANTS(NAME, BODY)                  \
  template <::sparseadapter::CpuIsa kIsa>                   \
  struct NAME;                                              \
  template <>                                               \
  struct NAME<::sparseadapter::CpuIsa::kAvx512> {           \
    template <typename... Args>                             \
    SA_TARGET_AVX512 static void run(const Args&... args) { \
      BODY<::sparseadapter::CpuIsa::kAvx512>(args...);      \
    }                                                       \
  };                                                        \
  template <>                                               \
  struct NAME<::sparseadapter::CpuIsa::kAvx2> {             \
    template <typename... Args>                             \
    SA_TARGET_AVX2 static void run(const Args&... args) {   \
      BODY<::sparseadapter::CpuIsa::kAvx2>(args...);        \
    }                                                       \
  };                                                        \
  template <>                                               \
  struct NAME<::sparseadapter::CpuIsa::kBaseline> {         \
    template <typename... Args>                             \
    static void run(const Args&... args) {                  \
      BODY<::sparseadapter::CpuIsa::kBaseline>(args...);    \
    }                                                       \
  }

// Compile-time dispatch helpers in the style of flash-attention's static_switch.h.
//
// Each macro turns a runtime value into a constexpr visible to the lambda body, e.g.
//
//   KSIZE_SWITCH(k, K, [&] { return launch<K>(args); });
//
// The callers validate the runtime value first; the last branch is the fallback.
#pragma once

#define BOOL_SWITCH(COND, CONST_NAME, ...)      \
  [&] {                                         \
    if (COND) {                                 \
      constexpr static bool CONST_NAME = true;  \
      return __VA_ARGS__();                     \
    } else {                                    \
      constexpr static bool CONST_NAME = false; \
      return __VA_ARGS__();                     \
    }                                           \
  }()

// Depthwise kernel size: 3, 5 or 7.
#define KSIZE_SWITCH(KVAL, CONST_NAME, ...)  \
  [&] {                                      \
    if ((KVAL) == 3) {                       \
      constexpr static int CONST_NAME = 3;   \
      return __VA_ARGS__();                  \
    } else if ((KVAL) == 5) {                \
      constexpr static int CONST_NAME = 5;   \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr static int CONST_NAME = 7;   \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// Convolution stride along W: 1 or 2.
#define STRIDE_SWITCH(SVAL, CONST_NAME, ...) \
  [&] {                                      \
    if ((SVAL) == 1) {                       \
      constexpr static int CONST_NAME = 1;   \
      return __VA_ARGS__();                  \
    } else {                                 \
      constexpr static int CONST_NAME = 2;   \
      return __VA_ARGS__();                  \
    }                                        \
  }()

// Element type: effnet::kFloat32 / kFloat16 / kBFloat16 -> float / __half / __nv_bfloat16.
#define DTYPE_SWITCH(DVAL, TYPE_NAME, ...)          \
  [&] {                                             \
    if ((DVAL) == ::effnet::kFloat16) {             \
      using TYPE_NAME = __half;                     \
      return __VA_ARGS__();                         \
    } else if ((DVAL) == ::effnet::kBFloat16) {     \
      using TYPE_NAME = __nv_bfloat16;              \
      return __VA_ARGS__();                         \
    } else {                                        \
      using TYPE_NAME = float;                      \
      return __VA_ARGS__();                         \
    }                                               \
  }()

// dwconv_bn_act's activation: effnet::kIdentity / kSiLU / kReLU / kReLU6 / kHardSwish.
#define ACT_SWITCH(AVAL, CONST_NAME, ...)                       \
  [&] {                                                         \
    if ((AVAL) == ::effnet::kSiLU) {                            \
      constexpr static int CONST_NAME = ::effnet::kSiLU;        \
      return __VA_ARGS__();                                     \
    } else if ((AVAL) == ::effnet::kReLU) {                     \
      constexpr static int CONST_NAME = ::effnet::kReLU;        \
      return __VA_ARGS__();                                     \
    } else if ((AVAL) == ::effnet::kReLU6) {                    \
      constexpr static int CONST_NAME = ::effnet::kReLU6;       \
      return __VA_ARGS__();                                     \
    } else if ((AVAL) == ::effnet::kHardSwish) {                \
      constexpr static int CONST_NAME = ::effnet::kHardSwish;   \
      return __VA_ARGS__();                                     \
    } else {                                                    \
      constexpr static int CONST_NAME = ::effnet::kIdentity;    \
      return __VA_ARGS__();                                     \
    }                                                           \
  }()

// One of two int constants: CONST_NAME = A when VAL == A, else B (se_gate's kSiLU | kReLU,
// kSigmoid | kHardSigmoid).
#define TWO_WAY_SWITCH(VAL, A, B, CONST_NAME, ...) \
  [&] {                                            \
    if ((VAL) == (A)) {                            \
      constexpr static int CONST_NAME = (A);       \
      return __VA_ARGS__();                        \
    } else {                                       \
      constexpr static int CONST_NAME = (B);       \
      return __VA_ARGS__();                        \
    }                                              \
  }()

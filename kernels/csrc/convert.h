// Conversions between the 16-bit float types and fp32 shared by the native kernels, written
// so that the loops calling them vectorise (bf16 by bit shifts, fp16 through F16C).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>

namespace mofast {

inline float bf16_to_float(c10::BFloat16 v) {
  uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

inline c10::BFloat16 float_to_bf16(float v) {
  // Round to nearest even, as c10 does, written branch-free so the loop vectorises.
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  c10::BFloat16 out;
  out.x = static_cast<uint16_t>(std::isnan(v) ? 0x7FC0u : rounded);
  return out;
}

// c10::Half converts one value at a time; F16C converts eight per instruction, exactly
// (round to nearest even on the way down).
inline void half_to_float(const c10::Half* src, float* dst, int64_t n) {
  int64_t p = 0;
#if defined(__F16C__)
  for (; p + 8 <= n; p += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + p));
    _mm256_storeu_ps(dst + p, _mm256_cvtph_ps(h));
  }
#endif
  for (; p < n; ++p) dst[p] = static_cast<float>(src[p]);
}

inline void float_to_half(const float* src, c10::Half* dst, int64_t n) {
  int64_t p = 0;
#if defined(__F16C__)
  for (; p + 8 <= n; p += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + p), _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + p), h);
  }
#endif
  for (; p < n; ++p) dst[p] = static_cast<c10::Half>(src[p]);
}

}  // namespace mofast

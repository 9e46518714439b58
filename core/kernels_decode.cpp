// Decoding packed codes to float32 weights, the weight-only path's and large batches' first step
// (layout: kernels.h).
#include <ATen/Parallel.h>

#include "kernels.h"

namespace bitsweep_kernels {

// Decoded weights, exactly the schemes' arithmetic in float32: (lut[u] - zero) * scale, where a linear
// table's lut[u] is u + lut[0]. With SCALED false only lut[u] (the caller applies its groups' scales).
template <int B, int KIND, bool SCALED>
INLINE __m256 weights8(__m256i u, const float* lut, __m256 lo, __m256 hi, __m256 scale, __m256 zero) {
  __m256 v = levels8<B, KIND>(u, lut, lo, hi);
  if constexpr (KIND == kLinear) v = _mm256_add_ps(v, _mm256_set1_ps(lut[0]));
  if constexpr (SCALED) v = _mm256_mul_ps(_mm256_sub_ps(v, zero), scale);
  return v;
}

template <int B, int KIND, bool SCALED, int... I>
INLINE void decode_block(std::integer_sequence<int, I...>, const uint8_t* blk, float* dst, const float* lut,
                         __m256 lo, __m256 hi, __m256 scale, __m256 zero) {
  (_mm256_storeu_ps(dst + 8 * I, weights8<B, KIND, SCALED>(code_u<B, I>(blk), lut, lo, hi, scale, zero)), ...);
}

#if BITSWEEP_AVX512
// Linear and pow2 codes, two slots at a time on 512-bit vectors: half the instructions of decode_block,
// the same arithmetic (slot I's eight weights in the low half, slot I + 1's, the next eight, in the high
// half; pow2's levels as the fused kernel's pow2_level2() makes them).
template <int B, int KIND, bool SCALED, int... P>
INLINE void decode_block2(std::integer_sequence<int, P...>, const uint8_t* blk, float* dst, float offset,
                          __m512 scale, __m512 zero) {
  auto pair = [&](auto slot) {
    constexpr int I = decltype(slot)::value;
    __m512 v;
    if constexpr (KIND == kLinear) {
      v = _mm512_add_ps(_mm512_cvtepi32_ps(pair_codes<B, I, true>(blk)), _mm512_set1_ps(offset));
    } else {
      constexpr int L = (1 << (B - 1)) - 1;  // levels8()'s 2^(127 - L), exact
      v = _mm512_mul_ps(pow2_level2<B, I>(blk), _mm512_castsi512_ps(_mm512_set1_epi32((254 - L) << 23)));
    }
    if constexpr (SCALED) v = _mm512_mul_ps(_mm512_sub_ps(v, zero), scale);
    _mm512_storeu_ps(dst + 8 * I, v);
  };
  (pair(std::integral_constant<int, 2 * P>{}), ...);
}
#endif

// Row n into row[0, K); SCALED when the row has one scale and zero point (no groups), which are then
// applied as the codes are decoded rather than in a second pass.
template <int B, int KIND, bool SCALED>
void decode_row(const Layer& L, int64_t n, float* row, __m256 lo, __m256 hi) {
  const float s = L.scale[n * L.G], z = L.zero[n * L.G];
  const __m256 scale = _mm256_set1_ps(s), zero = _mm256_set1_ps(z);
  const uint8_t* blk = L.row_blocks(n);
  const int64_t step = L.block_step(n);
  for (int64_t b = 0; b < L.nblocks; ++b, blk += step) {
    // The row's blocks are every step bytes, a stride the hardware prefetcher may not follow far enough.
    for (int64_t line = 0; line < 32 * B; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(blk) + kDecodeAhead * step + line, _MM_HINT_T1);
#if BITSWEEP_AVX512
    if constexpr (KIND != kTable) {
      decode_block2<B, KIND, SCALED>(std::make_integer_sequence<int, 16>{}, blk, row + b * kBlock, L.lut[0],
                                     _mm512_set1_ps(s), _mm512_set1_ps(z));
      continue;
    }
#endif
    decode_block<B, KIND, SCALED>(std::make_integer_sequence<int, 32>{}, blk, row + b * kBlock, L.lut, lo, hi, scale,
                                  zero);
  }
  // The tail (all of a row narrower than a block: 1x1 and depthwise convolutions), eight at a time.
  const int64_t k0 = L.nblocks * kBlock;
  int64_t k = 0;
  for (; k + 8 <= L.rest; k += 8) {
    const __m256i u = codes8<B>(stream_word(L.tail, (n * L.rest + k) * B));
    _mm256_storeu_ps(row + k0 + k, weights8<B, KIND, SCALED>(u, L.lut, lo, hi, scale, zero));
  }
  for (; k < L.rest; ++k) {
    const uint32_t u = uint32_t(stream_word(L.tail, (n * L.rest + k) * B)) & ((1u << B) - 1);
    const float level = KIND == kLinear ? float(u) + L.lut[0] : L.lut[u];
    row[k0 + k] = SCALED ? (level - z) * s : level;
  }
}

// Rows [first, last) into out[n - first].
template <int B, int KIND>
void decode_rows(const Layer& L, float* out, int64_t first, int64_t last) {
  __m256 lo, hi;
  table_vectors(L, lo, hi);
  at::parallel_for(first, last, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      float* row = out + (n - first) * L.K;
      if (L.G == 1) {
        decode_row<B, KIND, true>(L, n, row, lo, hi);
        continue;
      }
      decode_row<B, KIND, false>(L, n, row, lo, hi);
      for (int64_t g = 0; g < L.G; ++g) {
        const float s = L.scale[n * L.G + g], z = L.zero[n * L.G + g];
        for (int64_t k = g * L.group; k < std::min(L.K, (g + 1) * L.group); ++k) row[k] = (row[k] - z) * s;
      }
    }
  });
}

// Dense float32 weights [N, K], computed exactly as the schemes decode: (lut[u] - zero) * scale.
void decode_range(const Layer& L, float* out, int64_t first, int64_t last) {
  // pow2 levels from their bits where a table would need a gather (> 4 bits); bit-exact either way.
  const int kind = is_linear(L.lut, L.bits) ? kLinear : L.bits > 4 && is_pow2(L.lut, L.bits) ? kPow2 : kTable;
  switch (L.bits * 3 + kind) {
#define CASE(B)                                                          \
  case 3 * B + kLinear: return decode_rows<B, kLinear>(L, out, first, last); \
  case 3 * B + kTable: return decode_rows<B, kTable>(L, out, first, last);   \
  case 3 * B + kPow2: return decode_rows<B, kPow2>(L, out, first, last);
    CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
  }
}

}  // namespace bitsweep_kernels

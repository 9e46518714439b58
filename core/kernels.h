// bitsweep's CPU kernels for packed n-bit weights: fused unpack + multiply-accumulate (Linear) and
// decode to fp32 (the weight-only Conv2d path, and large batches).
//
// In memory (see prepare()), each [N, K] weight row is cut into blocks of 256 codes u = code - qmin
// and a tail of K % 256 codes. A block is `bits` 32-byte vectors: lane j (0..7) of the vectors holds,
// as one LSB-first stream of 32 * bits bits, the codes of k = 8 * i + j for slots i = 0..31 (slot i at
// stream bits [i * bits, (i + 1) * bits)). So slot i of all eight lanes is eight consecutive k, the x
// it multiplies is one contiguous load, and most codes come out with one AND (the rest need a shift,
// or two for the few that straddle two 32-bit words). Rows go in runs of four (the last run may be
// shorter) whose blocks interleave: block 0 of each row of the run, block 1 of each, ... so a tile of
// four rows reads one sequential stream, which the hardware prefetcher follows. All runs' blocks come
// first, then all rows' tails as one LSB-first bitstream, then 8 bytes of slack for 64-bit loads:
// exactly ceil(N*K*bits/8) + 8 bytes.
// Each weight is
//     w[n, k] = scale[n, g] * (lut[u] - zero[n, g]),   g = k / group,
// where lut holds the scheme's level for every u at scale 1 and zero point 0. The activations stay
// float32: the kernels multiply-accumulate the levels in float32 and apply zero points and scales per
// group, so results match the fake-quantized model to float32 rounding.
//
// This header holds what the fused Linear kernel (kernels_linear.cpp), decoding (kernels_decode.cpp) and
// the Python bindings (kernels.cpp) share; the three compile in parallel.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define INLINE inline __attribute__((always_inline))

// Where the compiler targets AVX-512 (-march=native on Intel Ice Lake and later, AMD Zen 4 and later),
// the Linear kernel's blocks run on 512-bit vectors, two slots per vector (see pair()), for the widths
// and kinds where that measured faster than the AVX2 code (wide_blocks()), and so does decoding of linear
// and pow2 codes; elsewhere, and for the tail everywhere, the AVX2 code. Same layout and results either
// way; vector_bits() says which was compiled. -DBITSWEEP_NO_AVX512 forces the AVX2 code.
#if defined(__AVX512F__) && !defined(BITSWEEP_NO_AVX512)
#define BITSWEEP_AVX512 1
#else
#define BITSWEEP_AVX512 0
#endif

namespace bitsweep_kernels {

constexpr int64_t kBlock = 256;  // codes per block: 8 lanes x 32 slots
// Cold weights stream from memory: each block's lines are requested this far ahead of the one being
// read, into L2 early enough to cover memory's latency at full bandwidth and into L1 shortly before use.
// (Runs follow each other in memory, so near a run's end these fetch the next run's start.) Without the
// L2 request the core has too few misses in flight at 6 to 8 bits; bench/kernels.py measures it.
constexpr int64_t kPrefetchL1 = 2048, kPrefetchL2 = 16384;
// Decoding reads one row's blocks of a run at a time: its L2 requests go this many blocks ahead.
constexpr int64_t kDecodeAhead = 8;
// Large batches decode at least this many bytes of fp32 weight at a time (more for more rows of x: see
// linear_decoded), a slice that stays in cache while the BLAS reads it.
constexpr int64_t kChunkBytes = 1024 * 1024;
// Up to this many rows of x, W x.T into y.T's rows beat x W.T into y's columns by 6-14 % with AVX-512
// (768x3072 to 4096x4096; 3-19 % slower from 128 rows on).
constexpr int64_t kTransposedMaxRows = 64;

// How levels are made from codes: u itself, converted from its bits in place (lut[0] added per group
// via the sums of x); a table lookup; or, for the pow2 scheme's table at >= 4 bits, sign and exponent
// written straight into the float's bits.
enum Kind { kLinear = 0, kTable = 1, kPow2 = 2 };

struct Layer {
  const uint8_t* blocks;
  const uint8_t* tail;
  int64_t N, K, bits, nblocks, rest, group, G;
  const float* lut;
  const float* scale;
  const float* zero;

  // Row n's first block, and the bytes from one of its blocks to the next (the rows in its run).
  const uint8_t* row_blocks(int64_t n) const { return blocks + ((n & ~3) * nblocks + (n & 3)) * 32 * bits; }
  int64_t block_step(int64_t n) const { return std::min<int64_t>(4, N - (n & ~3)) * 32 * bits; }
};

inline int64_t prepared_bytes(int64_t N, int64_t K, int64_t bits) { return (N * K * bits + 7) / 8 + 8; }

// Where slot I of a block sits in each lane's stream: word d, bit o.
template <int B, int I>
struct Slot {
  static constexpr int d = B * I / 32, o = B * I % 32;
  static constexpr bool straddle = o + B > 32, top = o + B == 32;
  static constexpr uint32_t mask = (1u << B) - 1;
};

INLINE __m256i word(const uint8_t* blk, int d) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 * d));
}

// Slot I's codes as 32-bit lanes; with MASK false the bits above the code may hold other codes.
template <int B, int I, bool MASK = true>
INLINE __m256i code_u(const uint8_t* blk) {
  using S = Slot<B, I>;
  __m256i v = word(blk, S::d);
  if constexpr (S::straddle)
    v = _mm256_or_si256(_mm256_srli_epi32(v, S::o), _mm256_slli_epi32(word(blk, S::d + 1), 32 - S::o));
  else if constexpr (S::o > 0)
    v = _mm256_srli_epi32(v, S::o);
  if constexpr (MASK && !S::top) v = _mm256_and_si256(v, _mm256_set1_epi32(S::mask));
  return v;
}

// Whether a block's slots run in 512-bit pairs. Some CPUs run a 512-bit operation as two 256-bit halves,
// so pairs are used only where they save operations or loads: 2- and 4-bit linear codes (in place, no
// code straddles a word, both slots of a pair in one word: one broadcast load), and tables of 4 to 32
// levels (one vpermps / vpermt2ps for 16 weights, where AVX2 needs two vpermps and a blend, or a gather,
// or pow2's bit arithmetic), and pow2's bits at 6 to 8 bits (five integer operations for 16 levels, where
// AVX2 takes five for 8). Elsewhere (odd widths' straddling linear codes, 6 and 8 bits, 3-bit tables: one
// 256-bit vpermps already, larger tables) pairs save nothing and the AVX2 code runs; bench/kernels.py
// measures both on the machine at hand.
constexpr bool wide_blocks(int kind, int B) {
  if (!BITSWEEP_AVX512) return false;
  if (kind == kLinear) return B == 2 || B == 4;
  return B == 2 || B == 4 || B == 5 || kind == kPow2;
}

// Where slot I's code sits in the 32-bit lane a linear level is converted from: in place at bit o when
// u << o is a positive int32 (one AND), else (the top code, and codes straddling two words) shifted
// down to bit 0. vcvtdq2ps turns u << p into the float u * 2^p exactly (at most 8 significant bits), a
// normal float for every u > 0, so x carries 2^(S - p); no subnormal is ever read or made.
// In 512-bit pairs (widths that divide 32: no code straddles) every code stays in place, the top one
// converted as unsigned (vcvtudq2ps).
constexpr int low_bit(int B, int i, bool wide) {
  const int o = B * i % 32;
  return wide || o + B < 32 ? o : 0;
}

template <int B, int I>
INLINE __m256i linear_bits(const uint8_t* blk) {
  using S = Slot<B, I>;
  if constexpr (S::straddle || S::top)
    return code_u<B, I>(blk);
  else
    return _mm256_and_si256(word(blk, S::d), _mm256_set1_epi32(S::mask << S::o));
}

template <int B, int I>
constexpr bool shifted() { return !Slot<B, I>::straddle && !Slot<B, I>::top; }

// The level of slot I's codes, as the kernel multiplies it (see slot_factor for the x that goes with it).
template <int B, int KIND, int I>
INLINE __m256 level(const uint8_t* blk, const float* lut, __m256 lo, __m256 hi) {
  using S = Slot<B, I>;
  if constexpr (KIND == kLinear) {
    return _mm256_cvtepi32_ps(linear_bits<B, I>(blk));
  } else if constexpr (KIND == kPow2) {
    // c = u - L, kept at bit o where that saves the shift. The low 8 bits of c become the exponent
    // field: 2^(c - 127) for c > 0; for c < 0 the field holds 256 + c and vpsignd's integer negation
    // turns it into -2^(|c| - 127); c = 0 gives 0. x carries the missing 2^(127 - L).
    constexpr int L = (1 << (B - 1)) - 1;
    constexpr int sh = shifted<B, I>() ? S::o : 0;
    __m256i c;
    if constexpr (shifted<B, I>())
      c = _mm256_sub_epi32(_mm256_and_si256(word(blk, S::d), _mm256_set1_epi32(S::mask << S::o)),
                           _mm256_set1_epi32(L << S::o));
    else
      c = _mm256_sub_epi32(code_u<B, I>(blk), _mm256_set1_epi32(L));
    __m256i e = c;
    if constexpr (sh < 23) e = _mm256_slli_epi32(e, 23 - sh);
    else if constexpr (sh > 23) e = _mm256_srai_epi32(e, sh - 23);
    e = _mm256_and_si256(e, _mm256_set1_epi32(0x7F800000));
    return _mm256_castsi256_ps(_mm256_sign_epi32(e, c));
  } else if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(lo, code_u<B, I, false>(blk));  // vpermps reads 3 index bits
  } else if constexpr (B == 4) {
    const __m256i v = word(blk, S::d);
    const __m256i idx = S::o ? _mm256_srli_epi32(v, S::o) : v;
    const __m256i high = _mm256_slli_epi32(v, 28 - S::o);  // the code's bit 3 in the sign bit
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                            _mm256_castsi256_ps(high));
  } else {
    return _mm256_i32gather_ps(lut, code_u<B, I>(blk), 4);
  }
}

// What slot i's x is multiplied by, so that level * x' == lut-level * x / post: linear levels are
// u * 2^p and take 2^(S - p); pow2 levels are 2^(|c| - 127) and take 2^(127 - L - a).
inline double slot_factor(int kind, int B, int i, int shift) {
  if (kind == kTable) return 1.0;
  return std::ldexp(1.0, kind == kPow2 ? shift : shift - low_bit(B, i, wide_blocks(kind, B)));
}

// Eight consecutive codes of an LSB-first stream, from the 64-bit word starting at their first bit.
template <int B>
INLINE __m256i codes8(uint64_t w) {
  const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
  if constexpr (B == 8) {
    return _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(w)));
  } else if constexpr (B <= 4) {
    const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
    return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int32_t(w)), shifts), mask);
  } else {
    // Lane i takes the 4 bytes starting at byte (B*i)/8, then shifts right by (B*i)%8.
#define BYTES_OF(i) (B * i) / 8, (B * i) / 8 + 1, (B * i) / 8 + 2, (B * i) / 8 + 3
    const __m256i pick = _mm256_setr_epi8(BYTES_OF(0), BYTES_OF(1), BYTES_OF(2), BYTES_OF(3), BYTES_OF(4),
                                          BYTES_OF(5), BYTES_OF(6), BYTES_OF(7));
#undef BYTES_OF
    const __m256i shifts = _mm256_setr_epi32(0, (B * 1) % 8, (B * 2) % 8, (B * 3) % 8, (B * 4) % 8, (B * 5) % 8,
                                             (B * 6) % 8, (B * 7) % 8);
    const __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi64x(int64_t(w)), pick);
    return _mm256_and_si256(_mm256_srlv_epi32(v, shifts), mask);
  }
}

INLINE uint64_t stream_word(const uint8_t* base, int64_t bit) {
  uint64_t w;
  std::memcpy(&w, base + (bit >> 3), 8);
  return w >> (bit & 7);
}

// The true levels (lut[u]) of eight codes: the tail's, and decode's.
template <int B, int KIND>
INLINE __m256 levels8(__m256i u, const float* lut, __m256 lo, __m256 hi) {
  if constexpr (KIND == kLinear) {
    return _mm256_cvtepi32_ps(u);
  } else if constexpr (KIND == kPow2) {
    // is_pow2's levels without a gather: sign(c) * 2^(|c| - 127) from the bits, as level() builds them
    // (vpsignd makes c = 0 zero), times 2^(127 - L) -- exact, both being powers of two in normal range.
    constexpr int L = (1 << (B - 1)) - 1;
    const __m256i c = _mm256_sub_epi32(u, _mm256_set1_epi32(L));
    const __m256i e = _mm256_and_si256(_mm256_slli_epi32(c, 23), _mm256_set1_epi32(0x7F800000));
    const __m256 level = _mm256_castsi256_ps(_mm256_sign_epi32(e, c));
    if constexpr (L == 127) return level;
    return _mm256_mul_ps(level, _mm256_castsi256_ps(_mm256_set1_epi32((254 - L) << 23)));  // 2^(127 - L)
  } else if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(lo, u);
  } else if constexpr (B == 4) {
    const __m256 a = _mm256_permutevar8x32_ps(lo, u), b = _mm256_permutevar8x32_ps(hi, u);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(u, 28)));
  } else {
    return _mm256_i32gather_ps(lut, u, 4);
  }
}

INLINE float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The lut's first 16 entries as two vectors (for vpermps lookups at <= 4 bits). A 2-bit table is
// repeated across the 8 slots: vpermps reads 3 index bits and the third may belong to the next code.
inline void table_vectors(const Layer& L, __m256& lo, __m256& hi) {
  float table[16] = {};
  const int64_t size = std::min<int64_t>(16, int64_t(1) << L.bits);
  for (int i = 0; i < 16; ++i) table[i] = L.lut[i % size];
  lo = _mm256_loadu_ps(table);
  hi = _mm256_loadu_ps(table + 8);
}

struct Call {
  const float* x;     // [M, K] as given: the last < 8 codes of each row use it
  const float* xs;    // [M, K], x times each slot's factor
  const float* xsum;  // [M, G] per-group sums of x: they carry zero points and a linear table's offset
  double post;        // the vector sums times this are in units of x (double: it may exceed float's range)
  float* y;           // [M, N]
  // The levels the 512-bit blocks look up with permutes (<= 5 bits): lut[u] (repeated below 16 entries),
  // or for pow2 the levels level() makes from the bits.
  alignas(64) float table[32];
};

// The accumulators' few operations, for 256- and 512-bit vectors alike.
INLINE float acc_sum(__m256 v) { return hsum(v); }
INLINE __m256 acc_add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
INLINE __m256 acc_fmadd8(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
template <typename V>
INLINE V acc_zero() { return V{}; }

#if BITSWEEP_AVX512
INLINE __m512 acc_add(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
INLINE float acc_sum(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_castps512_ps256(v),
                            _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
}
INLINE __m512 acc_fmadd8(__m256 a, __m256 b, __m512 c) {
  return _mm512_fmadd_ps(_mm512_zextps256_ps512(a), _mm512_zextps256_ps512(b), c);
}

// 32-bit lanes 0..7 set to a, 8..15 to b (slot 2j's and slot 2j + 1's halves of a pair).
INLINE __m512i halves(uint32_t a, uint32_t b) {
  return _mm512_inserti64x4(_mm512_set1_epi32(int32_t(a)), _mm256_set1_epi32(int32_t(b)), 1);
}

// Word E0 of a block's lanes in the low half, word E1 in the high half: one load.
template <int E0, int E1>
INLINE __m512i words2(const uint8_t* blk) {
  if constexpr (E0 == E1)
    return _mm512_broadcast_i64x4(word(blk, E0));
  else {
    static_assert(E1 == E0 + 1, "two consecutive slots lie in one word or in two adjacent ones");
    return _mm512_loadu_si512(blk + 32 * E0);
  }
}

// The codes of slots I and I + 1 (I even) shifted down to bit 0; with MASK false the bits from B up may
// hold other codes. A slot that does not straddle takes its own word as the "next" one: shifted left by
// 32 - o (zero for o = 0) it only puts bits at B and above.
template <int B, int I, bool MASK>
INLINE __m512i pair_codes(const uint8_t* blk) {
  using S0 = Slot<B, I>;
  using S1 = Slot<B, I + 1>;
  const __m512i lo = words2<S0::d, S1::d>(blk);
  __m512i v;
  if constexpr (S0::straddle || S1::straddle) {
    const __m512i hi = words2<S0::d + S0::straddle, S1::d + S1::straddle>(blk);
    v = _mm512_or_si512(_mm512_srlv_epi32(lo, halves(S0::o, S1::o)),
                        _mm512_sllv_epi32(hi, halves(32 - S0::o, 32 - S1::o)));
  } else if constexpr (S0::o == S1::o) {
    v = S0::o ? _mm512_srli_epi32(lo, S0::o) : lo;
  } else {
    v = _mm512_srlv_epi32(lo, halves(S0::o, S1::o));
  }
  if constexpr (MASK) v = _mm512_and_si512(v, _mm512_set1_epi32((1 << B) - 1));
  return v;
}

struct Tables {
  __m512 t[2];
};

// pow2's levels of slots I and I + 1 from their bits, as level() makes them (6 to 8 bits: larger tables
// than one vpermt2ps holds). AVX-512 has no vpsignd, so the exponent field is |c| (vpabsd) and the sign
// bit c's (one vpternlogd). In place, (u - L) << o has c's sign as an int32 (o + B < 32), and one rotate
// moves |c| from bit o to the exponent at bit 23, whichever side of it o is.
template <int B, int I>
INLINE __m512 pow2_level2(const uint8_t* blk) {
  using S0 = Slot<B, I>;
  using S1 = Slot<B, I + 1>;
  constexpr int L = (1 << (B - 1)) - 1;
  __m512i c, e;
  if constexpr (shifted<B, I>() && shifted<B, I + 1>()) {
    const __m512i u = _mm512_and_si512(words2<S0::d, S1::d>(blk), halves(S0::mask << S0::o, S1::mask << S1::o));
    c = _mm512_sub_epi32(u, halves(L << S0::o, L << S1::o));
    e = _mm512_rolv_epi32(_mm512_abs_epi32(c), halves((23 - S0::o) & 31, (23 - S1::o) & 31));
  } else {
    c = _mm512_sub_epi32(pair_codes<B, I, true>(blk), _mm512_set1_epi32(L));
    e = _mm512_slli_epi32(_mm512_abs_epi32(c), 23);
  }
  return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(e, c, _mm512_set1_epi32(INT32_MIN), 0xF8));  // e | c&sign
}

// The levels of slots I and I + 1 as pair() multiplies them: the 512-bit level(). Linear codes are
// converted in place (u << o, one AND); tables of up to 32 levels are one vpermps / vpermt2ps, pow2's
// too (its levels as level() makes them from the bits); pow2 at 6 to 8 bits is pow2_level2().
template <int B, int KIND, int I>
INLINE __m512 level2(const uint8_t* blk, const float* lut, const Tables& t) {
  using S0 = Slot<B, I>;
  using S1 = Slot<B, I + 1>;
  constexpr bool straddle = S0::straddle || S1::straddle;
  if constexpr (KIND == kLinear) {
    static_assert(!straddle, "wide_blocks() takes linear codes at widths that divide 32");
    if constexpr (S0::top || S1::top)  // u << o may be 2^31 or more
      return _mm512_cvtepu32_ps(
          _mm512_and_si512(words2<S0::d, S1::d>(blk), halves(S0::mask << S0::o, S1::mask << S1::o)));
    else
      return _mm512_cvtepi32_ps(
          _mm512_and_si512(words2<S0::d, S1::d>(blk), halves(S0::mask << S0::o, S1::mask << S1::o)));
  } else if constexpr (KIND == kPow2 && B >= 6) {
    return pow2_level2<B, I>(blk);
  } else if constexpr (B <= 4) {
    return _mm512_permutexvar_ps(pair_codes<B, I, false>(blk), t.t[0]);  // reads 4 index bits
  } else {
    static_assert(B == 5, "wide_blocks() takes tables of up to 32 levels");
    return _mm512_permutex2var_ps(t.t[0], pair_codes<B, I, false>(blk), t.t[1]);  // reads 5
  }
}
#endif

// Whether lut[u] == lut[0] + u for every u (asymmetric and symmetric tables): no lookup needed.
inline bool is_linear(const float* lut, int B) {
  for (int u = 0; u < (1 << B); ++u)
    if (lut[u] != lut[0] + float(u)) return false;
  return true;
}

// Whether lut is exactly the pow2 scheme's: 0 at u = L, else sign(u - L) * 2^(|u - L| - L).
inline bool is_pow2(const float* lut, int B) {
  const int L = (1 << (B - 1)) - 1;
  for (int u = 0; u < (1 << B); ++u) {
    const int c = u - L;
    const uint32_t want = c == 0 ? 0u : (uint32_t(std::abs(c) + 127 - L) << 23) | (c < 0 ? 0x80000000u : 0u);
    uint32_t got;
    std::memcpy(&got, lut + u, 4);
    if (got != want) return false;
  }
  return true;
}

// x @ W.T for M rows of x (kernels_linear.cpp): the fused kernel for this width and kind of levels.
void linear_rows_by_width(int bits, int kind, const Layer& L, const Call& c, int64_t M);

// Rows first..last of W decoded to float32, row-major from out (kernels_decode.cpp).
void decode_range(const Layer& L, float* out, int64_t first, int64_t last);

}  // namespace bitsweep_kernels

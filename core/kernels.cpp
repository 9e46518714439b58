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
#include <torch/extension.h>
#include <ATen/Parallel.h>
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
// and kinds where that measured faster than the AVX2 code (wide_blocks()); elsewhere, and for the tail
// and decode everywhere, the AVX2 code. Same layout and results either way; vector_bits() says which was
// compiled. -DBITSWEEP_NO_AVX512 forces the AVX2 code.
#if defined(__AVX512F__) && !defined(BITSWEEP_NO_AVX512)
#define BITSWEEP_AVX512 1
#else
#define BITSWEEP_AVX512 0
#endif

namespace {

constexpr int64_t kBlock = 256;  // codes per block: 8 lanes x 32 slots
// Cold weights stream from memory: each block's lines are requested this far ahead of the one being
// read, into L2 early enough to cover memory's latency at full bandwidth and into L1 shortly before use.
// (Runs follow each other in memory, so near a run's end these fetch the next run's start.) Without the
// L2 request the core has too few misses in flight at 6 to 8 bits; bench/kernels.py measures it.
constexpr int64_t kPrefetchL1 = 2048, kPrefetchL2 = 16384;
// Decoding reads one row's blocks of a run at a time: its L2 requests go this many blocks ahead.
constexpr int64_t kDecodeAhead = 8;
// Large batches decode this many bytes of fp32 weight at a time: the slice stays in L3 while the BLAS
// reads it, and is tall enough that the BLAS packing x again for every slice costs little (a 256 KB
// slice of a 3072-wide layer is only 20 rows).
constexpr int64_t kChunkBytes = 2048 * 1024;

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

int64_t prepared_bytes(int64_t N, int64_t K, int64_t bits) { return (N * K * bits + 7) / 8 + 8; }

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
// or pow2's bit arithmetic). Elsewhere (odd widths' straddling codes, 6 and 8 bits, 3-bit tables: one
// 256-bit vpermps already, larger tables, pow2's bits at 6 to 8 bits) pairs save nothing and the AVX2
// code runs; bench/kernels.py measures both on the machine at hand.
constexpr bool wide_blocks(int kind, int B) {
  if (!BITSWEEP_AVX512) return false;
  if (kind == kLinear) return B == 2 || B == 4;
  return B == 2 || B == 4 || B == 5;
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
double slot_factor(int kind, int B, int i, int shift) {
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
void table_vectors(const Layer& L, __m256& lo, __m256& hi) {
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

// The levels of slots I and I + 1 as pair() multiplies them: the 512-bit level(). Linear codes are
// converted in place (u << o, one AND); tables of up to 32 levels are one vpermps / vpermt2ps, pow2's
// too (its levels as level() makes them from the bits).
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
  } else if constexpr (B <= 4) {
    return _mm512_permutexvar_ps(pair_codes<B, I, false>(blk), t.t[0]);  // reads 4 index bits
  } else {
    static_assert(B == 5, "wide_blocks() takes tables of up to 32 levels");
    return _mm512_permutex2var_ps(t.t[0], pair_codes<B, I, false>(blk), t.t[1]);  // reads 5
  }
}
#endif

// Independent accumulators per (row, batch row): FMA latency needs 8 chains in flight.
template <int R, int MT>
constexpr int chains() { return R * MT >= 8 ? 1 : 8 / (R * MT); }

template <int B, int KIND, int I, int R, int MT, int A = chains<R, MT>()>
INLINE void slot(const uint8_t* const* blk, const float* const* xb, __m256 (&acc)[R][MT][A], const float* lut,
                 __m256 lo, __m256 hi) {
  __m256 xv[MT];
  for (int m = 0; m < MT; ++m) {
    xv[m] = _mm256_loadu_ps(xb[m] + 8 * I);
    asm("" : "+x"(xv[m]));  // keep x in a register: one load per slot, not one per row
  }
  for (int r = 0; r < R; ++r) {
    const __m256 w = level<B, KIND, I>(blk[r], lut, lo, hi);
    for (int m = 0; m < MT; ++m) acc[r][m][I % A] = _mm256_fmadd_ps(w, xv[m], acc[r][m][I % A]);
  }
}

template <int B, int KIND, int R, int MT, bool GROUPED, typename Flush, int A, int... I>
INLINE void block(std::integer_sequence<int, I...>, const uint8_t* const* blk, const float* const* xb,
                  __m256 (&acc)[R][MT][A], const float* lut, __m256 lo, __m256 hi, int64_t& left, Flush& flush) {
  ((slot<B, KIND, I, R, MT>(blk, xb, acc, lut, lo, hi), (GROUPED && --left == 0) ? flush() : void()), ...);
}

#if BITSWEEP_AVX512
// Slots I and I + 1 of a block: one 512-bit load of x and one vector of levels per row. A group that
// ends between them (groups of an odd number of slots) takes the low half, the next the high half.
template <int B, int KIND, int I, int R, int MT, bool GROUPED, int A, typename Flush>
INLINE void pair(const uint8_t* const* blk, const float* const* xb, __m512 (&acc)[R][MT][A], const float* lut,
                 const Tables& t, int64_t& left, Flush& flush) {
  constexpr int a = I / 2 % A;
  __m512 xv[MT];
  for (int m = 0; m < MT; ++m) {
    xv[m] = _mm512_loadu_ps(xb[m] + 8 * I);
    asm("" : "+v"(xv[m]));  // keep x in a register: one load per pair, not one per row
  }
  __m512 w[R];
  for (int r = 0; r < R; ++r) w[r] = level2<B, KIND, I>(blk[r], lut, t);
  if (!GROUPED || left >= 2) {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m][a] = _mm512_fmadd_ps(w[r], xv[m], acc[r][m][a]);
    if (GROUPED && (left -= 2) == 0) flush();
  } else {
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m][a] = _mm512_mask3_fmadd_ps(w[r], xv[m], acc[r][m][a], 0x00FF);
    flush();
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < MT; ++m) acc[r][m][a] = _mm512_mask3_fmadd_ps(w[r], xv[m], acc[r][m][a], 0xFF00);
    if (--left == 0) flush();
  }
}

template <int B, int KIND, int R, int MT, bool GROUPED, typename Flush, int A, int... P>
INLINE void block2(std::integer_sequence<int, P...>, const uint8_t* const* blk, const float* const* xb,
                   __m512 (&acc)[R][MT][A], const float* lut, const Tables& t, int64_t& left, Flush& flush) {
  (pair<B, KIND, 2 * P, R, MT, GROUPED>(blk, xb, acc, lut, t, left, flush), ...);
}
#endif

// Rows n0 .. n0+R-1 (clamped to the last row; only real rows are stored) x batch rows m0 .. m0+MT-1.
template <int B, int KIND, int R, int MT, bool GROUPED>
void tile(const Layer& L, const Call& c, int64_t n0, int64_t m0) {
  const int64_t K = L.K, G = L.G, step = L.block_step(n0);
  int64_t rows[R];
  const uint8_t* blk[R];
  for (int r = 0; r < R; ++r) {
    rows[r] = std::min(n0 + r, L.N - 1);
    blk[r] = L.row_blocks(rows[r]);
  }
  __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
  if constexpr (KIND != kLinear && B <= 4) table_vectors(L, lo, hi);  // the tail looks pow2 up too
  const float offset = KIND == kLinear ? L.lut[0] : 0.0f;
  constexpr bool W = wide_blocks(KIND, B);
#if BITSWEEP_AVX512
  Tables t;
  if constexpr (W && KIND != kLinear)
    for (int i = 0; i < 2; ++i) t.t[i] = _mm512_load_ps(c.table + 16 * i);
  using Acc = std::conditional_t<W, __m512, __m256>;
#else
  using Acc = __m256;
#endif
  constexpr int A = chains<R, MT>();
  Acc acc[R][MT][A];
  float total[R][MT] = {}, rest[R][MT] = {};
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m)
      for (int a = 0; a < A; ++a) acc[r][m][a] = acc_zero<Acc>();
  const int64_t per_group = L.group / 8;
  int64_t g = 0, left = per_group;
  auto flush = [&]() {
    for (int r = 0; r < R; ++r) {
      const float s = L.scale[rows[r] * G + g], z = L.zero[rows[r] * G + g];
      for (int m = 0; m < MT; ++m) {
        Acc sum = acc[r][m][0];
        for (int a = 1; a < A; ++a) sum = acc_add(sum, acc[r][m][a]);
        total[r][m] += s * (float(acc_sum(sum) * c.post) + rest[r][m] + (offset - z) * c.xsum[(m0 + m) * G + g]);
        for (int a = 0; a < A; ++a) acc[r][m][a] = acc_zero<Acc>();
        rest[r][m] = 0.0f;
      }
    }
    ++g;
    left = per_group;
  };
  const float* xb[MT];
  for (int64_t b = 0; b < L.nblocks; ++b) {
    for (int64_t line = 0; line < step; line += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(blk[0]) + kPrefetchL2 + line, _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(blk[0]) + kPrefetchL1 + line, _MM_HINT_T0);
    }
    for (int m = 0; m < MT; ++m) xb[m] = c.xs + (m0 + m) * K + b * kBlock;
#if BITSWEEP_AVX512
    if constexpr (W)
      block2<B, KIND, R, MT, GROUPED>(std::make_integer_sequence<int, 16>{}, blk, xb, acc, L.lut, t, left, flush);
    else
#endif
      block<B, KIND, R, MT, GROUPED>(std::make_integer_sequence<int, 32>{}, blk, xb, acc, L.lut, lo, hi, left,
                                     flush);
    for (int r = 0; r < R; ++r) blk[r] += step;
  }
  // The tail: eight codes at a time from the bitstream (true levels), then the last < 8 one by one.
  const int64_t k0 = L.nblocks * kBlock, chunks = L.rest / 8;
  for (int64_t q = 0; q < chunks; ++q) {
    __m256 xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm256_loadu_ps(c.xs + (m0 + m) * K + k0 + 8 * q);
    for (int r = 0; r < R; ++r) {
      const uint64_t w = stream_word(L.tail, (rows[r] * L.rest + 8 * q) * B);
      const __m256 v = levels8<B, KIND>(codes8<B>(w), L.lut, lo, hi);
      for (int m = 0; m < MT; ++m) acc[r][m][0] = acc_fmadd8(v, xv[m], acc[r][m][0]);
    }
    if (GROUPED && --left == 0) flush();
  }
  for (int64_t k = chunks * 8; k < L.rest; ++k)
    for (int r = 0; r < R; ++r) {
      const uint32_t u = uint32_t(stream_word(L.tail, (rows[r] * L.rest + k) * B)) & ((1u << B) - 1);
      const float lev = KIND == kLinear ? float(u) : L.lut[u];
      for (int m = 0; m < MT; ++m) rest[r][m] += lev * c.x[(m0 + m) * K + k0 + k];
    }
  if (g < G) flush();
  for (int r = 0; r < R; ++r)
    if (n0 + r < L.N)
      for (int m = 0; m < MT; ++m) c.y[(m0 + m) * L.N + n0 + r] = total[r][m];
}

template <int B, int KIND, bool GROUPED>
void linear_rows(const Layer& L, const Call& c, int64_t M) {
  at::parallel_for(0, (L.N + 3) / 4, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {
        tile<B, KIND, 2, 4, GROUPED>(L, c, 4 * t, m);
        if (4 * t + 2 < L.N) tile<B, KIND, 2, 4, GROUPED>(L, c, 4 * t + 2, m);
      }
      for (; m < M; ++m) tile<B, KIND, 4, 1, GROUPED>(L, c, 4 * t, m);
    }
  });
}

template <int B>
void dispatch_kind(int kind, const Layer& L, const Call& c, int64_t M) {
  const bool grouped = L.G > 1;
#define RUN(KIND) return grouped ? linear_rows<B, KIND, true>(L, c, M) : linear_rows<B, KIND, false>(L, c, M)
  if (kind == kLinear) RUN(kLinear);
  if constexpr (B >= 4) {
    if (kind == kPow2) RUN(kPow2);
  }
  RUN(kTable);
#undef RUN
}

// Whether lut[u] == lut[0] + u for every u (asymmetric and symmetric tables): no lookup needed.
bool is_linear(const float* lut, int B) {
  for (int u = 0; u < (1 << B); ++u)
    if (lut[u] != lut[0] + float(u)) return false;
  return true;
}

// Whether lut is exactly the pow2 scheme's: 0 at u = L, else sign(u - L) * 2^(|u - L| - L).
bool is_pow2(const float* lut, int B) {
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

Layer make_layer(const torch::Tensor& prepared, int64_t N, int64_t K, int64_t bits, const torch::Tensor& lut,
                 const torch::Tensor& scale, const torch::Tensor& zero, int64_t group) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8");
  TORCH_CHECK(N >= 0 && K > 0 && group > 0, "bad shape");
  const int64_t G = (K + group - 1) / group, nblocks = K / kBlock;
  TORCH_CHECK(prepared.dtype() == torch::kUInt8 && prepared.is_contiguous() && prepared.dim() == 1 &&
                  prepared.numel() == prepared_bytes(N, K, bits),
              "prepared codes must be prepare()'s output for this shape and width");
  TORCH_CHECK(lut.dtype() == torch::kFloat32 && lut.is_contiguous() && lut.numel() == (int64_t(1) << bits),
              "lut must hold 2^bits float32 levels");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * G,
              "scale must be float32 [N, groups]");
  TORCH_CHECK(zero.dtype() == torch::kFloat32 && zero.is_contiguous() && zero.numel() == N * G,
              "zero point must be float32 [N, groups]");
  const uint8_t* data = prepared.data_ptr<uint8_t>();
  return Layer{data, data + N * nblocks * 32 * bits, N, K, bits, nblocks, K % kBlock, group, G,
               lut.data_ptr<float>(), scale.data_ptr<float>(), zero.data_ptr<float>()};
}

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

}  // namespace

// The kernels' layout (see the top of this file) from the file's: one LSB-first bitstream of all codes.
torch::Tensor prepare(torch::Tensor data, int64_t N, int64_t K, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8 && N >= 0 && K > 0, "bad shape or width");
  TORCH_CHECK(data.dtype() == torch::kUInt8 && data.is_contiguous() && data.dim() == 1 &&
                  data.numel() == (N * K * bits + 7) / 8,
              "packed data must be ceil(N*K*bits/8) uint8 bytes");
  auto out = torch::zeros({prepared_bytes(N, K, bits)}, torch::dtype(torch::kUInt8));
  const uint8_t* src = data.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  const int64_t total = data.numel(), nblocks = K / kBlock, rest = K % kBlock, mask = (1 << bits) - 1;
  uint8_t* tail = dst + N * nblocks * 32 * bits;
  const Layer L{dst, tail, N, K, bits, nblocks, rest, 1, 1, nullptr, nullptr, nullptr};
  // Threads take whole runs of 64 rows: 64 rows' tails end on a byte, so no byte is shared.
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t n = r0 * 64; n < std::min(N, r1 * 64); ++n) {
      uint8_t* row = const_cast<uint8_t*>(L.row_blocks(n));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t bit = (n * K + k) * bits, byte = bit >> 3;
        uint32_t w = 0;
        std::memcpy(&w, src + byte, std::min<int64_t>(4, total - byte));
        const uint32_t u = (w >> (bit & 7)) & mask;
        if (k < nblocks * kBlock) {
          const int64_t b = k / kBlock, i = k % kBlock / 8, j = k % 8, d = bits * i / 32, o = bits * i % 32;
          uint32_t* lane = reinterpret_cast<uint32_t*>(row + b * L.block_step(n) + d * 32 + j * 4);
          lane[0] |= u << o;
          if (o + bits > 32) lane[8] |= u >> (32 - o);
        } else {
          const int64_t obit = (n * rest + k - nblocks * kBlock) * bits;
          tail[obit >> 3] |= uint8_t(u << (obit & 7));
          if ((obit & 7) + bits > 8) tail[(obit >> 3) + 1] |= uint8_t(u >> (8 - (obit & 7)));
        }
      }
    }
  });
  return out;
}

torch::Tensor linear(torch::Tensor x, torch::Tensor prepared, int64_t N, int64_t K, int64_t bits, torch::Tensor lut,
                     bool linear_lut, torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const Layer L = make_layer(prepared, N, K, bits, lut, scale, zero, group);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  TORCH_CHECK(group % 8 == 0 || L.G == 1, "the fused kernel needs groups of a multiple of 8 weights");
  x = x.contiguous();
  const int64_t M = x.size(0), G = L.G;
  const float* xp = x.data_ptr<float>();
  auto y = torch::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const int kind = linear_lut ? kLinear : bits >= 4 && is_pow2(L.lut, bits) ? kPow2 : kTable;
  // Scale x so that x', the levels and every product and sum stay normal floats whatever the CPU's
  // denormal modes (|x| < 2^e): linear levels u * 2^p take x * 2^(S - p) with S = 32 - e (products
  // x * u * 2^S); pow2 levels 2^(|c| - 127) take x * 2^(127 - L - a), products x * 2^(|c| - L - a),
  // with a as small as keeps x' below 2^128 and the sums of the largest products below 2^127.
  float top = 0.0f;
  for (int64_t i = 0; i < M * K; ++i) top = std::max(top, std::fabs(xp[i]));
  int e = 0;
  if (std::isfinite(top)) std::frexp(top, &e);
  int shift = 0;
  double post = 1.0;
  if (kind == kLinear) {
    shift = 32 - e;
    post = std::ldexp(1.0, -shift);
  } else if (kind == kPow2) {
    const int levels = (1 << (bits - 1)) - 1, a = e - std::min(levels, 100);
    shift = 127 - levels - a;
    post = std::ldexp(1.0, a);
  }
  auto xsum = torch::empty({M, G}, x.options());
  auto xs = torch::empty({M, K}, x.options());
  float* sp = xsum.data_ptr<float>();
  float* xsp = xs.data_ptr<float>();
  // In double: a factor alone may lie outside float's range; x times it does not.
  double factor[32];
  for (int i = 0; i < 32; ++i) factor[i] = slot_factor(kind, bits, i, shift);
  const double tail_factor = 1.0 / post;
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xp + m * K;
    float* xo = xsp + m * K;
    for (int64_t k = 0; k < L.nblocks * kBlock; ++k) xo[k] = float(xr[k] * factor[k % kBlock / 8]);
    for (int64_t k = L.nblocks * kBlock; k < K; ++k) xo[k] = float(xr[k] * tail_factor);
    for (int64_t g = 0; g < G; ++g) {
      float sum = 0.0f;
      for (int64_t k = g * group; k < std::min(K, (g + 1) * group); ++k) sum += xr[k];
      sp[m * G + g] = sum;
    }
  }
  Call c{xp, xsp, sp, post, y.data_ptr<float>(), {}};
  for (int u = 0; u < 32; ++u) {
    const int v = u % (1 << bits), levels = (1 << (bits - 1)) - 1, cc = v - levels;
    if (kind == kPow2) {
      const uint32_t b = (uint32_t(std::abs(cc)) << 23) | (cc < 0 ? 0x80000000u : 0u);
      std::memcpy(c.table + u, &b, 4);
    } else {
      c.table[u] = L.lut[v];
    }
  }
  switch (bits) {
    case 2: dispatch_kind<2>(kind, L, c, M); break;
    case 3: dispatch_kind<3>(kind, L, c, M); break;
    case 4: dispatch_kind<4>(kind, L, c, M); break;
    case 5: dispatch_kind<5>(kind, L, c, M); break;
    case 6: dispatch_kind<6>(kind, L, c, M); break;
    case 7: dispatch_kind<7>(kind, L, c, M); break;
    case 8: dispatch_kind<8>(kind, L, c, M); break;
  }
  return y;
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

torch::Tensor decode(torch::Tensor prepared, int64_t N, int64_t K, int64_t bits, torch::Tensor lut,
                     torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const Layer L = make_layer(prepared, N, K, bits, lut, scale, zero, group);
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  decode_range(L, w.data_ptr<float>(), 0, N);
  return w;
}

// x @ W.T for large batches: W decoded a slice of rows at a time into a buffer that stays in cache,
// each slice multiplied by the BLAS straight into its columns of y, so the fp32 weight never goes to
// memory and y is never transposed or copied.
torch::Tensor linear_decoded(torch::Tensor x, torch::Tensor prepared, int64_t N, int64_t K, int64_t bits,
                             torch::Tensor lut, torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const Layer L = make_layer(prepared, N, K, bits, lut, scale, zero, group);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t rows = std::min(N, std::max<int64_t>(4, (kChunkBytes / (4 * K)) & ~int64_t(3)));
  auto y = torch::empty({x.size(0), N}, x.options());
  auto w = torch::empty({rows, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    decode_range(L, w.data_ptr<float>(), n0, n1);
    auto out = y.narrow(1, n0, n1 - n0);
    at::mm_out(out, x, w.narrow(0, 0, n1 - n0).t());
  }
  return y;
}

// The widest vectors the Linear kernel was compiled for: 512 (AVX-512) or 256 (AVX2).
int64_t vector_bits() { return BITSWEEP_AVX512 ? 512 : 256; }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_bits", &vector_bits, "512 where the kernels were compiled for AVX-512, else 256 (AVX2)");
  m.def("prepare", &prepare, "the kernels' layout from a packed bitstream");
  m.def("linear", &linear, "x @ W.T for packed n-bit W");
  m.def("decode", &decode, "float32 W from packed n-bit codes");
  m.def("linear_decoded", &linear_decoded, "x @ W.T for packed n-bit W, decoded slice by slice (large batches)");
}

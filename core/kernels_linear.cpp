// bitsweep's fused Linear kernel: the levels unpacked from the codes in registers and multiplied into
// the accumulators, never written to memory (layout and arithmetic: kernels.h).
#include <ATen/Parallel.h>

#include "kernels.h"

namespace bitsweep_kernels {

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

void linear_rows_by_width(int bits, int kind, const Layer& L, const Call& c, int64_t M) {
  switch (bits) {
    case 2: dispatch_kind<2>(kind, L, c, M); break;
    case 3: dispatch_kind<3>(kind, L, c, M); break;
    case 4: dispatch_kind<4>(kind, L, c, M); break;
    case 5: dispatch_kind<5>(kind, L, c, M); break;
    case 6: dispatch_kind<6>(kind, L, c, M); break;
    case 7: dispatch_kind<7>(kind, L, c, M); break;
    case 8: dispatch_kind<8>(kind, L, c, M); break;
  }
}

}  // namespace bitsweep_kernels

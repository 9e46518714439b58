// The Python bindings of bitsweep's CPU kernels for packed n-bit weights (kernels.h says how codes are laid
// out and how levels are made): checks of what Python passes, the kernels' layout made from a packed
// file's bitstream, and the entry points that run kernels_linear.cpp's and kernels_decode.cpp's code.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include "kernels.h"

using namespace bitsweep_kernels;

namespace {

// The width and its table of levels, once checked.
const float* checked_table(const torch::Tensor& lut, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "bits must be 2..8");
  TORCH_CHECK(lut.dtype() == torch::kFloat32 && lut.is_contiguous() && lut.numel() == (int64_t(1) << bits),
              "lut must hold 2^bits float32 levels");
  return lut.data_ptr<float>();
}

// The layer a call describes, once its tensors are checked.
Layer make_layer(const torch::Tensor& prepared, int64_t N, int64_t K, int64_t bits, const torch::Tensor& lut,
                 const torch::Tensor& scale, const torch::Tensor& zero, int64_t group) {
  const float* levels = checked_table(lut, bits);
  TORCH_CHECK(N >= 0 && K > 0 && group > 0, "bad shape");
  const int64_t G = (K + group - 1) / group, nblocks = K / kBlock;
  TORCH_CHECK(prepared.dtype() == torch::kUInt8 && prepared.is_contiguous() && prepared.dim() == 1 &&
                  prepared.numel() == prepared_bytes(N, K, bits),
              "prepared codes must be prepare()'s output for this shape and width");
  TORCH_CHECK(scale.dtype() == torch::kFloat32 && scale.is_contiguous() && scale.numel() == N * G,
              "scale must be float32 [N, groups]");
  TORCH_CHECK(zero.dtype() == torch::kFloat32 && zero.is_contiguous() && zero.numel() == N * G,
              "zero point must be float32 [N, groups]");
  const uint8_t* data = prepared.data_ptr<uint8_t>();
  return Layer{data, data + N * nblocks * 32 * bits, N, K, bits, nblocks, K % kBlock, group, G, levels,
               scale.data_ptr<float>(), zero.data_ptr<float>()};
}

// How the Linear kernel makes levels from codes with this table (kernels.h's Kind).
int level_kind(const float* lut, int64_t bits, bool linear_lut) {
  return linear_lut ? kLinear : bits >= 4 && is_pow2(lut, bits) ? kPow2 : kTable;
}

}  // namespace

// The kernels' layout (kernels.h) from the file's: one LSB-first bitstream of all codes.
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
  const int kind = level_kind(L.lut, bits, linear_lut);
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
  linear_rows_by_width(bits, kind, L, c, M);
  return y;
}

torch::Tensor decode(torch::Tensor prepared, int64_t N, int64_t K, int64_t bits, torch::Tensor lut,
                     torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const Layer L = make_layer(prepared, N, K, bits, lut, scale, zero, group);
  auto w = torch::empty({N, K}, torch::dtype(torch::kFloat32));
  decode_range(L, w.data_ptr<float>(), 0, N);
  return w;
}

// x @ W.T for large batches: W decoded a slice of rows at a time into a buffer that stays in cache, each
// slice multiplied by the BLAS straight into its part of y. The BLAS packs x again for each slice, so a
// slice holds at least eight times x's floats. Up to kTransposedMaxRows rows of x, a W of several slices
// is multiplied as W x.T into rows of y.T, transposed once at the end: each slice's output is contiguous
// and W's rows are the BLAS's A as stored (slices of y's columns ran 10-90 % slower than one whole fp32
// product with AVX-512). With more rows of x, or one slice, x W.T into y's columns is the faster.
torch::Tensor linear_decoded(torch::Tensor x, torch::Tensor prepared, int64_t N, int64_t K, int64_t bits,
                             torch::Tensor lut, torch::Tensor scale, torch::Tensor zero, int64_t group) {
  const Layer L = make_layer(prepared, N, K, bits, lut, scale, zero, group);
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K, "x must be float32 [M, K]");
  x = x.contiguous();
  const int64_t M = x.size(0);
  const int64_t rows = std::min(N, std::max<int64_t>({4, kChunkBytes / (4 * K), 8 * M}) & ~int64_t(3));
  const bool transposed = rows < N && M <= kTransposedMaxRows;
  auto y = transposed ? torch::empty({N, M}, x.options()) : torch::empty({M, N}, x.options());
  auto w = torch::empty({rows, K}, x.options());
  for (int64_t n0 = 0; n0 < N; n0 += rows) {
    const int64_t n1 = std::min(N, n0 + rows);
    decode_range(L, w.data_ptr<float>(), n0, n1);
    const auto slice = w.narrow(0, 0, n1 - n0);
    if (transposed) {
      auto out = y.narrow(0, n0, n1 - n0);
      at::mm_out(out, slice, x.t());
    } else {
      auto out = y.narrow(1, n0, n1 - n0);
      at::mm_out(out, x, slice.t());
    }
  }
  return transposed ? y.t().contiguous() : y;
}

// The widest vectors the Linear kernel was compiled for: 512 (AVX-512) or 256 (AVX2).
int64_t vector_bits() { return BITSWEEP_AVX512 ? 512 : 256; }

// Whether the Linear kernel's blocks run on 512-bit vectors for this width and table.
bool runs_wide(torch::Tensor lut, int64_t bits, bool linear_lut) {
  return wide_blocks(level_kind(checked_table(lut, bits), bits, linear_lut), int(bits));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vector_bits", &vector_bits, "512 where the kernels were compiled for AVX-512, else 256 (AVX2)");
  m.def("wide_blocks", &runs_wide, "whether the Linear kernel's blocks run on 512-bit vectors for this table");
  m.def("prepare", &prepare, "the kernels' layout from a packed bitstream");
  m.def("linear", &linear, "x @ W.T for packed n-bit W");
  m.def("decode", &decode, "float32 W from packed n-bit codes");
  m.def("linear_decoded", &linear_decoded, "x @ W.T for packed n-bit W, decoded slice by slice (large batches)");
}

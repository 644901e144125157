// CPU kernels of adafuse::lora_moe_linear (stacked experts) and adafuse::lora_moe_linear_lists
// (one tensor per expert), registered for the CPU dispatch key.
//
// Why C++: on the 2-core CPU every ATen call from Python costs ~4 us, and the adapter of one
// decode token is ~10 such calls (~40-60 us) around ~128 KB of expert weights that take ~5 us to
// read. Here the whole op is one dispatcher call: the base linear (for decode, float32 on AVX-512,
// and bfloat16 on AVX-512 CPUs other than Intel's: computed here, in the same pass over the output
// rows as the adapter; otherwise through ATen's oneDNN/MKL), the chosen experts in plain loops
// over their rows, read in place wherever they live (a stacked tensor, a transposed view of one,
// or one tensor per expert), never gathered or stacked.
//
// Definition and shapes: adafuse_compile/kernels/reference.py. x [T, in], weight [out, in],
// bias [out] or undefined, A [E or 1, r, in], B [E, out, r] (or lists of [r, in] / [out, r]),
// idx [T, k] int64, g [T, k] floating.
//
// Built with -O3 -march=native -fopenmp (cpu_extension.py): the loops below are written so that
// the compiler vectorizes them (independent partial sums, unit-stride inner loops, a compile-time
// rank for the short dot products of the expand), and at::parallel_for runs on torch's OpenMP
// threads (without -fopenmp it is a serial loop: it was, unnoticed, until 2026-11-30).

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <utility>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <cpuid.h>
#include <immintrin.h>
#define ADAFUSE_AVX2 1
#if defined(__AVX512F__)
#define ADAFUSE_AVX512 1
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define ADAFUSE_AVX512_BF16 1  // bfloat16 rows widened to float32 (masked 16-bit loads)
#endif
#endif
#endif

namespace adafuse {
namespace {

// Where each expert's factors live: A_e [r, in] and B_e [out, r] as one pointer per expert plus
// the two matrices' strides, one of which is 1 (a row-major or a transposed matrix).
template <typename scalar_t>
struct Factors {
  std::vector<const scalar_t*> A, B;  // A holds one pointer when every expert shares one A
  int64_t a_row, a_col, b_row, b_col, r;
  std::vector<at::Tensor> owned;      // copies made for strides we do not read in place
};

// t, or a contiguous copy when neither of its last two dimensions has unit stride.
at::Tensor unit_stride(const at::Tensor& t, std::vector<at::Tensor>& owned) {
  if (t.stride(-1) == 1 || t.stride(-2) == 1) return t;
  owned.push_back(t.contiguous());
  return owned.back();
}

template <typename scalar_t>
Factors<scalar_t> stacked_factors(const at::Tensor& A, const at::Tensor& B) {
  Factors<scalar_t> f;
  const at::Tensor a = unit_stride(A, f.owned), b = unit_stride(B, f.owned);
  for (int64_t e = 0; e < a.size(0); ++e) f.A.push_back(a.const_data_ptr<scalar_t>() + e * a.stride(0));
  for (int64_t e = 0; e < b.size(0); ++e) f.B.push_back(b.const_data_ptr<scalar_t>() + e * b.stride(0));
  f.a_row = a.stride(1), f.a_col = a.stride(2), f.b_row = b.stride(1), f.b_col = b.stride(2), f.r = b.size(2);
  return f;
}

template <typename scalar_t>
Factors<scalar_t> listed_factors(at::TensorList As, at::TensorList Bs) {
  Factors<scalar_t> f;
  // One pair of strides serves all experts: unless every expert has the same unit-stride
  // layout, they are all read from contiguous copies.
  auto gather = [&](at::TensorList ts, std::vector<const scalar_t*>& ptrs, int64_t& row, int64_t& col) {
    bool same = ts[0].stride(0) == 1 || ts[0].stride(1) == 1;
    for (const at::Tensor& t : ts) same = same && t.strides() == ts[0].strides();
    for (const at::Tensor& t : ts) {
      if (!same) f.owned.push_back(t.contiguous());
      ptrs.push_back((same ? t : f.owned.back()).template const_data_ptr<scalar_t>());
    }
    const at::Tensor& first = same ? ts[0] : f.owned.back();
    row = first.stride(0), col = first.stride(1);
  };
  gather(As, f.A, f.a_row, f.a_col);
  gather(Bs, f.B, f.b_row, f.b_col);
  f.r = Bs[0].size(1);
  return f;
}

// Dot product with 16 independent partial sums (one or two vector registers, no fast-math) and
// a pairwise reduction of them.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot(const a_t* a, const b_t* b, int64_t n) {
  acc_t part[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int l = 0; l < 16; ++l) part[l] += static_cast<acc_t>(a[i + l]) * static_cast<acc_t>(b[i + l]);
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  for (int w = 8; w > 0; w /= 2) {
    for (int l = 0; l < w; ++l) part[l] += part[l + w];
  }
  return part[0];
}

#ifdef ADAFUSE_AVX2
// The sums of eight 8-lane vectors, as one vector: [sum v[0], ..., sum v[7]].
inline __m256 sum8x8(const __m256* v) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// Eight rows of A_e against x in one pass: eight independent accumulators (one transposing
// reduction at the end) and eight rows streaming at once. Measured (the 28 sites of the small
// model in turn, 8 tokens, timers inside the op): the shrink 14.8-15.4 us per call one row at a
// time (one dependency chain) against 10.4-11.5 us.
void shrink8_avx2(const float* A, int64_t a_row, const float* x, int64_t in, float c, float* h) {
  __m256 v[8];
  for (int l = 0; l < 8; ++l) v[l] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= in; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    for (int l = 0; l < 8; ++l) v[l] = _mm256_fmadd_ps(_mm256_loadu_ps(A + l * a_row + i), xv, v[l]);
  }
  alignas(32) float s[8];
  _mm256_store_ps(s, sum8x8(v));
  for (int l = 0; l < 8; ++l) {
    for (int64_t j = i; j < in; ++j) s[l] += A[l * a_row + j] * x[j];
    h[l] = c * s[l];
  }
}
#endif

// h[q] = c * (A_e x)[q] for one token and one chosen expert.
template <typename scalar_t, typename acc_t>
void shrink(const Factors<scalar_t>& f, const scalar_t* Ae, const scalar_t* x, int64_t in, acc_t c, acc_t* h) {
#ifdef ADAFUSE_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (f.a_col == 1 && f.r % 8 == 0) {
      for (int64_t q = 0; q < f.r; q += 8) shrink8_avx2(Ae + q * f.a_row, f.a_row, x, in, c, h + q);
      return;
    }
  }
#endif
  if (f.a_col == 1) {  // A_e rows contiguous: r dot products
    for (int64_t q = 0; q < f.r; ++q) h[q] = c * dot<acc_t>(Ae + q * f.a_row, x, in);
    return;
  }
  for (int64_t q = 0; q < f.r; ++q) h[q] = 0;  // A_e stored [in, r]: one axpy over the rank per input
  for (int64_t i = 0; i < in; ++i) {
    const scalar_t* col = Ae + i * f.a_col;
    const acc_t xi = static_cast<acc_t>(x[i]);
    for (int64_t q = 0; q < f.r; ++q) h[q] += xi * static_cast<acc_t>(col[q]);
  }
  for (int64_t q = 0; q < f.r; ++q) h[q] *= c;
}

// acc[o] = sum_j B_j[o, :] . h_j for B_j rows contiguous, with the rank R known at compile time
// (the per-row dot is then a few vector FMAs and one reduction).
template <int R, typename scalar_t, typename acc_t>
void expand_rows_fixed(const scalar_t* const* Bj, const acc_t* h, int64_t k, int64_t out, int64_t b_row, acc_t* acc) {
  for (int64_t o = 0; o < out; ++o) {
    acc_t v[R] = {0};
    for (int64_t j = 0; j < k; ++j) {
      const scalar_t* row = Bj[j] + o * b_row;
      const acc_t* hj = h + j * R;
      for (int q = 0; q < R; ++q) v[q] += static_cast<acc_t>(row[q]) * hj[q];
    }
    for (int w = R / 2; w > 0; w /= 2) {  // pairwise: a shuffle tree, not a serial chain
      for (int q = 0; q < w; ++q) v[q] += v[q + w];
    }
    acc[o] = v[0];
  }
}

#ifdef ADAFUSE_AVX2
// expand_rows_fixed for float with r % 8 == 0, eight output rows at a time: 8-lane products of
// each row with h, then one transposing reduction for the eight rows (a per-row reduction would
// cost as much as the products).
void expand_rows_avx2(const float* const* Bj, const float* h, int64_t k, int64_t r, int64_t out, int64_t b_row,
                      float* acc) {
  int64_t o = 0;
  for (; o + 8 <= out; o += 8) {
    __m256 v[8];
    for (int l = 0; l < 8; ++l) v[l] = _mm256_setzero_ps();
    for (int64_t j = 0; j < k; ++j) {
      for (int64_t q = 0; q < r; q += 8) {
        const __m256 hv = _mm256_loadu_ps(h + j * r + q);
        const float* row = Bj[j] + o * b_row + q;
        for (int l = 0; l < 8; ++l) v[l] = _mm256_fmadd_ps(_mm256_loadu_ps(row + l * b_row), hv, v[l]);
      }
    }
    _mm256_storeu_ps(acc + o, sum8x8(v));
  }
  for (; o < out; ++o) {
    float s = 0;
    for (int64_t j = 0; j < k; ++j) s += dot<float>(Bj[j] + o * b_row, h + j * r, r);
    acc[o] = s;
  }
}
#endif

#ifdef ADAFUSE_AVX512
// The types whose base linear the kernel computes itself: float32, and bfloat16 rows widened to
// float32 (accumulated in float32, rounded once, as ATen's bfloat16 linear does).
template <typename scalar_t>
constexpr bool kOwnBase = std::is_same_v<scalar_t, float>
#ifdef ADAFUSE_AVX512_BF16
                          || std::is_same_v<scalar_t, at::BFloat16>
#endif
    ;

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
#ifdef ADAFUSE_AVX512_BF16
inline __m512 widen(__m256i v) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16)); }
inline __m512 load16(const at::BFloat16* p) { return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const at::BFloat16* p, __mmask16 m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
#endif

// The base linear of rows [o0, o1) for TB tokens: y[t, o] = W[o] . x[t] + b[o], RB rows of W
// streaming at once against TB tokens (RB * TB independent 16-lane accumulators, each reduced
// once). The tail of `in` is a masked load. Prefetched meanwhile: the next RB rows, or for rows
// of 16 KB or more, the same rows 1 KB ahead. Measured (interleaved, 2 threads, E=8, k=2,
// the op over a chain of sites, same-rows prefetch against next-rows): 7B shapes (4096x11008 x2,
// 11008x4096, 4096x4096, r=16, float32) 0.93 at 1 token and 0.86 at 8; applied from 8 KB, the
// medium model's chain 0.99 and 1.03, the small one's 1.00 and 1.01.
template <int TB, int RB, typename scalar_t>
void base_rows_tb(const scalar_t* W, int64_t w_row, const scalar_t* x, int64_t in, const scalar_t* b, int64_t o0,
                  int64_t o1, scalar_t* y, int64_t out) {
  const int64_t full = in / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (in - full)) - 1);
  const bool long_rows = in * static_cast<int64_t>(sizeof(scalar_t)) >= 16384;
  auto bias = [&](int64_t o) { return b ? static_cast<float>(b[o]) : 0.0f; };
  int64_t o = o0;
  for (; o + RB <= o1; o += RB) {
    __m512 acc[RB][TB];
    for (int rr = 0; rr < RB; ++rr) {
      for (int t = 0; t < TB; ++t) acc[rr][t] = _mm512_setzero_ps();
    }
    const scalar_t* w0 = W + o * w_row;
    const scalar_t* ahead = long_rows ? w0 + 1024 / sizeof(scalar_t) : w0 + RB * w_row;
    for (int64_t i = 0; i < full; i += 16) {
      __m512 xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = load16(x + t * in + i);
      for (int rr = 0; rr < RB; ++rr) {
        _mm_prefetch(reinterpret_cast<const char*>(ahead + rr * w_row + i), _MM_HINT_T0);
        const __m512 wv = load16(w0 + rr * w_row + i);
        for (int t = 0; t < TB; ++t) acc[rr][t] = _mm512_fmadd_ps(wv, xv[t], acc[rr][t]);
      }
    }
    if (tail) {
      __m512 xv[TB];
      for (int t = 0; t < TB; ++t) xv[t] = load16(x + t * in + full, tail);
      for (int rr = 0; rr < RB; ++rr) {
        const __m512 wv = load16(w0 + rr * w_row + full, tail);
        for (int t = 0; t < TB; ++t) acc[rr][t] = _mm512_fmadd_ps(wv, xv[t], acc[rr][t]);
      }
    }
    for (int t = 0; t < TB; ++t) {
      for (int rr = 0; rr < RB; ++rr) {
        y[t * out + o + rr] = static_cast<scalar_t>(_mm512_reduce_add_ps(acc[rr][t]) + bias(o + rr));
      }
    }
  }
  for (; o < o1; ++o) {
    for (int t = 0; t < TB; ++t) y[t * out + o] = static_cast<scalar_t>(dot<float>(W + o * w_row, x + t * in, in) + bias(o));
  }
}

// The base linear of rows [o0, o1) for all T tokens, four at a time.
template <typename scalar_t>
void base_rows(const scalar_t* W, int64_t w_row, const scalar_t* x, int64_t T, int64_t in, const scalar_t* b,
               int64_t o0, int64_t o1, scalar_t* y, int64_t out) {
  for (int64_t t0 = 0; t0 < T; t0 += 4) {
    const scalar_t* xt = x + t0 * in;
    scalar_t* yt = y + t0 * out;
    switch (std::min<int64_t>(4, T - t0)) {
      case 1: base_rows_tb<1, 8>(W, w_row, xt, in, b, o0, o1, yt, out); break;
      case 2: base_rows_tb<2, 4>(W, w_row, xt, in, b, o0, o1, yt, out); break;
      case 3: base_rows_tb<3, 4>(W, w_row, xt, in, b, o0, o1, yt, out); break;
      default: base_rows_tb<4, 4>(W, w_row, xt, in, b, o0, o1, yt, out); break;
    }
  }
}
#endif

template <typename scalar_t, typename acc_t>
void expand(const Factors<scalar_t>& f, const scalar_t* const* Bj, const acc_t* h, int64_t k, int64_t out, acc_t* acc) {
  const int64_t r = f.r;
#ifdef ADAFUSE_AVX2
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (f.b_col == 1 && r % 8 == 0) return expand_rows_avx2(Bj, h, k, r, out, f.b_row, acc);
  }
#endif
  if (f.b_col == 1) {  // B_e stored [out, r]: a short dot per output row
    switch (r) {
      case 4: return expand_rows_fixed<4>(Bj, h, k, out, f.b_row, acc);
      case 8: return expand_rows_fixed<8>(Bj, h, k, out, f.b_row, acc);
      case 16: return expand_rows_fixed<16>(Bj, h, k, out, f.b_row, acc);
      case 32: return expand_rows_fixed<32>(Bj, h, k, out, f.b_row, acc);
      case 64: return expand_rows_fixed<64>(Bj, h, k, out, f.b_row, acc);
      default:
        for (int64_t o = 0; o < out; ++o) {
          acc_t s = 0;
          for (int64_t j = 0; j < k; ++j) s += dot<acc_t>(Bj[j] + o * f.b_row, h + j * r, r);
          acc[o] = s;
        }
        return;
    }
  }
  for (int64_t o = 0; o < out; ++o) acc[o] = 0;  // B_e stored [r, out]: one axpy over outputs per rank
  for (int64_t j = 0; j < k; ++j) {
    for (int64_t q = 0; q < r; ++q) {
      const scalar_t* col = Bj[j] + q * f.b_col;
      const acc_t hq = h[j * r + q];
      for (int64_t o = 0; o < out; ++o) acc[o] += hq * static_cast<acc_t>(col[o]);
    }
  }
}

// Chunks for `items` units of work holding `madds` multiply-adds in all: a second thread from
// ~16K multiply-adds (a wake-up costs a few us): a decode token's adapter of the small model
// (512x1376, k=2, r=8: 30K in all) stays on one thread, its base linear with it (700K) takes two.
int64_t chunks_for(int64_t items, int64_t madds) {
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), items, madds / 16384}));
}

// fn(b0, b1) over [0, items) in `chunks` parts. An OpenMP region is never entered for one chunk:
// even a one-thread region costs microseconds.
template <typename Fn>
void split(int64_t items, int64_t chunks, const Fn& fn) {
  if (chunks == 1) return fn(0, items);
  at::parallel_for(0, items, (items + chunks - 1) / chunks, fn);
}

// The base linear when the kernel computes it (fused_base): W's rows, their stride, the bias or null.
template <typename scalar_t>
struct Base {
  const scalar_t* W;
  int64_t w_row;
  const scalar_t* b;
};

// y[t] += scale * sum_j g[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t]), in two phases; with
// `base`, the second phase also computes y = x W^T + b first, block by block.
//
// 1. Shrink: h[n] = scale * g[n] * A_e x_t for every (token, choice) pair n, taken in order of
//    experts, so each chosen A_e is read from memory once per call and from L1 for its other
//    tokens.
// 2. Expand: y[t, o] += sum_j B_{e_tj}[o, :] . h[t k + j] by blocks of output rows (outer loop)
//    and tokens (inner loop), a block small enough that the chosen experts' rows of it stay in
//    L1: each chosen B_e is read from memory once per call, not once per token.
//
// Measured (`python benchmarks/bench_ops.py --model small`): the 28 sites of the small model's
// step in turn (hidden 512, intermediate 1376, E=8, k=2, r=8, fp32, each site's weights cold as
// in a model), adapter time per site = op - op with scale 0, medians of 15 interleaved rounds:
// 8 tokens 83 us with the former token-by-token loop (each token re-read its experts) against
// 53-65 us in four runs; one token 14 us in both. Both phases stall on loads (perf annotate).
// (Those figures, and the thread threshold below, date from builds without -fopenmp, in which
// both phases ran on one thread.)
//
// Threads split the pairs of phase 1 and the row blocks of phase 2. Every output is summed by
// one thread in one order, so the result does not depend on the number of threads.
template <typename scalar_t>
void add_chosen_experts(const at::Tensor& x, const Factors<scalar_t>& f, int64_t E, const at::Tensor& idx,
                        const at::Tensor& g, double scale, at::Tensor& y, const Base<scalar_t>* base = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), in = x.size(1), k = idx.size(1), out = y.size(1), r = f.r;
  const bool shared_A = f.A.size() == 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const acc_t* gp = g.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t pairs = T * k;
  for (int64_t n = 0; n < pairs; ++n) {
    TORCH_CHECK(ip[n] >= 0 && ip[n] < E, "idx[", n / k, ", ", n % k, "] = ", ip[n], " is not an expert (E = ", E, ")");
  }
  if (out == 0) return;  // nothing to add (and no row blocks to divide)

  std::vector<acc_t> h(pairs * r);
  std::vector<int64_t> order(pairs);
  for (int64_t n = 0; n < pairs; ++n) order[n] = n;
  if (!shared_A && pairs > 1) std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return ip[a] < ip[b]; });
  split(pairs, chunks_for(pairs, pairs * r * in), [&](int64_t b0, int64_t b1) {
    for (int64_t i = b0; i < b1; ++i) {
      const int64_t n = order[i];
      shrink<scalar_t, acc_t>(f, f.A[shared_A ? 0 : ip[n]], xp + (n / k) * in, in, gp[n] * static_cast<acc_t>(scale),
                              h.data() + n * r);
    }
  });

  // Rows per block: the chosen experts' rows of a block fill ~32 KB (L1 holds 48 KB here), and
  // every thread gets as many blocks.
  const int64_t chunks = chunks_for(out / 8, pairs * r * out + (base ? T * in * out : 0));
  const int64_t experts = std::min(E, pairs);
  const int64_t fit = std::max<int64_t>(8, 32768 / (experts * r * static_cast<int64_t>(sizeof(scalar_t))) / 8 * 8);
  const int64_t even = (std::max(chunks, (out + fit - 1) / fit) + chunks - 1) / chunks * chunks;
  const int64_t rows = ((out + even - 1) / even + 7) / 8 * 8;
  const int64_t blocks = (out + rows - 1) / rows;
  split(blocks, std::min(chunks, blocks), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> acc(rows);
    std::vector<const scalar_t*> Bj(k);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t o0 = b * rows, n_rows = std::min(rows, out - o0);
#ifdef ADAFUSE_AVX512
      if constexpr (kOwnBase<scalar_t>) {
        if (base) base_rows(base->W, base->w_row, xp, T, in, base->b, o0, o0 + n_rows, yp, out);
      }
#endif
      for (int64_t t = 0; t < T; ++t) {
        for (int64_t j = 0; j < k; ++j) Bj[j] = f.B[ip[t * k + j]] + o0 * f.b_row;
        expand<scalar_t, acc_t>(f, Bj.data(), h.data() + t * k * r, k, n_rows, acc.data());
        scalar_t* yt = yp + t * out + o0;
        for (int64_t o = 0; o < n_rows; ++o) yt[o] = static_cast<scalar_t>(static_cast<acc_t>(yt[o]) + acc[o]);
      }
    }
  });
}

#ifdef ADAFUSE_AVX512
// The kernel's base linear alone, for a call that adds no adapter (no expert chosen, or scale 0):
// the rows go in groups that start at multiples of 8, as in add_chosen_experts, so every output
// is summed in the same order there and here, and an adapter weighted by zero changes no bit.
template <typename scalar_t>
void base_only(const at::Tensor& x, const Base<scalar_t>& base, at::Tensor& y) {
  const int64_t T = x.size(0), in = x.size(1), out = y.size(1);
  if (out == 0) return;
  const at::Tensor xc = x.contiguous();
  const int64_t chunks = chunks_for(out / 8, T * in * out);
  const int64_t block = ((out + chunks - 1) / chunks + 7) / 8 * 8, blocks = (out + block - 1) / block;
  split(blocks, blocks, [&](int64_t b0, int64_t b1) {
    base_rows(base.W, base.w_row, xc.const_data_ptr<scalar_t>(), T, in, base.b, b0 * block,
              std::min(out, b1 * block), y.mutable_data_ptr<scalar_t>(), out);
  });
}
#endif

// Many (token, expert) pairs: every expert once through GEMMs, unchosen ones weighted by zero.
void add_experts_dense(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& idx, const at::Tensor& gs, at::Tensor& y) {
  const int64_t T = x.size(0), E = B.size(0), out = B.size(1), r = B.size(2);
  at::Tensor dense_g = at::zeros({T, E}, gs.options()).scatter_add_(1, idx, gs).unsqueeze(-1);
  at::Tensor h = A.size(0) == 1 ? at::matmul(x, A[0].t()).unsqueeze(1) * dense_g
                                : at::matmul(x, A.reshape({E * r, -1}).t()).view({T, E, r}) * dense_g;
  y.addmm_(h.reshape({T, E * r}), B.transpose(1, 2).reshape({E * r, out}));
}

void check_common(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& idx, const at::Tensor& g) {
  // Same conditions as check_lora_moe_args in lora_moe_linear.py (which the fake impls run).
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && idx.dim() == 2,
              "lora_moe_linear: expected x [T, in], weight [out, in], idx [T, k]");
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(x.size(1) == in, "x has ", x.size(1), " features, weight expects ", in);
  TORCH_CHECK(idx.size(0) == x.size(0), "idx has ", idx.size(0), " tokens, x ", x.size(0));
  TORCH_CHECK(g.sizes() == idx.sizes(), "g ", g.sizes(), " must match idx ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "g must be floating point, got ", g.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight is ", weight.scalar_type(), " but x is ", x.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be [", out, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias is ", bias->scalar_type(), " but x is ", x.scalar_type());
  }
}

// A as [E_A, r, in] and B as [E, out, r], given by their sizes (a list's first factor has no
// expert dimension: E_A = E = 1 for it, and no unsqueezed view is made per call for the check).
void check_factors(const at::Tensor& x, const at::Tensor& weight, at::IntArrayRef a, at::IntArrayRef b,
                   at::ScalarType a_type, at::ScalarType b_type) {
  const int64_t in = weight.size(1), out = weight.size(0);
  TORCH_CHECK(a.size() == 3 && b.size() == 3, "lora_moe_linear: expected A [E, r, in], B [E, out, r]");
  TORCH_CHECK(a[2] == in, "A has ", a[2], " input features, weight ", in);
  TORCH_CHECK(b[1] == out, "B has ", b[1], " outputs, weight ", out);
  TORCH_CHECK(a[1] == b[2], "A rank ", a[1], " != B rank ", b[2]);
  TORCH_CHECK(a[0] == b[0] || a[0] == 1, "A has ", a[0], " experts, B ", b[0]);
  TORCH_CHECK(a_type == x.scalar_type(), "A is ", a_type, " but x is ", x.scalar_type());
  TORCH_CHECK(b_type == x.scalar_type(), "B is ", b_type, " but x is ", x.scalar_type());
}

// Whether the kernel computes the base linear itself, in its pass over the output rows (each block
// of W's rows, then the same rows of the chosen experts' B), instead of MKL before it: float32
// (and bfloat16, below), unit-stride rows, a few tokens (decode) on a CPU with AVX-512.
//
// Measured (the 28 adapted linears of a model's step in turn, cold weights, E=8, k=2, r=8, fp32,
// 2 threads, interleaved rounds; `benchmarks/bench_ops.py --model` times the op this way), the op
// with MKL's base linear then the adapter, against with the base in the kernel, each as a ratio
// to MKL's base linear alone: small model (512 / 1376) 1 token 1.15 vs 1.04, 2 tokens 1.24 vs
// 1.07, 8 tokens 1.28 vs 0.96, 16 tokens 1.25 vs 0.84, 24 tokens 1.25 vs 0.93; medium model
// (1024 / 2816) 1 token 1.06 vs 0.97, 8 tokens 1.07 vs 0.64, 16 tokens 1.10 vs 0.68. The
// adapter's cost all but disappears into the pass over W (its rows follow W's in the same
// stream, and y is written once), and for a few tokens the kernel streams W faster than MKL's
// sgemm. Up to 32 tokens on Intel's CPUs, where more take ATen's linear, then the loops or the
// GEMMs (use_gemms).
//
// On other CPUs up to 1024 tokens, the loops with it: MKL runs slower there. Measured on a 2-core
// AMD EPYC (Zen 5, AVX-512, 32 MiB L3) VM, 2026-12-01, `bench_ops.py --model`, each site's
// weights from memory: MKL's base linears alone against the kernel's (the op at scale 0), small
// model 2855 vs 772 us at 1 token, 7567 vs 3411 at 32, 17247 vs 12925 at 128, 65252 vs 50459 at
// 512; medium 100131 vs 55651 at 64, 990475 vs 853733 at 1024. The op with its adapter, the
// kernel's base and loops against ATen's base and the GEMMs: small 8187 vs 13241 us at 64 tokens,
// 29810 vs 43299 at 256, 56278 vs 79797 at 512; medium 219713 vs 339841 at 256, 927282 vs
// 1100340 at 1024. One site (in = out = 1024 unless said, three copies of W cycled, us per call):
// E=8 k=2 r=64 T=256 3313 vs 5634, r=16 T=1024 8873 vs 12652, 4096x4096 r=16 T=64 9746 vs 15201;
// dense adapters tie: E=k=4 r=64 T=256 3916 vs 4106, E=k=2 r=128 T=512 7702 vs 7781. bfloat16
// (its rows widened to float32 in registers) on the same VM: the small model's 28 base linears
// 401-445 us at 1 token against 1104-1108 for ATen's (oneDNN), 863-903 against 1194-1206 at 8;
// the op with its adapter 571-574 and 1375-1447 us, against 1569 and 2001 with ATen's base; the
// base linears alone at 12 tokens 1158 vs 1328, at 16 1450 vs 1381, at 32 2645 vs 1854, and one
// 1024x1024 site with its adapter, kernel's base and loops against ATen's base and the GEMMs, 1857
// vs 832 us at 256 tokens: so bfloat16 up to 12 tokens (its loops are not the float32 ones). Not
// measured on Intel's CPUs beyond 32 tokens (the kernel was at about MKL's speed at 24-32 on the
// small model), nor in bfloat16 there, nor on other vendors' CPUs than this one.
#ifdef ADAFUSE_AVX512
bool intel_cpu() {
  static const bool intel = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return true;
    return ebx == 0x756e6547 && edx == 0x49656e69 && ecx == 0x6c65746e;  // "Genu" "ineI" "ntel"
  }();
  return intel;
}

// The most tokens the kernel's own base linear serves for this dtype on this CPU (0: none).
int64_t fused_base_max_tokens(at::ScalarType dtype) {
  if (dtype == at::kFloat) return intel_cpu() ? 32 : 1024;
#ifdef ADAFUSE_AVX512_BF16
  if (dtype == at::kBFloat16) return intel_cpu() ? 0 : 12;
#endif
  return 0;
}
#endif

bool fused_base(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
#ifdef ADAFUSE_AVX512
  const at::ScalarType dtype = x.scalar_type();
  const bool bias_ok = !(bias.has_value() && bias->defined()) ||
                       (bias->scalar_type() == dtype && bias->stride(0) == 1);
  const int64_t max_tokens = fused_base_max_tokens(dtype);
  return max_tokens > 0 && weight.scalar_type() == dtype && weight.stride(1) == 1 && x.size(0) <= max_tokens &&
         bias_ok;
#else
  return false;
#endif
}

// The loops do the chosen experts' arithmetic only; the GEMMs run every expert (E/k times the
// arithmetic) at the CPU's GEMM speed. Measured with OpenMP threads (2026-12-01, E=8, k=2, r=8,
// fp32, 2 threads, on the Intel VM, the op over ATen's linear alone, both with ATen's base linear,
// loops vs GEMMs, 7 rounds):
//   512x512    T=32 0.99 vs 1.55, T=64 1.48 vs 1.69, T=128 1.51 vs 1.71, T=256 1.48 vs 1.54, T=512 1.59 vs 1.50
//   512x1376   T=32 0.99 vs 1.37, T=64 1.26 vs 1.37, T=128 1.34 vs 1.41, T=256 1.34 vs 1.34, T=512 1.35 vs 1.31
//   1024x1024  T=32 0.94 vs 1.32, T=64 1.15 vs 1.28, T=128 1.17 vs 1.21, T=256 1.22 vs 1.25, T=512 1.22 vs 1.25
//   1024x2816  T=32 0.78 vs 1.14, T=64 1.13 vs 1.19, T=128 1.13 vs 1.17, T=256 1.16 vs 1.17, T=512 1.17 vs 1.15
// so GEMMs from T*k >= 64E (T=256 here). The switch was at T*k >= 8E (T=32) when the loops
// ran on one thread (built without -fopenmp); other dtypes keep it (not measured again). Where
// the kernel computes the base linear itself (fused_base) the loops serve every token count it
// takes (measured there).
bool use_gemms(int64_t T, int64_t k, int64_t E, at::ScalarType dtype) {
  return T * k >= (dtype == at::kFloat ? 64 : 8) * E;
}

// The base linear plus the chosen experts, whatever holds them: ``stacked()`` gives ``(A, B)``
// as stacked tensors for the GEMM path, ``factors<scalar_t>()`` the in-place view of them for
// the loops.
template <typename Stacked, typename Build>
at::Tensor base_plus_experts(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             const at::Tensor& idx, const at::Tensor& g, double scale, int64_t E, Stacked stacked,
                             Build factors) {
  const int64_t T = x.size(0), k = idx.size(1);
  const bool adapter = k > 0 && scale != 0.0, own_base = fused_base(x, weight, bias);
  if (T == 0 || (!adapter && !own_base)) return at::linear(x, weight, bias);
  if (adapter && !own_base && use_gemms(T, k, E, x.scalar_type())) {  // prefill: stacking experts held one tensor each is paid once for many tokens
    at::Tensor y = at::linear(x, weight, bias).contiguous();
    const auto [A, B] = stacked();
    add_experts_dense(x, A, B, idx, (g * scale).to(x.scalar_type()), y);
    return y;
  }
  // The loops: with the kernel's own base linear where it applies, else after ATen's.
  at::Tensor y = own_base ? at::empty({T, weight.size(0)}, x.options()) : at::linear(x, weight, bias).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_moe_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::optional<Base<scalar_t>> base;
    if (own_base) {
      base = Base<scalar_t>{weight.const_data_ptr<scalar_t>(), weight.stride(0),
                            bias.has_value() && bias->defined() ? bias->const_data_ptr<scalar_t>() : nullptr};
    }
#ifdef ADAFUSE_AVX512
    if constexpr (kOwnBase<scalar_t>) {
      if (!adapter) return base_only(x, *base, y);
    }
#endif
    add_chosen_experts<scalar_t>(x.contiguous(), factors.template operator()<scalar_t>(), E, idx.contiguous(),
                                 g.to(c10::CppTypeToScalarType<acc_t>::value).contiguous(), scale, y,
                                 base ? &*base : nullptr);
  });
  return y;
}

at::Tensor lora_moe_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& A, const at::Tensor& B, const at::Tensor& idx, const at::Tensor& g,
                               double scale) {
  check_common(x, weight, bias, idx, g);
  check_factors(x, weight, A.sizes(), B.sizes(), A.scalar_type(), B.scalar_type());
  return base_plus_experts(
      x, weight, bias, idx, g, scale, B.size(0), [&] { return std::make_pair(A, B); },
      [&]<typename scalar_t>() { return stacked_factors<scalar_t>(A, B); });
}

at::Tensor lora_moe_linear_lists_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, at::TensorList A, at::TensorList B,
                                     const at::Tensor& idx, const at::Tensor& g, double scale) {
  check_common(x, weight, bias, idx, g);
  const int64_t E = static_cast<int64_t>(B.size());
  TORCH_CHECK(E > 0 && (A.size() == B.size() || A.size() == 1), "lora_moe_linear_lists: ", A.size(),
              " A factors for ", E, " experts");
  for (const at::Tensor& a : A) {
    TORCH_CHECK(a.dim() == 2 && a.sizes() == A[0].sizes() && a.scalar_type() == x.scalar_type(),
                "every A must be [r, in] of x's dtype like A[0] ", A[0].sizes(), ", got ", a.sizes(), " ", a.scalar_type());
  }
  for (const at::Tensor& b : B) {
    TORCH_CHECK(b.dim() == 2 && b.sizes() == B[0].sizes() && b.scalar_type() == x.scalar_type(),
                "every B must be [out, r] of x's dtype like B[0] ", B[0].sizes(), ", got ", b.sizes(), " ", b.scalar_type());
  }
  check_factors(x, weight, {1, A[0].size(0), A[0].size(1)}, {1, B[0].size(0), B[0].size(1)}, A[0].scalar_type(),
                B[0].scalar_type());
  return base_plus_experts(
      x, weight, bias, idx, g, scale, E, [&] { return std::make_pair(at::stack(A), at::stack(B)); },
      [&]<typename scalar_t>() { return listed_factors<scalar_t>(A, B); });
}

// ---- The site with its router (adafuse::routed_lora_moe_linear) ----------------------------
//
// The decision of a linear top-k router, computed here instead of by four to six graph ops
// (router linear, softmax, top-k, renormalization): each is a call of a few microseconds at
// decode, and the router's tiny GEMV through MKL wakes the OpenMP team (~15 us per site in the
// small model's step, measured with perf: mkl sgemv_omp plus libgomp's barrier).
//
// Exactness. The experts chosen must be the ones eager chooses (passes/route.py matched the
// model's routing code to kernels/reference.py:topk_route). Our logits are dot products in
// another summation order than MKL's, so each may differ from eager's by rounding; both are
// within gamma_n * S_e of the exact value (S_e = sum_i |x_i w_ei|, gamma_n = n u / (1 - n u),
// u = 2^-24, any summation order, with or without FMA). So when the gap between the k-th and
// the (k+1)-th largest logit exceeds twice that bound plus a margin for the softmax's rounding,
// eager's top-k set is provably ours (a softmax is monotone and the margin keeps two
// probabilities from rounding together). Otherwise, for any non-finite value, and whenever
// float32 matmuls may run in reduced precision, the whole decision is made by the ATen calls of
// topk_route, which are eager's. The weights g then equal eager's up to rounding.

bool fp32_matmuls_exact() {
  auto& ctx = at::globalContext();
  auto reduced = [](at::Float32Precision p) { return p == at::Float32Precision::TF32 || p == at::Float32Precision::BF16; };
  return ctx.float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST &&
         !reduced(ctx.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL)) &&
         !reduced(ctx.float32Precision(at::Float32Backend::GENERIC, at::Float32Op::ALL));
}

// Fills idx [T, k] and g [T, k] (float32); false when the decision is not provably eager's.
bool route_inline(const at::Tensor& rx, const at::Tensor& Wr, const std::optional<at::Tensor>& br, int64_t k,
                  bool softmax_first, bool renorm, at::Tensor& idx, at::Tensor& g) {
  const int64_t T = rx.size(0), n = rx.size(1), E = Wr.size(0);
  const bool has_bias = br.has_value() && br->defined();
  if (rx.scalar_type() != at::kFloat || Wr.scalar_type() != at::kFloat || (has_bias && br->scalar_type() != at::kFloat) ||
      E > 64 || k < 1 || k > E || rx.stride(1) != 1 || Wr.stride(1) != 1 || (has_bias && br->stride(0) != 1) ||
      !fp32_matmuls_exact()) {
    return false;
  }
  const double u = std::ldexp(1.0, -24), gamma = (n + 1) * u / (1.0 - (n + 1) * u);
  const float* xp = rx.const_data_ptr<float>();
  const float* wp = Wr.const_data_ptr<float>();
  const float* bp = has_bias ? br->const_data_ptr<float>() : nullptr;
  // S_e = sum_i |x_i w_ei| <= |x| |w_e| (Cauchy-Schwarz): the bound from norms, one per expert
  // per call and one per token, instead of a second accumulation in every dot product.
  double wnorm = 0;
  for (int64_t e = 0; e < E; ++e) wnorm = std::max(wnorm, std::sqrt(static_cast<double>(dot<float>(wp + e * Wr.stride(0), wp + e * Wr.stride(0), n))));
  idx = at::empty({T, k}, rx.options().dtype(at::kLong));
  g = at::empty({T, k}, rx.options());
  int64_t* ip = idx.mutable_data_ptr<int64_t>();
  float* gp = g.mutable_data_ptr<float>();
  float l[64];
  int64_t order[64];
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = xp + t * rx.stride(0);
    double lmax_abs = 0, bmax = 0;
    for (int64_t e = 0; e < E; ++e) {
      l[e] = dot<float>(xt, wp + e * Wr.stride(0), n) + (bp ? bp[e] : 0.0f);
      if (!std::isfinite(l[e])) return false;
      lmax_abs = std::max(lmax_abs, static_cast<double>(std::fabs(l[e])));
      if (bp) bmax = std::max(bmax, static_cast<double>(std::fabs(bp[e])));
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order, order + std::min(k + 1, E), order + E, [&](int64_t a, int64_t b) { return l[a] > l[b]; });
    if (k < E) {
      // Ours and eager's logits are each within gamma * S of the exact ones (n + 1 terms with
      // the bias); the margin covers the softmax (subtracting the max, exp within a few ulp,
      // one division) and the rounding of the norms.
      const double S = 1.01 * std::sqrt(static_cast<double>(dot<float>(xt, xt, n))) * wnorm + bmax;
      const double gap = static_cast<double>(l[order[k - 1]]) - l[order[k]];
      if (!(gap > 4 * gamma * S + 64 * u * (1 + lmax_abs))) return false;
    }
    const float lmax = l[order[0]];
    float* gt = gp + t * k;
    if (softmax_first) {
      float z = 0;
      for (int64_t e = 0; e < E; ++e) z += std::exp(l[e] - lmax);
      float sum = 0;
      for (int64_t j = 0; j < k; ++j) sum += gt[j] = std::exp(l[order[j]] - lmax) / z;
      if (renorm) for (int64_t j = 0; j < k; ++j) gt[j] /= sum;
    } else {
      float z = 0;
      for (int64_t j = 0; j < k; ++j) z += gt[j] = std::exp(l[order[j]] - lmax);
      for (int64_t j = 0; j < k; ++j) gt[j] /= z;
    }
    for (int64_t j = 0; j < k; ++j) ip[t * k + j] = order[j];
  }
  return true;
}

at::Tensor routed_lora_moe_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias, const at::Tensor& router_input,
                                      const at::Tensor& router_weight, const std::optional<at::Tensor>& router_bias,
                                      at::TensorList A, at::TensorList B, int64_t k, bool softmax_first, bool renorm,
                                      std::optional<at::ScalarType> softmax_dtype,
                                      std::optional<at::ScalarType> gate_dtype, bool sorted, double scale) {
  TORCH_CHECK(router_input.dim() == 2 && router_input.size(0) == x.size(0) && router_weight.dim() == 2 &&
                  router_weight.size(1) == router_input.size(1),
              "routed_lora_moe_linear: router_input must be [T, in_r] with x's T and router_weight [E, in_r]");
  TORCH_CHECK(k >= 1 && k <= router_weight.size(0), "k=", k, " of ", router_weight.size(0), " experts");
  at::Tensor g, idx;
  const bool float_gate = (!softmax_dtype || *softmax_dtype == at::kFloat) && (!gate_dtype || *gate_dtype == at::kFloat);
  if (!(float_gate && route_inline(router_input, router_weight, router_bias, k, softmax_first, renorm, idx, g))) {
    // eager's calls, in kernels/reference.py:topk_route's order
    const at::Tensor logits = at::linear(router_input, router_weight, router_bias);
    if (softmax_first) {
      std::tie(g, idx) = at::topk(at::softmax(logits, -1, softmax_dtype), k, -1, true, sorted);
      if (renorm) g = g / g.sum(-1, true);
    } else {
      std::tie(g, idx) = at::topk(logits, k, -1, true, sorted);
      g = at::softmax(g, -1, softmax_dtype);
    }
    if (gate_dtype.has_value()) g = g.to(*gate_dtype);
  }
  if (B.size() == 1 && B[0].dim() == 3) return lora_moe_linear_cpu(x, weight, bias, A[0], B[0], idx, g, scale);
  return lora_moe_linear_lists_cpu(x, weight, bias, A, B, idx, g, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(adafuse, CPU, m) {
  m.impl("lora_moe_linear", &lora_moe_linear_cpu);
  m.impl("lora_moe_linear_lists", &lora_moe_linear_lists_cpu);
  m.impl("routed_lora_moe_linear", &routed_lora_moe_linear_cpu);
}

}  // namespace adafuse

// Under torch.no_grad() every call of a torch.library.custom_op passes through its Python
// autograd kernel first (~4.6 us a call here, 28 calls a decode step of the small model). The
// ops have no autograd formula (the passes leave sites that need gradients), so the C++
// not-implemented fallback serves the CPU's autograd key: it redispatches without Python, and
// still raises if a gradient is ever asked for.
TORCH_LIBRARY_IMPL(adafuse, AutogradCPU, m) {
  m.impl("lora_moe_linear", torch::autograd::autogradNotImplementedFallback());
  m.impl("lora_moe_linear_lists", torch::autograd::autogradNotImplementedFallback());
  m.impl("routed_lora_moe_linear", torch::autograd::autogradNotImplementedFallback());
}

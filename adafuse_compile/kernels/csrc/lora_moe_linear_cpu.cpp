// CPU kernel of adafuse::lora_moe_linear, registered for the CPU dispatch key.
//
// Why C++: on the 2-core CPU every ATen call from Python costs ~4 us, and the adapter of one
// decode token is ~10 such calls (~40-60 us) around ~128 KB of expert weights that take ~5 us to
// read. Here the whole op is one dispatcher call: the base linear through ATen (oneDNN/MKL), the
// chosen experts in plain loops over their rows (gathered in place, never copied).
//
// Definition and shapes: adafuse_compile/kernels/reference.py. x [T, in], weight [out, in],
// bias [out] or undefined, A [E or 1, r, in], B [E, out, r], idx [T, k] int64, g [T, k] floating.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace adafuse {
namespace {

// Dot product with 8 independent partial sums so the compiler vectorizes it without fast-math.
template <typename scalar_t, typename acc_t>
inline acc_t dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) {
      part[l] += static_cast<acc_t>(a[i + l]) * static_cast<acc_t>(b[i + l]);
    }
  }
  acc_t acc = 0;
  for (; i < n; ++i) acc += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  for (int l = 0; l < 8; ++l) acc += part[l];
  return acc;
}

// y[t] += scale * sum_j g[t, j] * B[idx[t, j]] @ (A[idx[t, j]] @ x[t]), token by token.
template <typename scalar_t>
void add_chosen_experts(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                        const at::Tensor& idx, const at::Tensor& g, double scale, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(0), in = x.size(1), k = idx.size(1);
  const int64_t E = B.size(0), out = B.size(1), r = B.size(2);
  const bool shared_A = A.size(0) == 1;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* Ap = A.const_data_ptr<scalar_t>();
  const scalar_t* Bp = B.const_data_ptr<scalar_t>();
  const int64_t* ip = idx.const_data_ptr<int64_t>();
  const acc_t* gp = g.const_data_ptr<acc_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();

  std::vector<acc_t> h(k * r);  // g * scale * (A_e x_t), the shrunk token
  for (int64_t t = 0; t < T; ++t) {
    const scalar_t* xt = xp + t * in;
    const int64_t* it = ip + t * k;
    for (int64_t j = 0; j < k; ++j) {
      TORCH_CHECK(it[j] >= 0 && it[j] < E, "idx[", t, ", ", j, "] = ", it[j], " is not an expert (E = ", E, ")");
      const scalar_t* Ae = Ap + (shared_A ? 0 : it[j]) * r * in;
      const acc_t c = gp[t * k + j] * static_cast<acc_t>(scale);
      for (int64_t q = 0; q < r; ++q) h[j * r + q] = c * dot<scalar_t, acc_t>(Ae + q * in, xt, in);
    }
    // Expand: each output row reads r contiguous values of each chosen B. Split across threads
    // only when a token has enough work (~64K multiply-adds): a wake-up costs ~10 us here.
    scalar_t* yt = yp + t * out;
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, k * r));
    at::parallel_for(0, out, grain, [&](int64_t o0, int64_t o1) {
      // Eight output rows at a time: eight independent accumulator chains instead of one
      // (without fast-math a single chain is latency bound: ~21 us for out=1024, k*r=16).
      int64_t o = o0;
      for (; o + 8 <= o1; o += 8) {
        acc_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* Bb = Bp + (it[j] * out + o) * r;  // 8 contiguous rows of B[e]
          const acc_t* hj = h.data() + j * r;
          for (int64_t q = 0; q < r; ++q) {
            for (int l = 0; l < 8; ++l) acc[l] += static_cast<acc_t>(Bb[l * r + q]) * hj[q];
          }
        }
        for (int l = 0; l < 8; ++l) yt[o + l] = static_cast<scalar_t>(static_cast<acc_t>(yt[o + l]) + acc[l]);
      }
      for (; o < o1; ++o) {
        acc_t acc = 0;
        for (int64_t j = 0; j < k; ++j) {
          const scalar_t* Bo = Bp + (it[j] * out + o) * r;
          for (int64_t q = 0; q < r; ++q) acc += static_cast<acc_t>(Bo[q]) * h[j * r + q];
        }
        yt[o] = static_cast<scalar_t>(static_cast<acc_t>(yt[o]) + acc);
      }
    });
  }
}

// Many (token, expert) pairs: every expert once through GEMMs, unchosen ones weighted by zero.
void add_experts_dense(const at::Tensor& x, const at::Tensor& A, const at::Tensor& B,
                       const at::Tensor& idx, const at::Tensor& gs, at::Tensor& y) {
  const int64_t T = x.size(0), E = B.size(0), out = B.size(1), r = B.size(2);
  at::Tensor dense_g = at::zeros({T, E}, gs.options()).scatter_add_(1, idx, gs).unsqueeze(-1);
  at::Tensor h = A.size(0) == 1 ? at::matmul(x, A[0].t()).unsqueeze(1) * dense_g
                                : at::matmul(x, A.reshape({E * r, -1}).t()).view({T, E, r}) * dense_g;
  y.addmm_(h.reshape({T, E * r}), B.transpose(1, 2).reshape({E * r, out}));
}

at::Tensor lora_moe_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& A,
                               const at::Tensor& B, const at::Tensor& idx, const at::Tensor& g,
                               double scale) {
  // Same conditions as check_lora_moe_args in lora_moe_linear.py (which the fake impl runs).
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && A.dim() == 3 && B.dim() == 3 && idx.dim() == 2,
              "lora_moe_linear: expected x [T, in], weight [out, in], A [E, r, in], B [E, out, r], idx [T, k]");
  const int64_t T = x.size(0), in = weight.size(1), out = weight.size(0);
  const int64_t E = B.size(0), r = B.size(2), k = idx.size(1);
  TORCH_CHECK(x.size(1) == in, "x has ", x.size(1), " features, weight expects ", in);
  TORCH_CHECK(A.size(2) == in, "A has ", A.size(2), " input features, weight ", in);
  TORCH_CHECK(B.size(1) == out, "B has ", B.size(1), " outputs, weight ", out);
  TORCH_CHECK(A.size(1) == r, "A rank ", A.size(1), " != B rank ", r);
  TORCH_CHECK(A.size(0) == E || A.size(0) == 1, "A has ", A.size(0), " experts, B ", E);
  TORCH_CHECK(idx.size(0) == T, "idx has ", idx.size(0), " tokens, x ", T);
  TORCH_CHECK(g.sizes() == idx.sizes(), "g ", g.sizes(), " must match idx ", idx.sizes());
  TORCH_CHECK(idx.scalar_type() == at::kLong, "idx must be int64, got ", idx.scalar_type());
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), "g must be floating point, got ", g.scalar_type());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight is ", weight.scalar_type(), " but x is ", x.scalar_type());
  TORCH_CHECK(A.scalar_type() == x.scalar_type(), "A is ", A.scalar_type(), " but x is ", x.scalar_type());
  TORCH_CHECK(B.scalar_type() == x.scalar_type(), "B is ", B.scalar_type(), " but x is ", x.scalar_type());
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, "bias must be [", out, "], got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "bias is ", bias->scalar_type(), " but x is ", x.scalar_type());
  }

  at::Tensor y = at::linear(x, weight, bias);
  if (T == 0 || k == 0 || scale == 0.0) return y;
  y = y.contiguous();
  // The loops read each chosen expert once per token; GEMMs read every expert once per call.
  // Measured (in=out=1024, E=8, k=2, r=8, fp32, 2 threads), op time with loops vs GEMMs:
  // T=16 1439 vs 1594 us, T=32 783 vs 746 us, T=64 1352 vs 1206 us (the base linear alone
  // varies 2-3x between T here, so compare within a row): GEMMs from T*k >= 8E.
  if (T * k >= 8 * E) {
    add_experts_dense(x, A, B, idx, (g * scale).to(x.scalar_type()), y);
    return y;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "lora_moe_linear_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    add_chosen_experts<scalar_t>(x.contiguous(), A.contiguous(), B.contiguous(), idx.contiguous(),
                                 g.to(c10::CppTypeToScalarType<acc_t>::value).contiguous(), scale, y);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(adafuse, CPU, m) {
  m.impl("lora_moe_linear", &lora_moe_linear_cpu);
}

}  // namespace adafuse

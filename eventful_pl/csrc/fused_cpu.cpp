// Fused CPU kernels for eventful inference (float32, no autograd).
//
// Built on first use by eventful_pl/kernels.py (torch.utils.cpp_extension).
// Each kernel replaces several memory-bound PyTorch passes over (B, N, D)
// tokens with one pass that reads every input once and writes only the
// small result, so the temporaries never go to memory.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

namespace {

constexpr int64_t kRowsPerTask = 8;

void check_float_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
}

// Sum of squares of a[i] - b[i] over n floats.
inline float squared_distance(const float* __restrict a, const float* __restrict b, int64_t n) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) {
    const float e = a[i] - b[i];
    total += e * e;
  }
  return total;
}

// ||LayerNorm(x) - p||^2 of one token of d channels, as torch computes
// LayerNorm: biased variance, y = (x * rstd - mean * rstd) * w + b.
inline float layer_norm_squared_distance(const float* __restrict x, const float* __restrict p,
                                         const float* __restrict w, const float* __restrict b,
                                         int64_t d, float eps) {
  float mean = 0.0f;
#pragma omp simd reduction(+ : mean)
  for (int64_t i = 0; i < d; ++i) mean += x[i];
  mean /= static_cast<float>(d);
  float var = 0.0f;
#pragma omp simd reduction(+ : var)
  for (int64_t i = 0; i < d; ++i) var += (x[i] - mean) * (x[i] - mean);
  var /= static_cast<float>(d);
  const float rstd = 1.0f / std::sqrt(var + eps);
  const float shift = -mean * rstd;
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < d; ++i) {
    const float e = (x[i] * rstd + shift) * w[i] + b[i] - p[i];
    total += e * e;
  }
  return total;
}

}  // namespace

// L2 norms of c - p per token.
//   c: (B, N, G, C), any strides with stride(-1) == 1 (e.g. attention heads
//      read in place as (B, N, H, d)); p: (B, N, G * C) contiguous.
//   Returns (B, N).
at::Tensor error_norms(const at::Tensor& c, const at::Tensor& p) {
  check_float_cpu(c, "c");
  check_float_cpu(p, "p");
  TORCH_CHECK(c.dim() == 4, "c must be (B, N, G, C)");
  TORCH_CHECK(c.stride(3) == 1, "c must be contiguous in its last dim");
  TORCH_CHECK(p.is_contiguous(), "p must be contiguous");
  const int64_t b = c.size(0), n = c.size(1), g = c.size(2), ch = c.size(3);
  TORCH_CHECK(p.numel() == b * n * g * ch, "p must hold B * N * G * C elements");
  auto out = at::empty({b, n}, p.options());
  const float* c_data = c.data_ptr<float>();
  const float* p_data = p.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const int64_t sb = c.stride(0), sn = c.stride(1), sg = c.stride(2);
  at::parallel_for(0, b * n, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float* c_row = c_data + (row / n) * sb + (row % n) * sn;
      const float* p_row = p_data + row * g * ch;
      float total = 0.0f;
      for (int64_t k = 0; k < g; ++k) total += squared_distance(c_row + k * sg, p_row + k * ch, ch);
      out_data[row] = std::sqrt(total);
    }
  });
  return out;
}

// L2 norms of LayerNorm(x) - p per token, without writing LayerNorm(x).
//   x: (B, N, D) contiguous; weight, bias: (D,); p: (B, N, D)
//   contiguous. LayerNorm as torch computes it: biased variance,
//   y = (x * rstd - mean * rstd) * weight + bias. Returns (B, N).
at::Tensor layer_norm_error_norms(const at::Tensor& x, const at::Tensor& weight,
                                  const at::Tensor& bias, double eps, const at::Tensor& p) {
  check_float_cpu(x, "x");
  check_float_cpu(p, "p");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be contiguous (B, N, D)");
  TORCH_CHECK(p.sizes() == x.sizes() && p.is_contiguous(), "p must be contiguous like x");
  const int64_t rows = x.size(0) * x.size(1), d = x.size(2);
  check_float_cpu(weight, "weight");
  check_float_cpu(bias, "bias");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == d, "weight must be (D,)");
  TORCH_CHECK(bias.is_contiguous() && bias.numel() == d, "bias must be (D,)");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  const float* x_data = x.data_ptr<float>();
  const float* p_data = p.data_ptr<float>();
  const float* w_data = weight.data_ptr<float>();
  const float* b_data = bias.data_ptr<float>();
  float* out_data = out.data_ptr<float>();
  const float eps_f = static_cast<float>(eps);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const float total =
          layer_norm_squared_distance(x_data + row * d, p_data + row * d, w_data, b_data, d, eps_f);
      out_data[row] = std::sqrt(total);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("error_norms", &error_norms, "L2 norms of c - p per token (B, N)");
  m.def("layer_norm_error_norms", &layer_norm_error_norms,
        "L2 norms of LayerNorm(x) - p per token (B, N)");
}

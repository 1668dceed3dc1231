// Fused CPU kernels for eventful inference (float32, no autograd).
//
// Built on first use by eventful_pl/kernels.py (torch.utils.cpp_extension).
// Each kernel replaces several memory-bound PyTorch passes over (B, N, D)
// tokens with one pass that reads every input once and writes only the
// small result, so the temporaries never go to memory.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

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

// exp(x) in float32 to about 1 ulp, written so that loops over it vectorise:
// x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), exp(r) by its degree-7 Taylor
// polynomial, times 2^n from the exponent bits. Below -87 it returns 0 (no
// denormals), above 88 infinity; NaN stays NaN.
inline float exp_float(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693145751953125f;
  constexpr float kLn2Lo = 1.42860682030941723e-6f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float c = x < -87.0f ? -87.0f : x;
  c = c > 88.0f ? 88.0f : c;
  const float n = (c * kLog2e + kRound) - kRound;
  const float r = (c - n * kLn2Hi) - n * kLn2Lo;
  float poly = 1.0f / 5040.0f;
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const float scale = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  const float y = poly * scale;
  return x < -87.0f ? 0.0f : (x > 88.0f ? std::numeric_limits<float>::infinity() : y);
}

// acc[i] += exp(logits[i] - shift[i]) for i < n; with `out`, also out[i] = that exp.
inline void accumulate_exp(const float* __restrict logits, const float* __restrict shift,
                           float* __restrict acc, float* __restrict out, int64_t n) {
  if (out != nullptr) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float e = exp_float(logits[i] - shift[i]);
      out[i] = e;
      acc[i] += e;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) acc[i] += exp_float(logits[i] - shift[i]);
  }
}

// Sum of exp(logits[i] - shift) for i < n.
inline float sum_exp(const float* __restrict logits, float shift, int64_t n) {
  float total = 0.0f;
#pragma omp simd reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += exp_float(logits[i] - shift);
  return total;
}

// 16 floats in one vector (GCC vector extension: one AVX-512 register, two
// AVX2 registers, ... whatever the build targets).
typedef float Vec16 __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;

inline Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

// Output rows handled per task of attention_update.
constexpr int kTileRows = 6;

// Rows consecutive output rows of d = Chunks * 16 channels:
//   out[i] += sum_t a1[t * n + i] * v1[t] + a2[t * n + i] * v2[t].
template <int Rows, int Chunks>
inline void update_tile(float* out, const float* a1, const float* v1, const float* a2,
                        const float* v2, int64_t n, int64_t m) {
  constexpr int64_t d = Chunks * kVec;
  Vec16 acc[Rows][Chunks];
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < Chunks; ++j) acc[i][j] = load16(out + i * d + j * kVec);
  for (int pair = 0; pair < 2; ++pair) {
    const float* a = pair == 0 ? a1 : a2;
    const float* v = pair == 0 ? v1 : v2;
    for (int64_t t = 0; t < m; ++t) {
      Vec16 vt[Chunks];
      for (int j = 0; j < Chunks; ++j) vt[j] = load16(v + t * d + j * kVec);
      const float* a_t = a + t * n;
      for (int i = 0; i < Rows; ++i)
        for (int j = 0; j < Chunks; ++j) acc[i][j] += a_t[i] * vt[j];
    }
  }
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < Chunks; ++j) store16(out + i * d + j * kVec, acc[i][j]);
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

// Incremental softmax normaliser update of the full eventful block (see
// EventfulBlock._update_softmax, which this computes in two passes instead
// of about fifteen). With L the row log-normalisers (B * H, N):
//   rows (B * H, r, Nk): new logits of the updated query rows index (B, r);
//   cols_old, cols_new (B * H, m, N): old and new logits of the updated key
//   columns, key-major. All contiguous float32.
// Every row keeps 1 - sum_j exp(cols_old - L) of its mass and adds
// sum_j exp(cols_new - L); an updated row's mass is sum_k exp(rows - L).
// If every row keeps at least min_kept_mass and every new mass lies in
// (exp(-max_log_shift), exp(max_log_shift)), L += log(mass), cols_new is
// overwritten with the new softmax columns exp(cols_new - L_new) and the
// result is true. Otherwise L is left as it was, cols_new holds scratch and
// the result is false (the caller recomputes the normalisers exactly).
bool update_softmax(const at::Tensor& rows, const at::Tensor& cols_old, at::Tensor& cols_new,
                    at::Tensor& log_norm, const at::Tensor& index, double min_kept_mass,
                    double max_log_shift) {
  const at::Tensor* inputs[] = {&rows, &cols_old, &cols_new, &log_norm};
  for (const at::Tensor* t : inputs) {
    check_float_cpu(*t, "update_softmax inputs");
    TORCH_CHECK(t->is_contiguous(), "update_softmax inputs must be contiguous");
  }
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 2,
              "index must be a contiguous int64 (B, r) tensor");
  TORCH_CHECK(rows.dim() == 3 && cols_old.dim() == 3 && log_norm.dim() == 2, "bad ranks");
  const int64_t bh = log_norm.size(0), n = log_norm.size(1);
  const int64_t r = rows.size(1), nk = rows.size(2), m = cols_old.size(1);
  const int64_t batch = index.size(0);
  TORCH_CHECK(bh % batch == 0 && index.size(1) == r, "index must be (B, r) with B dividing B * H");
  TORCH_CHECK(rows.size(0) == bh && cols_old.sizes() == cols_new.sizes() &&
                  cols_old.size(0) == bh && cols_old.size(2) == n,
              "rows (B*H, r, Nk), cols (B*H, m, N) and log_norm (B*H, N) do not match");
  const int64_t heads = bh / batch;
  auto total = at::empty({bh, n}, log_norm.options());
  const float* rows_data = rows.data_ptr<float>();
  const float* old_data = cols_old.data_ptr<float>();
  float* new_data = cols_new.data_ptr<float>();
  float* norm_data = log_norm.data_ptr<float>();
  const int64_t* index_data = index.data_ptr<int64_t>();
  float* total_data = total.data_ptr<float>();
  const float min_kept = static_cast<float>(min_kept_mass);
  const float low = std::exp(static_cast<float>(-max_log_shift));
  const float high = std::exp(static_cast<float>(max_log_shift));
  std::vector<char> ok(bh, 1);
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> removed(n);
    for (int64_t g = begin; g < end; ++g) {
      const float* shift = norm_data + g * n;
      float* tot = total_data + g * n;
      std::fill(removed.begin(), removed.end(), 0.0f);
      std::fill(tot, tot + n, 0.0f);
      for (int64_t j = 0; j < m; ++j) {
        accumulate_exp(old_data + (g * m + j) * n, shift, removed.data(), nullptr, n);
        float* col = new_data + (g * m + j) * n;
        accumulate_exp(col, shift, tot, col, n);
      }
      bool good = true;
      for (int64_t i = 0; i < n; ++i) {
        const float kept = 1.0f - removed[i];
        tot[i] += kept;
        removed[i] = kept;
      }
      const int64_t* rows_index = index_data + (g / heads) * r;
      for (int64_t t = 0; t < r; ++t) {
        const int64_t i = rows_index[t];
        removed[i] = 1.0f;
        tot[i] = sum_exp(rows_data + (g * r + t) * nk, shift[i], nk);
      }
      for (int64_t i = 0; i < n; ++i)
        good = good && removed[i] >= min_kept && tot[i] > low && tot[i] < high;
      ok[g] = good;
    }
  });
  for (int64_t g = 0; g < bh; ++g)
    if (!ok[g]) return false;
  at::parallel_for(0, bh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> inverse(n);
    for (int64_t g = begin; g < end; ++g) {
      const float* tot = total_data + g * n;
      float* shift = norm_data + g * n;
      for (int64_t i = 0; i < n; ++i) {
        inverse[i] = 1.0f / tot[i];
        shift[i] += std::log(tot[i]);
      }
      for (int64_t j = 0; j < m; ++j) {
        float* __restrict col = new_data + (g * m + j) * n;
        const float* __restrict inv = inverse.data();
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) col[i] *= inv[i];
      }
    }
  });
  return true;
}

// The full block's output update from the updated key columns:
//   out[g] (N, d) += a1[g]^T @ v1[g] + a2[g]^T @ v2[g],
//   a1, a2 (G, m, N) contiguous (softmax columns, key-major), v1, v2
//   (G, m, d) contiguous, out (G, N, d) contiguous. d must be a multiple of
//   16, at most 64. One pass over out; every task is (g, a block of rows).
void attention_update(at::Tensor& out, const at::Tensor& a1, const at::Tensor& v1,
                      const at::Tensor& a2, const at::Tensor& v2) {
  const at::Tensor* inputs[] = {&out, &a1, &v1, &a2, &v2};
  for (const at::Tensor* t : inputs) {
    check_float_cpu(*t, "attention_update inputs");
    TORCH_CHECK(t->is_contiguous() && t->dim() == 3, "attention_update inputs: contiguous, 3-D");
  }
  const int64_t groups = out.size(0), n = out.size(1), d = out.size(2), m = a1.size(1);
  TORCH_CHECK(d % kVec == 0 && d <= 4 * kVec, "attention_update: head size ", d,
              " must be a multiple of 16, at most 64");
  TORCH_CHECK(a1.sizes() == a2.sizes() && a1.size(0) == groups && a1.size(2) == n &&
                  v1.sizes() == v2.sizes() && v1.size(0) == groups && v1.size(1) == m &&
                  v1.size(2) == d,
              "attention_update: a (G, m, N), v (G, m, d) and out (G, N, d) do not match");
  const int64_t chunks = d / kVec;
  const int64_t blocks = (n + kTileRows - 1) / kTileRows;
  const int64_t grain = std::max<int64_t>(1, blocks / 4);
  float* out_data = out.data_ptr<float>();
  const float* a_data[2] = {a1.data_ptr<float>(), a2.data_ptr<float>()};
  const float* v_data[2] = {v1.data_ptr<float>(), v2.data_ptr<float>()};
  at::parallel_for(0, groups * blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / blocks, row = (task % blocks) * kTileRows;
      const int64_t rows = std::min<int64_t>(kTileRows, n - row);
      float* out_g = out_data + (g * n + row) * d;
      const float* a1_g = a_data[0] + g * m * n + row;
      const float* a2_g = a_data[1] + g * m * n + row;
      const float* v1_g = v_data[0] + g * m * d;
      const float* v2_g = v_data[1] + g * m * d;
      if (rows == kTileRows) {
        switch (chunks) {
          case 1: update_tile<kTileRows, 1>(out_g, a1_g, v1_g, a2_g, v2_g, n, m); break;
          case 2: update_tile<kTileRows, 2>(out_g, a1_g, v1_g, a2_g, v2_g, n, m); break;
          case 3: update_tile<kTileRows, 3>(out_g, a1_g, v1_g, a2_g, v2_g, n, m); break;
          default: update_tile<kTileRows, 4>(out_g, a1_g, v1_g, a2_g, v2_g, n, m); break;
        }
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* o = out_g + i * d;
        switch (chunks) {
          case 1: update_tile<1, 1>(o, a1_g + i, v1_g, a2_g + i, v2_g, n, m); break;
          case 2: update_tile<1, 2>(o, a1_g + i, v1_g, a2_g + i, v2_g, n, m); break;
          case 3: update_tile<1, 3>(o, a1_g + i, v1_g, a2_g + i, v2_g, n, m); break;
          default: update_tile<1, 4>(o, a1_g + i, v1_g, a2_g + i, v2_g, n, m); break;
        }
      }
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("error_norms", &error_norms, "L2 norms of c - p per token (B, N)");
  m.def("layer_norm_error_norms", &layer_norm_error_norms,
        "L2 norms of LayerNorm(x) - p per token (B, N)");
  m.def("update_softmax", &update_softmax,
        "incremental softmax normaliser update of the full eventful block");
  m.def("attention_update", &attention_update,
        "out[g] += a1[g]^T @ v1[g] + a2[g]^T @ v2[g] (the full block's output update)");
}

// Fused CPU kernels for eventful inference (float32, no autograd).
//
// Built on first use by eventful_pl/kernels.py (torch.utils.cpp_extension).
// Each kernel replaces several memory-bound PyTorch passes over (B, N, D)
// tokens with one pass that reads every input once and writes only the
// small result, so the temporaries never go to memory.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
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

// Output rows handled per task of attention_update, and rows of a logits tile.
constexpr int kTileRows = 6;
// Columns of a logits tile: four vectors.
constexpr int64_t kPanel = 4 * kVec;

typedef int32_t Vec16i __attribute__((vector_size(64)));

inline Vec16 splat(float x) { return Vec16{} + x; }

// exp(x) on 16 lanes in float32 to about 1 ulp: x = n ln2 + r (Cody-Waite,
// |r| <= ln2 / 2), exp(r) by its degree-7 Taylor polynomial, times 2^n from
// the exponent bits. Below -87 it gives 0 (no denormals), above 88 infinity;
// NaN stays NaN.
inline Vec16 exp_vec(Vec16 x) {
  const Vec16 low = splat(-87.0f), high = splat(88.0f);
  Vec16 c = x < low ? low : x;
  c = c > high ? high : c;
  const Vec16 n = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const Vec16 r = (c - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  Vec16 poly = splat(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const Vec16i bits = (__builtin_convertvector(n, Vec16i) + 127) << 23;
  Vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  Vec16 y = poly * scale;
  y = x < low ? splat(0.0f) : y;
  return x > high ? splat(std::numeric_limits<float>::infinity()) : y;
}

// n floats from p in whole vectors, the last one padded with `fill`.
inline Vec16 load_tail(const float* p, int64_t n, float fill) {
  float lanes[kVec];
  std::fill(lanes, lanes + kVec, fill);
  std::copy(p, p + n, lanes);
  return load16(lanes);
}

inline void store_tail(float* p, Vec16 v, int64_t n) {
  float lanes[kVec];
  store16(lanes, v);
  std::copy(lanes, lanes + n, p);
}

// acc[i] += exp(logits[i] - shift[i]) for i < n; with `out`, also out[i] = that exp.
inline void accumulate_exp(const float* logits, const float* shift, float* acc, float* out,
                           int64_t n) {
  for (int64_t i = 0; i < n; i += kVec) {
    const int64_t count = std::min(kVec, n - i);
    if (count == kVec) {
      const Vec16 e = exp_vec(load16(logits + i) - load16(shift + i));
      store16(acc + i, load16(acc + i) + e);
      if (out != nullptr) store16(out + i, e);
    } else {
      const Vec16 e = exp_vec(load_tail(logits + i, count, 0.0f) - load_tail(shift + i, count, 0.0f));
      store_tail(acc + i, load_tail(acc + i, count, 0.0f) + e, count);
      if (out != nullptr) store_tail(out + i, e, count);
    }
  }
}

// Sum of exp(logits[i] - shift) for i < n.
inline float sum_exp(const float* logits, float shift, int64_t n) {
  Vec16 total = Vec16{};
  int64_t i = 0;
  for (; i + kVec <= n; i += kVec) total += exp_vec(load16(logits + i) - shift);
  if (i < n)  // padding with -inf adds exp(-inf) = 0
    total += exp_vec(load_tail(logits + i, n - i, -std::numeric_limits<float>::infinity()) - shift);
  float lanes[kVec];
  store16(lanes, total);
  float sum = 0.0f;
  for (int64_t l = 0; l < kVec; ++l) sum += lanes[l];
  return sum;
}

// Logits tile: acc[i] (64 lanes as 4 vectors) = sum_t a[i * a_row + t * a_col] * b[t * ldb + 0:64].
template <int Rows>
inline void logits_tile(const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                        int64_t k, Vec16 (&out)[kTileRows][4]) {
  Vec16 acc[Rows][4];  // local, so that it stays in registers
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = Vec16{};
  for (int64_t t = 0; t < k; ++t) {
    const float* b_row = b + t * ldb;
    const Vec16 b0 = load16(b_row), b1 = load16(b_row + kVec);
    const Vec16 b2 = load16(b_row + 2 * kVec), b3 = load16(b_row + 3 * kVec);
    for (int i = 0; i < Rows; ++i) {
      const float s = a[i * a_row + t * a_col];
      acc[i][0] += s * b0;
      acc[i][1] += s * b1;
      acc[i][2] += s * b2;
      acc[i][3] += s * b3;
    }
  }
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < 4; ++j) out[i][j] = acc[i][j];
}

// Calls tile(row, rows, acc) for the logits a[0:m] @ b[:, 0:64] in tiles of
// up to kTileRows rows.
template <typename Epilogue>
inline void for_each_logits_tile(const float* a, int64_t a_row, int64_t a_col, const float* b,
                                 int64_t ldb, int64_t m, int64_t k, Epilogue&& tile) {
  Vec16 acc[kTileRows][4];
  int64_t i = 0;
  for (; i + kTileRows <= m; i += kTileRows) {
    logits_tile<kTileRows>(a + i * a_row, a_row, a_col, b, ldb, k, acc);
    tile(i, kTileRows, acc);
  }
  for (; i < m; ++i) {
    logits_tile<1>(a + i * a_row, a_row, a_col, b, ldb, k, acc);
    tile(i, 1, acc);
  }
}

// A (k, 64) panel of b (rows ldb apart) starting at column `col`: b itself
// when 64 columns remain, else a zero-padded copy in `pad`.
inline const float* panel_of(const float* b, int64_t ldb, int64_t k, int64_t col, int64_t width,
                             std::vector<float>& pad, int64_t& panel_ld) {
  if (width == kPanel) {
    panel_ld = ldb;
    return b + col;
  }
  pad.assign(k * kPanel, 0.0f);
  for (int64_t t = 0; t < k; ++t)
    std::copy(b + t * ldb + col, b + t * ldb + col + width, pad.data() + t * kPanel);
  panel_ld = kPanel;
  return pad.data();
}

// Rows consecutive output rows of d = Chunks * 16 channels, from m pairs of
// (softmax column, value) rows, new and old:
//   out[i] += sum_t a_new[t][i] * v_new[t] - a_old[t][i] * v_old[t].
// a_*[t] points at its row, whose column `col` is output row 0; v_*[t] at
// its d values.
template <int Rows, int Chunks>
inline void update_tile(float* out, const float* const* a_new, const float* const* v_new,
                        const float* const* a_old, const float* const* v_old, int64_t m,
                        int64_t col) {
  constexpr int64_t d = Chunks * kVec;
  Vec16 acc[Rows][Chunks];
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < Chunks; ++j) acc[i][j] = load16(out + i * d + j * kVec);
  for (int64_t t = 0; t < m; ++t) {
    Vec16 vn[Chunks], vo[Chunks];
    for (int j = 0; j < Chunks; ++j) {
      vn[j] = load16(v_new[t] + j * kVec);
      vo[j] = load16(v_old[t] + j * kVec);
    }
    for (int i = 0; i < Rows; ++i) {
      const float an = a_new[t][col + i], ao = a_old[t][col + i];
      for (int j = 0; j < Chunks; ++j) acc[i][j] += an * vn[j] - ao * vo[j];
    }
  }
  for (int i = 0; i < Rows; ++i)
    for (int j = 0; j < Chunks; ++j) store16(out + i * d + j * kVec, acc[i][j]);
}

// After a tile: the new columns replace the old ones in the reference, for
// the tile's `rows` output rows only (no other task reads them).
inline void commit_columns(const float* const* a_new, float* const* a_old, int64_t m, int64_t col,
                           int64_t rows) {
  for (int64_t t = 0; t < m; ++t) std::copy(a_new[t] + col, a_new[t] + col + rows, a_old[t] + col);
}

// Second pass of the softmax update: L += log(mass); columns /= mass.
//   cols (G, m, N), log_norm and mass (G, N), contiguous.
void normalise_columns(float* cols, float* log_norm, const float* mass, int64_t groups, int64_t m,
                       int64_t n) {
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> inverse(n);
    for (int64_t g = begin; g < end; ++g) {
      const float* tot = mass + g * n;
      float* shift = log_norm + g * n;
      for (int64_t i = 0; i < n; ++i) {
        inverse[i] = 1.0f / tot[i];
        shift[i] += std::log(tot[i]);
      }
      for (int64_t j = 0; j < m; ++j) {
        float* __restrict col = cols + (g * m + j) * n;
        const float* __restrict inv = inverse.data();
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) col[i] *= inv[i];
      }
    }
  });
}

void check_index(const at::Tensor& index, const char* name) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.dim() == 2,
              name, " must be a contiguous int64 (B, k) tensor");
}

// The precision checks of the incremental softmax update: every row keeps at
// least min_kept_mass of its old mass and its new mass lies in
// (exp(-max_log_shift), exp(max_log_shift)). NaN fails them.
struct MassCheck {
  float min_kept, low, high;

  MassCheck(double min_kept_mass, double max_log_shift)
      : min_kept(static_cast<float>(min_kept_mass)),
        low(std::exp(static_cast<float>(-max_log_shift))),
        high(std::exp(static_cast<float>(max_log_shift))) {}

  // Whether all n rows of one group pass, given their kept and new masses.
  bool passes(const float* kept, const float* mass, int64_t n) const {
    bool good = true;
    for (int64_t i = 0; i < n; ++i)
      good = good && kept[i] >= min_kept && mass[i] > low && mass[i] < high;
    return good;
  }
};

// The end of both softmax updates: if every group passed its checks,
// normalise_columns and true; else nothing changes and false.
bool normalise_if_passed(const std::vector<char>& passed, float* cols, float* log_norm,
                         const float* mass, int64_t groups, int64_t m, int64_t n) {
  for (int64_t g = 0; g < groups; ++g)
    if (!passed[g]) return false;
  normalise_columns(cols, log_norm, mass, groups, m, n);
  return true;
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
  check_index(index, "index");
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
  const MassCheck check(min_kept_mass, max_log_shift);
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
      ok[g] = check.passes(removed.data(), tot, n);  // removed now holds the kept mass
    }
  });
  return normalise_if_passed(ok, new_data, norm_data, total_data, bh, m, n);
}

// The full block's output update from the updated key columns, reading the
// old columns and values straight from the delta gates' references:
//   out[g] (N, d) += a_new[g]^T @ v_new[g] - a_ref[g][keys]^T @ v_ref[g][keys]
// which is the method's A_new dV + dA V_old. a_new (G, m, N), v_new (G, m, d),
// a_ref (G, Nk, N) (key-major), v_ref (G, Nk, d), out (G, N, d), all
// contiguous; key_index (B, m) the updated keys of each batch item (no key
// twice). d must be a multiple of 16, at most 64. Each task, (g, a block of
// kTileRows output rows), then writes its part of the new columns into
// a_ref: the A reference is updated in the same pass. v_ref is only read.
void attention_update(at::Tensor& out, const at::Tensor& a_new, const at::Tensor& v_new,
                      at::Tensor& a_ref, const at::Tensor& v_ref, const at::Tensor& key_index) {
  const at::Tensor* inputs[] = {&out, &a_new, &v_new, &a_ref, &v_ref};
  for (const at::Tensor* t : inputs) {
    check_float_cpu(*t, "attention_update inputs");
    TORCH_CHECK(t->is_contiguous() && t->dim() == 3, "attention_update inputs: contiguous, 3-D");
  }
  check_index(key_index, "key_index");
  const int64_t groups = out.size(0), n = out.size(1), d = out.size(2), m = a_new.size(1);
  const int64_t nk = a_ref.size(1), batch = key_index.size(0);
  TORCH_CHECK(d % kVec == 0 && d <= 4 * kVec, "attention_update: head size ", d,
              " must be a multiple of 16, at most 64");
  TORCH_CHECK(a_new.size(0) == groups && a_new.size(2) == n && v_new.size(0) == groups &&
                  v_new.size(1) == m && v_new.size(2) == d && a_ref.size(0) == groups &&
                  a_ref.size(2) == n && v_ref.size(0) == groups && v_ref.size(1) == nk &&
                  v_ref.size(2) == d && groups % batch == 0 && key_index.size(1) == m,
              "attention_update: shapes do not match");
  const int64_t heads = groups / batch, chunks = d / kVec;
  const int64_t blocks = (n + kTileRows - 1) / kTileRows;
  const int64_t grain = std::max<int64_t>(1, blocks / 4);
  float* out_data = out.data_ptr<float>();
  const float* an_data = a_new.data_ptr<float>();
  const float* vn_data = v_new.data_ptr<float>();
  float* ar_data = a_ref.data_ptr<float>();
  const float* vr_data = v_ref.data_ptr<float>();
  const int64_t* key_data = key_index.data_ptr<int64_t>();
  at::parallel_for(0, groups * blocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<const float*> an(m), vn(m), vo(m);
    std::vector<float*> ao(m);
    int64_t current = -1;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t g = task / blocks, row = (task % blocks) * kTileRows;
      const int64_t rows = std::min<int64_t>(kTileRows, n - row);
      if (g != current) {
        const int64_t* keys = key_data + (g / heads) * m;
        for (int64_t t = 0; t < m; ++t) {
          an[t] = an_data + (g * m + t) * n;
          vn[t] = vn_data + (g * m + t) * d;
          ao[t] = ar_data + (g * nk + keys[t]) * n;
          vo[t] = vr_data + (g * nk + keys[t]) * d;
        }
        current = g;
      }
      float* out_g = out_data + (g * n + row) * d;
      const float *const *a1 = an.data(), *const *v1 = vn.data();
      const float *const *a2 = const_cast<const float* const*>(ao.data()), *const *v2 = vo.data();
      if (rows == kTileRows) {
        switch (chunks) {
          case 1: update_tile<kTileRows, 1>(out_g, a1, v1, a2, v2, m, row); break;
          case 2: update_tile<kTileRows, 2>(out_g, a1, v1, a2, v2, m, row); break;
          case 3: update_tile<kTileRows, 3>(out_g, a1, v1, a2, v2, m, row); break;
          default: update_tile<kTileRows, 4>(out_g, a1, v1, a2, v2, m, row); break;
        }
        commit_columns(a1, ao.data(), m, row, rows);
        continue;
      }
      for (int64_t i = 0; i < rows; ++i) {
        float* o = out_g + i * d;
        switch (chunks) {
          case 1: update_tile<1, 1>(o, a1, v1, a2, v2, m, row + i); break;
          case 2: update_tile<1, 2>(o, a1, v1, a2, v2, m, row + i); break;
          case 3: update_tile<1, 3>(o, a1, v1, a2, v2, m, row + i); break;
          default: update_tile<1, 4>(o, a1, v1, a2, v2, m, row + i); break;
        }
      }
      commit_columns(a1, ao.data(), m, row, rows);
    }
  });
}

// The full block's incremental frame from queries and keys to new softmax
// columns, without storing any logits (EventfulBlock._incremental; no
// relative position). G = B * H groups:
//   q_rows (G, r, d): the updated (scaled) queries, rows index (B, r);
//   keys_t (G, d, Nk): all keys (new ones in place), channels-major;
//   k_new, k_old (G, m, d): the updated keys, new and old (any strides);
//   q_t (G, d, N): all scaled queries (new ones in place), channels-major;
//   log_norm (G, N): the row log-normalisers L; probs (G, m, N): output.
// Computes the logits of the updated key columns (new and old) and of the
// updated query rows tile by tile, takes their exponentials relative to L
// and accumulates the masses as update_softmax does, with the same checks
// and result (probs: the new softmax columns of the updated keys).
bool incremental_softmax(const at::Tensor& q_rows, const at::Tensor& keys_t,
                         const at::Tensor& k_new, const at::Tensor& k_old, const at::Tensor& q_t,
                         at::Tensor& log_norm, const at::Tensor& index, at::Tensor& probs,
                         double min_kept_mass, double max_log_shift) {
  const at::Tensor* inputs[] = {&q_rows, &keys_t, &k_new, &k_old, &q_t, &log_norm, &probs};
  for (const at::Tensor* t : inputs) {
    check_float_cpu(*t, "incremental_softmax inputs");
    TORCH_CHECK(t->dim() == 3 || t == &log_norm, "incremental_softmax: 3-D inputs expected");
  }
  TORCH_CHECK(keys_t.stride(2) == 1 && q_t.stride(2) == 1, "keys_t and q_t: contiguous rows");
  TORCH_CHECK(log_norm.is_contiguous() && probs.is_contiguous(),
              "log_norm and probs must be contiguous");
  check_index(index, "index");
  const int64_t groups = q_t.size(0), d = q_t.size(1), n = q_t.size(2);
  const int64_t r = q_rows.size(1), nk = keys_t.size(2), m = k_new.size(1);
  const int64_t batch = index.size(0);
  TORCH_CHECK(groups % batch == 0 && index.size(1) == r, "index must be (B, r)");
  TORCH_CHECK(q_rows.size(0) == groups && q_rows.size(2) == d && keys_t.size(0) == groups &&
                  keys_t.size(1) == d && k_new.sizes() == k_old.sizes() &&
                  k_new.size(0) == groups && k_new.size(2) == d && log_norm.size(0) == groups &&
                  log_norm.size(1) == n && probs.size(0) == groups && probs.size(1) == m &&
                  probs.size(2) == n,
              "incremental_softmax: shapes do not match");
  const int64_t heads = groups / batch;
  const int64_t panels = (n + kPanel - 1) / kPanel, key_panels = (nk + kPanel - 1) / kPanel;
  auto total = at::empty({groups, n}, log_norm.options());
  auto kept = at::empty({groups, n}, log_norm.options());
  auto partial = at::zeros({groups, key_panels, r}, log_norm.options());
  const float* qr = q_rows.data_ptr<float>();
  const float* kt = keys_t.data_ptr<float>();
  const float* kn = k_new.data_ptr<float>();
  const float* ko = k_old.data_ptr<float>();
  const float* qt = q_t.data_ptr<float>();
  float* norm_data = log_norm.data_ptr<float>();
  float* probs_data = probs.data_ptr<float>();
  float* total_data = total.data_ptr<float>();
  float* kept_data = kept.data_ptr<float>();
  float* partial_data = partial.data_ptr<float>();
  const int64_t* index_data = index.data_ptr<int64_t>();
  const int64_t qr_g = q_rows.stride(0), qr_row = q_rows.stride(1), qr_col = q_rows.stride(2);
  const int64_t kn_g = k_new.stride(0), kn_row = k_new.stride(1), kn_col = k_new.stride(2);
  const int64_t ko_g = k_old.stride(0), ko_row = k_old.stride(1), ko_col = k_old.stride(2);
  const int64_t kt_g = keys_t.stride(0), kt_ld = keys_t.stride(1);
  const int64_t qt_g = q_t.stride(0), qt_ld = q_t.stride(1);

  // Per group: key columns, one 64-query panel per task; query rows, one
  // 64-key panel per task.
  at::parallel_for(0, groups * (panels + key_panels), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> pad, out_pad;
    for (int64_t task = begin; task < end; ++task) {
      // Tasks in group order, so that every thread's share is balanced.
      const int64_t g = task / (panels + key_panels), local = task % (panels + key_panels);
      const bool columns = local < panels;
      const int64_t col = (columns ? local : local - panels) * kPanel;
      if (columns) {
        const int64_t width = std::min(kPanel, n - col);
        int64_t ld = 0;
        const float* b = panel_of(qt + g * qt_g, qt_ld, d, col, width, pad, ld);
        float shift_lanes[kPanel] = {0.0f};
        std::copy(norm_data + g * n + col, norm_data + g * n + col + width, shift_lanes);
        Vec16 shift[4], mass[4], removed[4];
        for (int j = 0; j < 4; ++j) {
          shift[j] = load16(shift_lanes + j * kVec);
          mass[j] = Vec16{};
          removed[j] = Vec16{};
        }
        out_pad.assign(kTileRows * kPanel, 0.0f);
        float* out_g = probs_data + g * m * n + col;
        for_each_logits_tile(kn + g * kn_g, kn_row, kn_col, b, ld, m, d,
                             [&](int64_t row, int rows, Vec16 (&acc)[kTileRows][4]) {
                               for (int i = 0; i < rows; ++i) {
                                 for (int j = 0; j < 4; ++j) {
                                   const Vec16 e = exp_vec(acc[i][j] - shift[j]);
                                   mass[j] += e;
                                   store16(out_pad.data() + i * kPanel + j * kVec, e);
                                 }
                                 std::copy(out_pad.data() + i * kPanel,
                                           out_pad.data() + i * kPanel + width,
                                           out_g + (row + i) * n);
                               }
                             });
        for_each_logits_tile(ko + g * ko_g, ko_row, ko_col, b, ld, m, d,
                             [&](int64_t, int rows, Vec16 (&acc)[kTileRows][4]) {
                               for (int i = 0; i < rows; ++i)
                                 for (int j = 0; j < 4; ++j)
                                   removed[j] += exp_vec(acc[i][j] - shift[j]);
                             });
        float mass_lanes[kPanel], removed_lanes[kPanel];
        for (int j = 0; j < 4; ++j) {
          store16(mass_lanes + j * kVec, mass[j]);
          store16(removed_lanes + j * kVec, removed[j]);
        }
        for (int64_t i = 0; i < width; ++i) {
          kept_data[g * n + col + i] = 1.0f - removed_lanes[i];
          total_data[g * n + col + i] = mass_lanes[i] + (1.0f - removed_lanes[i]);
        }
      } else {
        const int64_t width = std::min(kPanel, nk - col);
        int64_t ld = 0;
        const float* b = panel_of(kt + g * kt_g, kt_ld, d, col, width, pad, ld);
        float valid_lanes[kPanel] = {0.0f};
        std::fill(valid_lanes, valid_lanes + width, 1.0f);
        Vec16 valid[4];
        for (int j = 0; j < 4; ++j) valid[j] = load16(valid_lanes + j * kVec);
        const int64_t* rows_index = index_data + (g / heads) * r;
        float* partial_g = partial_data + (g * key_panels + col / kPanel) * r;
        for_each_logits_tile(qr + g * qr_g, qr_row, qr_col, b, ld, r, d,
                             [&](int64_t row, int rows, Vec16 (&acc)[kTileRows][4]) {
                               for (int i = 0; i < rows; ++i) {
                                 const float shift = norm_data[g * n + rows_index[row + i]];
                                 Vec16 sum = Vec16{};
                                 for (int j = 0; j < 4; ++j)
                                   sum += exp_vec(acc[i][j] - shift) * valid[j];
                                 float lanes[kVec];
                                 store16(lanes, sum);
                                 float s = 0.0f;
                                 for (int64_t l = 0; l < kVec; ++l) s += lanes[l];
                                 partial_g[row + i] = s;
                               }
                             });
      }
    }
  });

  // Updated rows: their recomputed mass, all of it kept. Then the checks.
  const MassCheck check(min_kept_mass, max_log_shift);
  std::vector<char> ok(groups, 1);
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t* rows_index = index_data + (g / heads) * r;
      for (int64_t t = 0; t < r; ++t) {
        float mass = 0.0f;
        for (int64_t p = 0; p < key_panels; ++p) mass += partial_data[(g * key_panels + p) * r + t];
        kept_data[g * n + rows_index[t]] = 1.0f;
        total_data[g * n + rows_index[t]] = mass;
      }
      ok[g] = check.passes(kept_data + g * n, total_data + g * n, n);
    }
  });
  return normalise_if_passed(ok, probs_data, norm_data, total_data, groups, m, n);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("error_norms", &error_norms, "L2 norms of c - p per token (B, N)");
  m.def("layer_norm_error_norms", &layer_norm_error_norms,
        "L2 norms of LayerNorm(x) - p per token (B, N)");
  m.def("update_softmax", &update_softmax,
        "incremental softmax normaliser update of the full eventful block");
  m.def("incremental_softmax", &incremental_softmax,
        "the full block's logits and softmax update of an incremental frame, fused");
  m.def("attention_update", &attention_update,
        "the full block's output update from the updated key columns and the references");
}

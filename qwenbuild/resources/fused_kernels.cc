// Fused float32 element-wise kernels for training on CPU, loaded by MindSpore as Custom (aot) ops.
//
// Each kernel is one pass over memory where MindSpore's composed kernels take four to nine, and it is
// single-threaded: these passes are memory-bound, and a second thread started per call costs more than it saves.
// Signature: MindSpore's aot convention, inputs then outputs in `params`; every tensor is contiguous.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

int64_t elements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// a non-zero return makes MindSpore raise: these kernels read and write float32 only
int not_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0 && std::strcmp(dtypes[i], "float") != 0) return 1;
  return 0;
}

const float *in(void **params, int i) { return static_cast<const float *>(params[i]); }
float *out(void **params, int i) { return static_cast<float *>(params[i]); }

}  // namespace

extern "C" {

// SwiGLU: out = silu(gate) * up.
// inputs gate, up [...]; output out [...].
int SwigluForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *gate = in(params, 0), *up = in(params, 1);
  float *y = out(params, 2);
  const int64_t n = elements(ndims[0], shapes[0]);
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    y[i] = g * up[i] / (1.0f + std::exp(-g));
  }
  return 0;
}

// With s = sigmoid(gate): d_gate = dy * up * s * (1 + gate * (1 - s)), d_up = dy * gate * s.
// inputs gate, up, dy [...]; outputs d_gate, d_up [...].
int SwigluBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *gate = in(params, 0), *up = in(params, 1), *dy = in(params, 2);
  float *d_gate = out(params, 3), *d_up = out(params, 4);
  const int64_t n = elements(ndims[0], shapes[0]);
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + std::exp(-g));
    d_up[i] = dy[i] * g * s;
    d_gate[i] = dy[i] * up[i] * s * (1.0f + g * (1.0f - s));
  }
  return 0;
}

// RoPE on every head at once: out = x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]) per head.
// inputs x [B, S, H, D], cos and sin [B or 1, S, H, D] (one table for every row of the batch); output out [B, S, H, D].
int RopeForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *x = in(params, 0), *cos = in(params, 1), *sin = in(params, 2);
  float *y = out(params, 3);
  const int64_t d = shapes[0][ndims[0] - 1], half = d / 2;
  const int64_t n = elements(ndims[0], shapes[0]), table = elements(ndims[1], shapes[1]);
  for (int64_t start = 0; start < n; start += d) {
    const float *xh = x + start, *c = cos + start % table, *s = sin + start % table;
    float *yh = y + start;
    for (int64_t j = 0; j < half; ++j) yh[j] = xh[j] * c[j] - xh[j + half] * s[j];
    for (int64_t j = half; j < d; ++j) yh[j] = xh[j] * c[j] + xh[j - half] * s[j];
  }
  return 0;
}

// The gradient of RopeForward with respect to x: dx = dy * cos + rotate_half^T(dy * sin).
// inputs dy [B, S, H, D], cos and sin [B or 1, S, H, D]; output dx [B, S, H, D].
int RopeBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *dy = in(params, 0), *cos = in(params, 1), *sin = in(params, 2);
  float *dx = out(params, 3);
  const int64_t d = shapes[0][ndims[0] - 1], half = d / 2;
  const int64_t n = elements(ndims[0], shapes[0]), table = elements(ndims[1], shapes[1]);
  for (int64_t start = 0; start < n; start += d) {
    const float *g = dy + start, *c = cos + start % table, *s = sin + start % table;
    float *gx = dx + start;
    for (int64_t j = 0; j < half; ++j) gx[j] = g[j] * c[j] + g[j + half] * s[j + half];
    for (int64_t j = half; j < d; ++j) gx[j] = g[j] * c[j] - g[j - half] * s[j - half];
  }
  return 0;
}

// RMSNorm of rows: y = x * r * weight with r = 1 / sqrt(mean(x^2) + eps) per row, r kept for the gradient.
// inputs x [N, W], weight [W], eps []; outputs y [N, W], r [N, 1].
int RmsNormForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *x = in(params, 0), *w = in(params, 1), eps = *in(params, 2);
  float *y = out(params, 3), *r = out(params, 4);
  const int64_t width = shapes[0][ndims[0] - 1], rows = elements(ndims[0], shapes[0]) / width;
  for (int64_t i = 0; i < rows; ++i) {
    const float *xi = x + i * width;
    float *yi = y + i * width;
    float squares = 0.0f;
    for (int64_t j = 0; j < width; ++j) squares += xi[j] * xi[j];
    const float ri = 1.0f / std::sqrt(squares / static_cast<float>(width) + eps);
    r[i] = ri;
    for (int64_t j = 0; j < width; ++j) yi[j] = xi[j] * ri * w[j];
  }
  return 0;
}

// With n = x * r and g = dy * weight: dx = r * (g - n * mean(g * n)) per row, d_weight = sum over rows of dy * n.
// inputs x [N, W], weight [W], r [N, 1], dy [N, W]; outputs dx [N, W], d_weight [W].
int RmsNormBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *x = in(params, 0), *w = in(params, 1), *r = in(params, 2), *dy = in(params, 3);
  float *dx = out(params, 4), *dw = out(params, 5);
  const int64_t width = shapes[0][ndims[0] - 1], rows = elements(ndims[0], shapes[0]) / width;
  std::vector<float> sums(width, 0.0f);
  for (int64_t i = 0; i < rows; ++i) {
    const float *xi = x + i * width, *gi = dy + i * width;
    float *dxi = dx + i * width;
    const float ri = r[i];
    float dot = 0.0f;
    for (int64_t j = 0; j < width; ++j) {
      const float n = xi[j] * ri;
      dot += gi[j] * w[j] * n;
      sums[j] += gi[j] * n;
    }
    const float mean = dot / static_cast<float>(width);
    for (int64_t j = 0; j < width; ++j) dxi[j] = ri * (gi[j] * w[j] - xi[j] * ri * mean);
  }
  for (int64_t j = 0; j < width; ++j) dw[j] = sums[j];
  return 0;
}

}  // extern "C"

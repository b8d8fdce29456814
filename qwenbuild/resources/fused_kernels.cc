// Fused float32 element-wise kernels for training on CPU, loaded by MindSpore as Custom (aot) ops.
//
// Each kernel is one pass over memory where MindSpore's composed kernels take four to nine. The activation and
// softmax kernels are single-threaded: at training sizes a second thread started per call costs more than it saves.
// The cross entropy, the sum of squares and the AdamW update split large inputs over threads (a vocabulary-wide row,
// a whole gradient, a whole parameter).
// Signature: MindSpore's aot convention, inputs then outputs in `params`; every tensor is contiguous.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
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

// exp(x) for x <= 0, exactly 0 below -80 (where exp(x) < 2e-35, nothing beside a term of 1 in float32): libmvec's
// vector expf takes a scalar path for a whole vector when one lane is out of its range, as masked scores are
inline float exp_of_nonpositive(float x) {
  const float e = std::exp(std::max(x, -80.0f));
  return x < -80.0f ? 0.0f : e;
}

const float *in(void **params, int i) { return static_cast<const float *>(params[i]); }
float *out(void **params, int i) { return static_cast<float *>(params[i]); }

// rows [0, rows) split over up to `threads` threads of at least `per_thread` elements each (a thread started per
// call costs more than a smaller share saves); work(begin, end) runs on each part
template <typename Work>
void over_rows(int64_t rows, int64_t width, int64_t threads, Work work) {
  const int64_t per_thread = 1 << 18;
  threads = std::max<int64_t>(1, std::min<int64_t>(threads, rows * width / per_thread));
  const int64_t chunk = (rows + threads - 1) / threads;
  std::vector<std::thread> others;
  for (int64_t t = 1; t < threads; ++t)
    others.emplace_back(work, std::min(rows, chunk * t), std::min(rows, chunk * (t + 1)));
  work(0, std::min(rows, chunk));
  for (auto &t : others) t.join();
}

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

// Softmax over the last axis of x + bias, as attention scores take their mask. The bias repeats over x's leading
// matrices: x [..., Sq, Sk] holds M matrices of Sq x Sk, bias [..., Sq, Sk] holds Mb (1 or a divisor of M), matrix
// k of x taking the bias's k / (M / Mb).
// inputs x, bias; output y (the shape of x).
int MaskedSoftmaxForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *x = in(params, 0), *bias = in(params, 1);
  float *y = out(params, 2);
  const int64_t sk = shapes[0][ndims[0] - 1], sq = shapes[0][ndims[0] - 2];
  const int64_t matrix = sq * sk, matrices = elements(ndims[0], shapes[0]) / matrix;
  const int64_t per_bias = matrices / (elements(ndims[1], shapes[1]) / matrix);
  for (int64_t k = 0; k < matrices; ++k) {
    const float *b = bias + (k / per_bias) * matrix;
    for (int64_t i = 0; i < sq; ++i) {
      const float *xi = x + k * matrix + i * sk, *bi = b + i * sk;
      float *yi = y + k * matrix + i * sk;
      float top = std::numeric_limits<float>::lowest();  // -ffast-math assumes no infinities
      for (int64_t j = 0; j < sk; ++j) {
        yi[j] = xi[j] + bi[j];
        top = std::max(top, yi[j]);
      }
      float sum = 0.0f;
      for (int64_t j = 0; j < sk; ++j) {
        yi[j] = exp_of_nonpositive(yi[j] - top);
        sum += yi[j];
      }
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < sk; ++j) yi[j] *= inv;
    }
  }
  return 0;
}

// The softmax's gradient per row: dx = y * (dy - sum(dy * y)).
// inputs y, dy [..., W]; output dx [..., W].
int SoftmaxBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *y = in(params, 0), *dy = in(params, 1);
  float *dx = out(params, 2);
  const int64_t width = shapes[0][ndims[0] - 1], rows = elements(ndims[0], shapes[0]) / width;
  for (int64_t i = 0; i < rows; ++i) {
    const float *yi = y + i * width, *gi = dy + i * width;
    float *dxi = dx + i * width;
    float dot = 0.0f;
    for (int64_t j = 0; j < width; ++j) dot += yi[j] * gi[j];
    for (int64_t j = 0; j < width; ++j) dxi[j] = yi[j] * (gi[j] - dot);
  }
  return 0;
}

// Cross entropy of each row of logits against its label: loss = lse - logits[label], lse = log(sum(exp(logits))).
// inputs logits [N, V], labels [N] (int32, each in [0, V)), threads [] (float32); outputs loss [N], lse [N].
int CrossEntropyForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                        void *) {
  if (not_float32(1, dtypes) || std::strcmp(dtypes[1], "int32") != 0 || not_float32(nparam - 2, dtypes + 2)) return 1;
  const float *logits = in(params, 0);
  const int32_t *labels = static_cast<const int32_t *>(params[1]);
  float *loss = out(params, 3), *lse = out(params, 4);
  const int64_t vocab = shapes[0][ndims[0] - 1], rows = elements(ndims[0], shapes[0]) / vocab;
  for (int64_t i = 0; i < rows; ++i)
    if (labels[i] < 0 || labels[i] >= vocab) return 1;
  over_rows(rows, vocab, static_cast<int64_t>(*in(params, 2)), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *li = logits + i * vocab;
      float top = std::numeric_limits<float>::lowest();  // -ffast-math assumes no infinities
      for (int64_t j = 0; j < vocab; ++j) top = std::max(top, li[j]);
      float sum = 0.0f;
      for (int64_t j = 0; j < vocab; ++j) sum += exp_of_nonpositive(li[j] - top);
      lse[i] = top + std::log(sum);
      loss[i] = lse[i] - li[labels[i]];
    }
  });
  return 0;
}

// The gradient of CrossEntropyForward's loss: dlogits = (exp(logits - lse) - onehot(label)) * dloss per row.
// inputs logits [N, V], labels [N] (int32), lse [N], dloss [N], threads []; output dlogits [N, V].
int CrossEntropyBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                         void *) {
  if (not_float32(1, dtypes) || std::strcmp(dtypes[1], "int32") != 0 || not_float32(nparam - 2, dtypes + 2)) return 1;
  const float *logits = in(params, 0), *lse = in(params, 2), *dloss = in(params, 3);
  const int32_t *labels = static_cast<const int32_t *>(params[1]);
  float *dlogits = out(params, 5);
  const int64_t vocab = shapes[0][ndims[0] - 1], rows = elements(ndims[0], shapes[0]) / vocab;
  over_rows(rows, vocab, static_cast<int64_t>(*in(params, 4)), [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float *li = logits + i * vocab;
      float *di = dlogits + i * vocab;
      const float top = lse[i], scale = dloss[i];
      for (int64_t j = 0; j < vocab; ++j) di[j] = exp_of_nonpositive(li[j] - top) * scale;
      di[labels[i]] -= scale;
    }
  });
  return 0;
}

// The sum of the squares of every element, accumulated in double (the global norm of the gradients for clipping).
// inputs x [...], threads [] (float32); output sum [1, 1].
int SumOfSquares(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  const float *x = in(params, 0);
  const int64_t n = elements(ndims[0], shapes[0]), block = 1 << 12, blocks = (n + block - 1) / block;
  std::vector<double> partial(blocks, 0.0);
  over_rows(blocks, block, static_cast<int64_t>(*in(params, 1)), [=, &partial](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float sum = 0.0f;  // a block of float squares, then double: vectorised and still exact enough
      for (int64_t i = b * block; i < std::min(n, (b + 1) * block); ++i) sum += x[i] * x[i];
      partial[b] = sum;
    }
  });
  double total = 0.0;
  for (double p : partial) total += p;
  out(params, 2)[0] = static_cast<float>(total);
  return 0;
}

// AdamW in place, as torch's: with g = grad * clip_scale,
//   m = b1 m + (1 - b1) g,  v = b2 v + (1 - b2) g^2,  p = p * keep - step * m / (sqrt(v) + eps)
// where the caller folds the learning rate, weight decay and bias corrections into keep, step and eps.
// inputs p, m, v (parameter and moments, written in place), grad [...], hyper [7]: clip_scale, b1, b2, keep, step,
// eps, threads; output done [1] (MindSpore needs an output; the update is the side effect).
int AdamWUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (not_float32(nparam, dtypes)) return 1;
  float *p = out(params, 0), *m = out(params, 1), *v = out(params, 2);
  const float *grad = in(params, 3), *h = in(params, 4);
  const float scale = h[0], b1 = h[1], b2 = h[2], keep = h[3], step = h[4], eps = h[5];
  const int64_t n = elements(ndims[0], shapes[0]);
  auto update = [=](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float g = grad[i] * scale;
      const float mi = b1 * m[i] + (1.0f - b1) * g;
      const float vi = b2 * v[i] + (1.0f - b2) * g * g;
      m[i] = mi;
      v[i] = vi;
      p[i] = p[i] * keep - step * mi / (std::sqrt(vi) + eps);
    }
  };
  // split in runs of 16 elements, so each thread's part starts on a vector boundary
  const int64_t run = 16;
  over_rows((n + run - 1) / run, run, static_cast<int64_t>(h[6]),
            [=](int64_t begin, int64_t end) { update(begin * run, std::min(n, end * run)); });
  out(params, 5)[0] = 0.0f;
  return 0;
}

}  // extern "C"

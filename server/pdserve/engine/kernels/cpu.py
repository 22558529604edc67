"""CPU kernels: oneDNN linears with prepacked weights, decode attention straight from the paged
pool (a small C++ kernel, no gather), 4-D SDPA for prefill.

Why each piece (docs/engine.md; the measurements are in bench/RESULTS.md):
- Linears: MKL's sgemm repacks the weight on every call; at decode sizes (32 rows) that costs
  about as much as the multiply. oneDNN with the weight reordered once at load
  (torch.ops.mkldnn._reorder_linear_weight + _linear_pointwise) skips it. In bfloat16 oneDNN
  needs native bf16 support (avx512_bf16, AMX or avx_ne_convert); without it torch's own bf16
  GEMM is slow, so the weights are kept in float32 for the GEMM (see `native_bf16`).
- Float32 linears of a decode step (a few rows): the weights stream from memory once per step,
  and oneDNN's blocked weights run well below their in-cache speed there. Weight panels (16
  outputs' weights, one contiguous [K][16] run) are read in order, with the next panel prefetched
  while one is multiplied; prefill (many rows) stays on oneDNN, which is faster there.
- The compiled kernels let go of the GIL while they run, so the engine process's asyncio thread
  (streaming the outputs) is not held up by them.
- Decode attention: gathering each sequence's blocks into a padded tensor reads and writes the
  whole context twice per layer and allocates it fresh every step; the kernel below walks the
  block table and reads every key and value once, in place, with an online softmax per head
  group (GQA heads share each key load). It is compiled at first use with the host's compiler
  (torch.utils.cpp_extension, cached per CPU type); if that fails, a gather into reused buffers
  followed by grouped matmuls runs instead.
- Prefill: 4-D inputs to SDPA take torch's flash kernel for CPU (3-D inputs fall back to the
  math kernel), from kernels/reference.py.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading

import torch
import torch.nn.functional as F

from pdserve.engine.kernels.reference import BlockGather, Linear, TorchKernels

log = logging.getLogger(__name__)

_CPP = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <type_traits>

static inline float to_float(float x) { return x; }
static inline float to_float(at::BFloat16 x) {
  uint32_t u = uint32_t(x.x) << 16; float f; std::memcpy(&f, &u, 4); return f;
}
static inline void from_float(float x, float* p) { *p = x; }
static inline void from_float(float x, at::BFloat16* p) { *p = at::BFloat16(x); }

template <typename T>
static inline void prefetch_row(const T* p, int64_t elems) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < elems * (int64_t)sizeof(T); off += 64) __builtin_prefetch(c + off, 0, 3);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PDSERVE_AVX2 1
static inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 load8(const at::BFloat16* p) {
  __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
static inline float hsum8(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
// exp for x <= 0 (scores minus their maximum): Cephes' expf polynomial, about 1 ulp.
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

// out[b, h, :] = softmax(q[b, h] . K[b]^T * scale) V[b], K and V read in place from the pool
// [num_blocks, layers, 2, block_size, kv_heads, dim] through block_tables[b] for context_lens[b] tokens.
// One task is one sequence and a range of its KV heads (all of them when there are enough
// sequences to keep every thread busy): the keys of one token for those heads are one
// contiguous row, read once; the query heads of a GQA group share each key and value load.
template <typename T, int D>
static void decode_kernel(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv, int64_t layer,
                          const torch::Tensor& tables, const torch::Tensor& lens, float scale) {
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t BS = kv.size(3), KVH = kv.size(4);
  const int64_t G = H / KVH;
  const int64_t s_block = kv.stride(0), s_kv = kv.stride(2), s_tok = kv.stride(3), s_head = kv.stride(4);
  const T* base = kv.data_ptr<T>() + layer * kv.stride(1);
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t tab_stride = tables.stride(0);
  const int64_t* len = lens.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs_b = q.stride(0), qs_h = q.stride(1);
  int64_t max_len = 1;
  for (int64_t b = 0; b < B; ++b) max_len = std::max(max_len, len[b]);
  const int64_t splits = (B >= 2 * at::get_num_threads()) ? 1 : KVH;   // KV-head ranges per sequence
  const int64_t per = KVH / splits;
  at::parallel_for(0, B * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(per * G * max_len), qf(per * G * D), acc(per * G * D), row(D);
    std::vector<float> inv(per * G);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, g0 = (task % splits) * per, n = len[b];
      const int64_t nh = per * G;   // query heads of this task: g0 * G .. (g0 + per) * G
      for (int64_t h = 0; h < nh; ++h)
        for (int d = 0; d < D; ++d) qf[h * D + d] = to_float(qp[b * qs_b + (g0 * G + h) * qs_h + d]) * scale;
      for (int64_t t0 = 0; t0 < n; t0 += BS) {
        const T* kb = base + tab[b * tab_stride + t0 / BS] * s_block;
        const int64_t m = std::min(BS, n - t0);
        // blocks are scattered: fetch the next one's rows while this one is computed
        const T* kn = t0 + BS < n ? base + tab[b * tab_stride + t0 / BS + 1] * s_block : nullptr;
        for (int64_t j = 0; j < m; ++j) {
          if (kn) prefetch_row(kn + j * s_tok + g0 * s_head, per * s_head);
          for (int64_t g = 0; g < per; ++g) {
            const T* kp = kb + j * s_tok + (g0 + g) * s_head;
#ifdef PDSERVE_AVX2
            if constexpr (D % 8 == 0) {
              __m256 k[D / 8];
              for (int c = 0; c < D / 8; ++c) k[c] = load8(kp + 8 * c);
              for (int64_t i = 0; i < G; ++i) {
                const float* qh = &qf[(g * G + i) * D];
                __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), k[0]);
                for (int c = 1; c < D / 8; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), k[c], a);
                scores[(g * G + i) * max_len + t0 + j] = hsum8(a);
              }
              continue;
            }
#endif
            for (int d = 0; d < D; ++d) row[d] = to_float(kp[d]);
            for (int64_t i = 0; i < G; ++i) {
              const float* qh = &qf[(g * G + i) * D];
              float a = 0.f;
#pragma omp simd reduction(+:a)
              for (int d = 0; d < D; ++d) a += qh[d] * row[d];
              scores[(g * G + i) * max_len + t0 + j] = a;
            }
          }
        }
      }
      for (int64_t h = 0; h < nh; ++h) {
        float* s = &scores[h * max_len];
        float mx = -INFINITY;
        for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
        float sum = 0.f;
        int64_t t = 0;
#ifdef PDSERVE_AVX2
        __m256 vsum = _mm256_setzero_ps(), vmx = _mm256_set1_ps(mx);
        for (; t + 8 <= n; t += 8) {
          __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), vmx));
          _mm256_storeu_ps(s + t, e);
          vsum = _mm256_add_ps(vsum, e);
        }
        sum = hsum8(vsum);
#endif
        for (; t < n; ++t) { s[t] = std::exp(s[t] - mx); sum += s[t]; }
        inv[h] = 1.f / sum;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += BS) {
        const T* vb = base + tab[b * tab_stride + t0 / BS] * s_block + s_kv;
        const int64_t m = std::min(BS, n - t0);
        const T* vn = t0 + BS < n ? base + tab[b * tab_stride + t0 / BS + 1] * s_block + s_kv : nullptr;
        for (int64_t j = 0; j < m; ++j) {
          if (vn) prefetch_row(vn + j * s_tok + g0 * s_head, per * s_head);
          for (int64_t g = 0; g < per; ++g) {
            const T* vp = vb + j * s_tok + (g0 + g) * s_head;
#ifdef PDSERVE_AVX2
            if constexpr (D % 8 == 0) {
              __m256 v[D / 8];
              for (int c = 0; c < D / 8; ++c) v[c] = load8(vp + 8 * c);
              for (int64_t i = 0; i < G; ++i) {
                const __m256 p = _mm256_set1_ps(scores[(g * G + i) * max_len + t0 + j]);
                float* ah = &acc[(g * G + i) * D];
                for (int c = 0; c < D / 8; ++c)
                  _mm256_storeu_ps(ah + 8 * c, _mm256_fmadd_ps(p, v[c], _mm256_loadu_ps(ah + 8 * c)));
              }
              continue;
            }
#endif
            for (int d = 0; d < D; ++d) row[d] = to_float(vp[d]);
            for (int64_t i = 0; i < G; ++i) {
              const float p = scores[(g * G + i) * max_len + t0 + j];
              float* ah = &acc[(g * G + i) * D];
#pragma omp simd
              for (int d = 0; d < D; ++d) ah[d] += p * row[d];
            }
          }
        }
      }
      for (int64_t h = 0; h < nh; ++h)
        for (int d = 0; d < D; ++d) from_float(acc[h * D + d] * inv[h], &op[(b * H + g0 * G + h) * D + d]);
    }
  });
}

#ifdef PDSERVE_AVX2
// The same attention in one pass over the context (online softmax, block by block): each block's
// keys and values (adjacent in the pool) are read together, and the next block is prefetched.
template <typename T, int D>
static void decode_kernel_avx2(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv, int64_t layer,
                               const torch::Tensor& tables, const torch::Tensor& lens, float scale) {
  const int64_t B = q.size(0), H = q.size(1);
  const int64_t BS = kv.size(3), KVH = kv.size(4);
  const int64_t G = H / KVH;
  const int64_t s_block = kv.stride(0), s_kv = kv.stride(2), s_tok = kv.stride(3), s_head = kv.stride(4);
  const T* base = kv.data_ptr<T>() + layer * kv.stride(1);
  const int64_t* tab = tables.data_ptr<int64_t>();
  const int64_t tab_stride = tables.stride(0);
  const int64_t* len = lens.data_ptr<int64_t>();
  const T* qp = q.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs_b = q.stride(0), qs_h = q.stride(1);
  const int64_t splits = (B >= 2 * at::get_num_threads()) ? 1 : KVH;
  const int64_t per = KVH / splits;
  at::parallel_for(0, B * splits, 1, [&](int64_t begin, int64_t end) {
    const int64_t nh = per * G;
    std::vector<float> qf(nh * D), acc(nh * D), sc(nh * BS), mx(nh), sum(nh);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, g0 = (task % splits) * per, n = len[b];
      for (int64_t h = 0; h < nh; ++h) {
        for (int d = 0; d < D; ++d) qf[h * D + d] = to_float(qp[b * qs_b + (g0 * G + h) * qs_h + d]) * scale;
        mx[h] = -INFINITY;
        sum[h] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += BS) {
        const T* kb = base + tab[b * tab_stride + t0 / BS] * s_block + g0 * s_head;
        const T* vb = kb + s_kv;
        const int64_t m = std::min(BS, n - t0);
        // the next block's rows are fetched a row per token, spread over this block's work
        const T* nb = t0 + BS < n ? base + tab[b * tab_stride + t0 / BS + 1] * s_block + g0 * s_head : nullptr;
        for (int64_t j = 0; j < m; ++j) {
          if (nb) prefetch_row(nb + j * s_tok, per * s_head);
          for (int64_t g = 0; g < per; ++g) {
            const T* kp = kb + j * s_tok + g * s_head;
            __m256 k[D / 8];
            for (int c = 0; c < D / 8; ++c) k[c] = load8(kp + 8 * c);
            for (int64_t i = 0; i < G; ++i) {
              const float* qh = &qf[(g * G + i) * D];
              __m256 a = _mm256_mul_ps(_mm256_loadu_ps(qh), k[0]);
              for (int c = 1; c < D / 8; ++c) a = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), k[c], a);
              sc[(g * G + i) * BS + j] = hsum8(a);
            }
          }
        }
        for (int64_t h = 0; h < nh; ++h) {
          float* s = &sc[h * BS];
          float bm = mx[h];
          for (int64_t j = 0; j < m; ++j) bm = std::max(bm, s[j]);
          if (bm > mx[h]) {
            const float corr = std::exp(mx[h] - bm);   // 0 for the first block
            sum[h] *= corr;
            const __m256 vc = _mm256_set1_ps(corr);
            float* ah = &acc[h * D];
            for (int c = 0; c < D / 8; ++c) _mm256_storeu_ps(ah + 8 * c, _mm256_mul_ps(vc, _mm256_loadu_ps(ah + 8 * c)));
            mx[h] = bm;
          }
          int64_t j = 0;
          __m256 vs = _mm256_setzero_ps();
          const __m256 vm = _mm256_set1_ps(bm);
          for (; j + 8 <= m; j += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vm));
            _mm256_storeu_ps(s + j, e);
            vs = _mm256_add_ps(vs, e);
          }
          float total = hsum8(vs);
          for (; j < m; ++j) { s[j] = std::exp(s[j] - bm); total += s[j]; }
          sum[h] += total;
        }
        for (int64_t j = 0; j < m; ++j) {
          if (nb) prefetch_row(nb + s_kv + j * s_tok, per * s_head);
          for (int64_t g = 0; g < per; ++g) {
            const T* vp = vb + j * s_tok + g * s_head;
            __m256 v[D / 8];
            for (int c = 0; c < D / 8; ++c) v[c] = load8(vp + 8 * c);
            for (int64_t i = 0; i < G; ++i) {
              const __m256 p = _mm256_set1_ps(sc[(g * G + i) * BS + j]);
              float* ah = &acc[(g * G + i) * D];
              for (int c = 0; c < D / 8; ++c)
                _mm256_storeu_ps(ah + 8 * c, _mm256_fmadd_ps(p, v[c], _mm256_loadu_ps(ah + 8 * c)));
            }
          }
        }
      }
      for (int64_t h = 0; h < nh; ++h) {
        const float inv = 1.f / sum[h];
        for (int d = 0; d < D; ++d) from_float(acc[h * D + d] * inv, &op[(b * H + g0 * G + h) * D + d]);
      }
    }
  });
}
#endif

template <typename T>
static void dispatch_dim(torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& kv, int64_t layer,
                         const torch::Tensor& tables, const torch::Tensor& lens, float scale) {
#ifdef PDSERVE_AVX2
  switch (q.size(2)) {
    case 64: return decode_kernel_avx2<T, 64>(out, q, kv, layer, tables, lens, scale);
    case 128: return decode_kernel_avx2<T, 128>(out, q, kv, layer, tables, lens, scale);
    case 16: return decode_kernel_avx2<T, 16>(out, q, kv, layer, tables, lens, scale);
    case 32: return decode_kernel_avx2<T, 32>(out, q, kv, layer, tables, lens, scale);
    case 256: return decode_kernel_avx2<T, 256>(out, q, kv, layer, tables, lens, scale);
    case 80: return decode_kernel_avx2<T, 80>(out, q, kv, layer, tables, lens, scale);
    case 96: return decode_kernel_avx2<T, 96>(out, q, kv, layer, tables, lens, scale);
    default: break;
  }
#endif
  switch (q.size(2)) {
    case 64: return decode_kernel<T, 64>(out, q, kv, layer, tables, lens, scale);
    case 128: return decode_kernel<T, 128>(out, q, kv, layer, tables, lens, scale);
    case 16: return decode_kernel<T, 16>(out, q, kv, layer, tables, lens, scale);
    case 32: return decode_kernel<T, 32>(out, q, kv, layer, tables, lens, scale);
    case 256: return decode_kernel<T, 256>(out, q, kv, layer, tables, lens, scale);
    case 80: return decode_kernel<T, 80>(out, q, kv, layer, tables, lens, scale);
    case 96: return decode_kernel<T, 96>(out, q, kv, layer, tables, lens, scale);
    default: TORCH_CHECK(false, "paged_decode: unsupported head size ", q.size(2));
  }
}

// ---- the layer body's small ops: one pass each, in place where the model allows it --------------
// Rows per task: enough elements that a thread's share outweighs waking it.
static inline int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1)); }

// out = rms_norm(x) * w per row; with `res`, first res = x + res (the residual stream, rounded
// to T like torch's add) and the norm is of that. Float32 math, rounded as kernels/reference.py.
template <typename T>
static void rms_norm_rows(T* out, const T* x, int64_t xs, T* res, int64_t rs, const T* w, int64_t rows, int64_t n,
                          float eps) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    std::vector<float> buf(n);
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * xs;
      float ss = 0.f;
      if (res) {
        T* rr = res + r * rs;
        for (int64_t i = 0; i < n; ++i) {
          from_float(to_float(xr[i]) + to_float(rr[i]), &rr[i]);
          buf[i] = to_float(rr[i]);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) buf[i] = to_float(xr[i]);
      }
#pragma omp simd reduction(+:ss)
      for (int64_t i = 0; i < n; ++i) ss += buf[i] * buf[i];
      const float inv = 1.f / std::sqrt(ss / (float)n + eps);
      T* o = out + r * n;
      for (int64_t i = 0; i < n; ++i) {
        T normed;
        from_float(buf[i] * inv, &normed);
        from_float(to_float(w[i]) * to_float(normed), &o[i]);
      }
    }
  });
}

void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor residual, torch::Tensor w, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.is_contiguous() && w.is_contiguous() && w.numel() == n);
  const bool add = residual.numel() > 0;
  TORCH_CHECK(!add || (residual.dim() == 2 && residual.stride(1) == 1 && residual.size(0) == rows));
  TORCH_CHECK(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kBFloat16, "rms_norm: float32 or bfloat16 only");
  py::gil_scoped_release nogil;
  if (x.scalar_type() == torch::kFloat)
    rms_norm_rows<float>(out.data_ptr<float>(), x.data_ptr<float>(), x.stride(0),
                         add ? residual.data_ptr<float>() : nullptr, add ? residual.stride(0) : 0,
                         w.data_ptr<float>(), rows, n, (float)eps);
  else if (x.scalar_type() == torch::kBFloat16)
    rms_norm_rows<at::BFloat16>(out.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), x.stride(0),
                                add ? residual.data_ptr<at::BFloat16>() : nullptr, add ? residual.stride(0) : 0,
                                w.data_ptr<at::BFloat16>(), rows, n, (float)eps);
}

// out[t] = silu(gate[t]) * up[t], gate_up[t] = [gate | up]; silu rounded to T first, as torch does
template <typename T>
static void silu_mul_rows(T* out, const T* gu, int64_t gs, int64_t rows, int64_t n) {
  at::parallel_for(0, rows, row_grain(n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * gs;
      const T* u = g + n;
      T* o = out + r * n;
      int64_t i = 0;
#ifdef PDSERVE_AVX2
      if constexpr (std::is_same<T, float>::value) {
        const __m256 one = _mm256_set1_ps(1.f), hi = _mm256_set1_ps(88.f);
        for (; i + 8 <= n; i += 8) {
          const __m256 x = _mm256_loadu_ps(g + i);
          const __m256 e = exp8(_mm256_min_ps(_mm256_sub_ps(_mm256_setzero_ps(), x), hi));
          const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, e));
          _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
        }
      }
#endif
      for (; i < n; ++i) {
        const float x = to_float(g[i]);
        T silu;
        from_float(x / (1.f + std::exp(-x)), &silu);
        from_float(to_float(silu) * to_float(u[i]), &o[i]);
      }
    }
  });
}

void silu_and_mul(torch::Tensor out, torch::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && out.is_contiguous());
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat || gate_up.scalar_type() == torch::kBFloat16,
              "silu_and_mul: float32 or bfloat16 only");
  py::gil_scoped_release nogil;
  if (gate_up.scalar_type() == torch::kFloat)
    silu_mul_rows<float>(out.data_ptr<float>(), gate_up.data_ptr<float>(), gate_up.stride(0), rows, n);
  else if (gate_up.scalar_type() == torch::kBFloat16)
    silu_mul_rows<at::BFloat16>(out.data_ptr<at::BFloat16>(), gate_up.data_ptr<at::BFloat16>(),
                                gate_up.stride(0), rows, n);
}

// Writes each token's K and V rows [KVH * D] into its slot of the pool (one copy per row).
void store_kv(torch::Tensor kv, int64_t layer, torch::Tensor k, torch::Tensor v, torch::Tensor blocks,
              torch::Tensor offsets) {
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && k.stride(1) == k.size(2) &&
              v.stride(2) == 1 && v.stride(1) == v.size(2) && kv.stride(5) == 1 && kv.stride(4) == kv.size(5));
  TORCH_CHECK(k.scalar_type() == kv.scalar_type() && v.scalar_type() == kv.scalar_type());
  TORCH_CHECK(blocks.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong &&
              blocks.is_contiguous() && offsets.is_contiguous() && blocks.numel() == T && offsets.numel() == T);
  const int64_t es = kv.element_size();
  char* base = static_cast<char*>(kv.data_ptr()) + layer * kv.stride(1) * es;
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  const int64_t* bl = blocks.data_ptr<int64_t>();
  const int64_t* of = offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) {
    char* slot = base + (bl[t] * kv.stride(0) + of[t] * kv.stride(3)) * es;
    std::memcpy(slot, kp + t * k.stride(0) * es, row * es);
    std::memcpy(slot + kv.stride(2) * es, vp + t * v.stride(0) * es, row * es);
  }
}

// ---- float32 linears for a few rows (decode steps) ----------------------------------------------
// At decode sizes the weights stream from memory once per step, where oneDNN's blocked weights
// run well below their in-cache speed. Here each 16 outputs' weights are one contiguous panel
// [K][16] read in order (pack_panels in Python lays them out), and while one panel is
// multiplied the next one is prefetched.
#ifdef PDSERVE_AVX2
// rows R (<= 6) of x times one panel: 2 x R accumulators of 8 outputs, kept in registers
template <int R>
static inline void panel_tile(const float* a, int64_t lda, const float* b, int64_t K, const float* bias,
                              float* c, int64_t ldc, int cols, const char*& pf, int every) {
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00,
         c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  const float *a0 = a, *a1 = a + lda, *a2 = a + 2 * lda, *a3 = a + 3 * lda, *a4 = a + 4 * lda, *a5 = a + 5 * lda;
  int count = 0;
#define PDSERVE_ROW(r) if constexpr (R > r) { const __m256 x = _mm256_broadcast_ss(a##r + k); \
    c##r##0 = _mm256_fmadd_ps(x, b0, c##r##0); c##r##1 = _mm256_fmadd_ps(x, b1, c##r##1); }
  for (int64_t k = 0; k < K; ++k) {
    const __m256 b0 = _mm256_loadu_ps(b + k * 16), b1 = _mm256_loadu_ps(b + k * 16 + 8);
    PDSERVE_ROW(0) PDSERVE_ROW(1) PDSERVE_ROW(2) PDSERVE_ROW(3) PDSERVE_ROW(4) PDSERVE_ROW(5)
    if (pf && ++count == every) { count = 0; _mm_prefetch(pf, _MM_HINT_T0); pf += 64; }
  }
#undef PDSERVE_ROW
  const __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
  float row[16];
  for (int r = 0; r < R; ++r) {
    __m256 lo = acc[r][0], hi = acc[r][1];
    if (cols == 16) {
      if (bias) { lo = _mm256_add_ps(lo, _mm256_loadu_ps(bias)); hi = _mm256_add_ps(hi, _mm256_loadu_ps(bias + 8)); }
      _mm256_storeu_ps(c + r * ldc, lo);
      _mm256_storeu_ps(c + r * ldc + 8, hi);
    } else {
      _mm256_storeu_ps(row, lo);
      _mm256_storeu_ps(row + 8, hi);
      for (int j = 0; j < cols; ++j) c[r * ldc + j] = row[j] + (bias ? bias[j] : 0.f);
    }
  }
}
#endif

// out [M, N] = x [M, K] @ W^T + bias, W as pack_panels (Python) laid it out
void panel_linear(torch::Tensor out, torch::Tensor x, torch::Tensor panels, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == torch::kFloat && out.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K && panels.size(2) == 16 && P == (N + 15) / 16 && out.size(0) == M);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == N && bias.is_contiguous() && bias.scalar_type() == torch::kFloat));
#ifdef PDSERVE_AVX2
  const float* a = x.data_ptr<float>();
  const float* b = panels.data_ptr<float>();
  const float* bs = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* c = out.data_ptr<float>();
  const int64_t lda = x.stride(0);
  py::gil_scoped_release nogil;
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    const int every = (int)std::max<int64_t>(1, (M + 5) / 6);   // tiles per panel share its prefetching
    for (int64_t p = p0; p < p1; ++p) {
      const float* bp = b + p * K * 16;
      const int cols = (int)std::min<int64_t>(16, N - p * 16);
      const float* pb = bs ? bs + p * 16 : nullptr;
      float* cp = c + p * 16;
      const char* pf = p + 1 < p1 ? reinterpret_cast<const char*>(bp + K * 16) : nullptr;
      int64_t m = 0;
      for (; m + 6 <= M; m += 6) panel_tile<6>(a + m * lda, lda, bp, K, pb, cp + m * N, N, cols, pf, every);
      switch (M - m) {
        case 5: panel_tile<5>(a + m * lda, lda, bp, K, pb, cp + m * N, N, cols, pf, every); break;
        case 4: panel_tile<4>(a + m * lda, lda, bp, K, pb, cp + m * N, N, cols, pf, every); break;
        case 3: panel_tile<3>(a + m * lda, lda, bp, K, pb, cp + m * N, N, cols, pf, every); break;
        case 2: panel_tile<2>(a + m * lda, lda, bp, K, pb, cp + m * N, N, cols, pf, every); break;
        case 1: panel_tile<1>(a + m * lda, lda, bp, K, pb, cp + m * N, N, cols, pf, every); break;
        default: break;
      }
    }
  });
#else
  TORCH_CHECK(false, "panel_linear: built without AVX2");
#endif
}

void paged_decode(torch::Tensor out, torch::Tensor q, torch::Tensor kv, int64_t layer,
                  torch::Tensor tables, torch::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 6 && q.stride(2) == 1 && kv.stride(5) == 1 && out.is_contiguous());
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() && out.scalar_type() == kv.scalar_type());
  TORCH_CHECK(tables.scalar_type() == torch::kLong && lens.scalar_type() == torch::kLong && lens.is_contiguous());
  TORCH_CHECK(q.size(1) % kv.size(4) == 0 && q.size(2) == kv.size(5));
  py::gil_scoped_release nogil;   // the worker's asyncio thread runs while the kernel does
  if (kv.scalar_type() == torch::kFloat) dispatch_dim<float>(out, q, kv, layer, tables, lens, (float)scale);
  else if (kv.scalar_type() == torch::kBFloat16) dispatch_dim<at::BFloat16>(out, q, kv, layer, tables, lens, (float)scale);
  else TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
}
"""

EXT_HEAD_SIZES = (16, 32, 64, 80, 96, 128, 256)
_NONE = torch.empty(0)   # rms_norm without a residual
_ext = None
_ext_error: str | None = None
_ext_lock = threading.Lock()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (oneDNN's bf16 GEMM runs fast)."""
    flags = _cpu_flags()
    return bool(flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"})


def paged_decode_extension():
    """The compiled decode-attention kernel, or None (the reason is in _ext_error)."""
    global _ext, _ext_error
    if os.environ.get("PDSERVE_CPU_ATTENTION", "") == "torch":
        _ext_error = "disabled by PDSERVE_CPU_ATTENTION=torch"
        return None
    with _ext_lock:
        if _ext is not None or _ext_error is not None:
            return _ext
        try:
            from torch.utils.cpp_extension import load_inline

            # -march=native: the build is cached per source and CPU type, so a cache shared by
            # different machines never hands one CPU's instructions to another.
            key = hashlib.sha1((_CPP + platform.machine() + " ".join(sorted(_cpu_flags()))).encode()).hexdigest()[:12]
            _ext = load_inline(
                name=f"pdserve_paged_decode_{key}", cpp_sources=_CPP, functions=["paged_decode", "rms_norm", "silu_and_mul", "store_kv", "panel_linear"],
                extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"],
                extra_ldflags=["-fopenmp"], verbose=False)
        except Exception as exc:  # no compiler, no headers: the torch path runs instead
            _ext_error = f"{type(exc).__name__}: {str(exc)[-300:]}"
            log.warning("CPU paged decode kernel unavailable (%s); using gather + matmul attention", _ext_error)
        return _ext


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] weight as panel_linear reads it: [ceil(N / 16), K, 16], each panel the weights of
    16 outputs (the last one zero-padded), one contiguous run."""
    n, k = weight.shape
    panels = -(-n // 16)
    padded = F.pad(weight, (0, 0, 0, panels * 16 - n))
    return padded.view(panels, 16, k).transpose(1, 2).contiguous()


# Up to this many rows (a decode step's batch), float32 linears run on weight panels
# (panel_linear above): there the weights' memory traffic dominates. More rows (prefill) run on
# oneDNN, which is faster once the multiply dominates.
PANEL_ROWS_MAX = 64


class PackedLinear(Linear):
    """oneDNN linear over a weight reordered once into its blocked layout; in float32 with the
    compiled kernels, also the weight in panels for steps of a few rows. The plain weight is not
    kept: each form holds what its path reads."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor, ext=None):
        super().__init__(weight, bias)
        self.weight = None
        self.packed = packed
        self.ext = ext if weight.dtype == torch.float32 else None
        self.panels = pack_panels(weight) if self.ext is not None else None
        self._bias = bias.contiguous() if bias is not None else _NONE

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            return self(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if self.panels is not None and x.shape[0] <= PANEL_ROWS_MAX and x.dtype == torch.float32 and x.stride(1) == 1:
            out = torch.empty((x.shape[0], self.out_features), dtype=x.dtype)
            self.ext.panel_linear(out, x, self.panels, self._bias)
            return out
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class UpcastLinear(Linear):
    """bfloat16 model on a CPU without native bf16: the GEMM runs in float32 on the bf16 weight's
    exact float32 copy (same values), the result is rounded back to bfloat16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, inner: Linear):
        super().__init__(weight, bias)
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.float()).to(x.dtype)


class CpuKernels(TorchKernels):
    name = "cpu"

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__(device, dtype)
        self.onednn = torch.backends.mkldnn.is_available()
        self.bf16_native = native_bf16()
        self.ext = paged_decode_extension()
        self.panel_linears = self.ext is not None and {"avx2", "fma"} <= _cpu_flags()   # the kernel's build
        self.gather = BlockGather(device)

    def describe(self) -> str:
        lin = "oneDNN prepacked" if self.onednn else "torch"
        if self.onednn and self.panel_linears and self.dtype == torch.float32:
            lin += f" (up to {PANEL_ROWS_MAX} rows: weight panels)"
        if self.dtype == torch.bfloat16 and not self.bf16_native:
            lin += " (float32 GEMM on bf16 weights: this CPU has no native bf16)"
        att = "C++ paged kernel" if self.ext is not None else f"gather into reused buffers + matmul ({_ext_error})"
        return f"cpu kernels ({self.dtype}): linears {lin}; decode attention {att}; prefill 4-D SDPA"

    # ---- linears ------------------------------------------------------------------------------
    def _packed(self, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
        if not self.onednn:
            return Linear(weight, bias)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, 32)
            linear = PackedLinear(weight, bias, packed, self.ext if self.panel_linears else None)
            for rows in (3, PANEL_ROWS_MAX + 1):   # both paths: panels (a few rows) and oneDNN
                x = torch.randn(rows, weight.shape[1], dtype=weight.dtype)
                if not torch.allclose(linear(x).float(), F.linear(x, weight, bias).float(), rtol=2e-2, atol=2e-2):
                    raise RuntimeError(f"the prepared linear disagrees with F.linear at {rows} rows")
            return linear
        except Exception as exc:  # e.g. bf16 on a CPU oneDNN cannot run it on
            log.info("oneDNN prepacked linear unavailable for %s %s: %s", tuple(weight.shape), weight.dtype, exc)
            return Linear(weight, bias)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
        if weight.dtype == torch.bfloat16 and not self.bf16_native:
            inner = self._packed(weight.float(), None if bias is None else bias.float())
            return UpcastLinear(weight, bias, inner)
        return self._packed(weight, bias)

    # ---- the layer body -----------------------------------------------------------------------
    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """In place on x (a view into the QKV output): no concatenated copy of x."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        c, s = cos[..., :half], sin[..., :half]
        r1 = x1 * c - x2 * s
        x2.mul_(c).addcmul_(x1, s)
        x1.copy_(r1)
        return x

    def _fused(self, *tensors: torch.Tensor) -> bool:
        """Whether the compiled kernels take these: float32 or bfloat16 rows, unit last stride."""
        return self.ext is not None and all(
            t.dtype in (torch.float32, torch.bfloat16) and t.dim() == 2 and t.stride(-1) == 1 for t in tensors)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not self._fused(x) or weight.shape != x.shape[-1:]:
            return super().rms_norm(x, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.ext.rms_norm(out, x, _NONE, weight, eps)
        return out

    def add_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """One pass: residual += x (in place: the model drops the old residual), then its norm."""
        if not self._fused(x, residual) or residual.dtype != x.dtype or weight.shape != x.shape[-1:]:
            return super().add_rms_norm(x, residual, weight, eps)
        out = torch.empty(x.shape, dtype=x.dtype)
        self.ext.rms_norm(out, x, residual, weight, eps)
        return out, residual

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        half = gate_up.shape[-1] // 2
        if self._fused(gate_up):
            out = torch.empty((gate_up.shape[0], half), dtype=gate_up.dtype)
            self.ext.silu_and_mul(out, gate_up)
            return out
        gate = gate_up[..., :half]
        return F.silu(gate, inplace=True).mul_(gate_up[..., half:])

    def store_kv(self, kv_cache: torch.Tensor, layer: int, k: torch.Tensor, v: torch.Tensor, meta) -> None:
        if (self.ext is not None and k.dtype == kv_cache.dtype and k.dtype in (torch.float32, torch.bfloat16)
                and k.stride(-1) == 1 and k.stride(-2) == k.shape[-1] and v.stride(-1) == 1
                and v.stride(-2) == v.shape[-1]):
            self.ext.store_kv(kv_cache, layer, k, v, meta.slot_blocks, meta.slot_offsets)
            return
        super().store_kv(kv_cache, layer, k, v, meta)

    # ---- attention ----------------------------------------------------------------------------
    def decode_attention(self, q, kv_cache: torch.Tensor, layer: int, meta):
        scale = q.shape[-1] ** -0.5
        if self.ext is not None and q.dtype in (torch.float32, torch.bfloat16) and q.shape[-1] in EXT_HEAD_SIZES:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            self.ext.paged_decode(out, q, kv_cache, layer, meta.block_tables, meta.context_lens, scale)
            return out
        return self._decode_gather_matmul(q, kv_cache, layer, meta, scale)

    def _decode_gather_matmul(self, q, kv_cache, layer: int, meta, scale: float):
        """No compiler: gather into buffers reused across steps, then grouped matmuls (GQA heads
        of one KV head share its keys) with a masked softmax."""
        keys, values = self.gather(kv_cache, layer, meta.block_tables)     # [S, span, KVH, D]
        seqs, span, kv_heads, dim = keys.shape
        heads = q.shape[1]
        group = heads // kv_heads
        keys = keys.permute(0, 2, 3, 1)                                       # [S, KVH, D, span]
        values = values.transpose(1, 2)                                       # [S, KVH, span, D]
        qg = q.view(seqs, kv_heads, group, dim) * scale
        scores = torch.matmul(qg, keys).float()                               # [S, KVH, G, span]
        pad = torch.arange(span, device=q.device)[None, :] >= meta.context_lens[:, None]
        scores.masked_fill_(pad[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).to(q.dtype)
        return torch.matmul(probs, values).view(seqs, heads, dim)

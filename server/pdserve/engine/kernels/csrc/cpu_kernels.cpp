// The engine's CPU kernels (engine/kernels/cpu.py): paged decode attention, the layer body's
// small ops and float32 weight-panel linears. setup.py compiles this file once per instruction
// set (engine/kernels/variants.py: the -m flags and the module names), the module name coming
// in as TORCH_EXTENSION_NAME; cpu.py imports the variant the CPU's flags allow. The AVX2 paths
// are the vector code; wider sets let the compiler widen the rest.
// Not torch/extension.h: the whole C++ frontend it brings in is most of the compile time.
#include <ATen/core/Tensor.h>
#include <torch/csrc/Exceptions.h>  // torch::wrap_pybind_function; pybind11 with the Tensor caster
#include <ATen/Parallel.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>
#include <algorithm>
#include <atomic>
#include <type_traits>
#include <string>
#include "hot_team.h"

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

// [0, n) over the OpenMP team: one contiguous share per thread, claimed from its front, half of
// what is left at a time (at least `chunk`); a thread whose share is done claims from the
// others' the same way. With at::parallel_for's fixed shares a whole op waits while one thread
// is off its core (the front end, a client, another tenant of the host); here the threads that
// run take its work, and a thread that is never held up still reads its share in a few long runs.
class Shares {
 public:
  Shares(int64_t n, int64_t chunk)
      : n_(n), chunk_(std::max<int64_t>(chunk, 1)),
        threads_(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + chunk_ - 1) / chunk_))),
        cursor_(threads_) {
    for (int64_t t = 0; t < threads_; ++t) cursor_[t].next.store(begin_of(t), std::memory_order_relaxed);
  }
  int64_t threads() const { return threads_; }
  // Thread t's next piece [s, e): its own share's first, then the others'; false when none is left.
  bool claim(int64_t t, int64_t& s, int64_t& e) {
    for (int64_t i = 0; i < threads_; ++i) {
      const int64_t u = (t + i) % threads_, end = begin_of(u + 1);
      std::atomic<int64_t>& next = cursor_[u].next;
      for (int64_t at = next.load(std::memory_order_relaxed); at < end;) {
        const int64_t to = std::min(end, at + std::max(chunk_, (end - at) / 2));
        if (next.compare_exchange_weak(at, to, std::memory_order_relaxed)) {
          s = at;
          e = to;
          return true;
        }
      }
    }
    return false;
  }

 private:
  int64_t begin_of(int64_t t) const { return n_ * t / threads_; }
  struct alignas(64) Cursor { std::atomic<int64_t> next{0}; };
  const int64_t n_, chunk_, threads_;
  std::vector<Cursor> cursor_;
};

// body(claim) runs once per thread (its setup once), taking chunks while claim(s, e) gives one;
// on the hot team during a decode step's forward (hot_team.h), else on OpenMP.
template <typename F>
static void parallel_shares(int64_t n, int64_t chunk, const F& body) {
  Shares shares(n, chunk);
  const auto part = [&](int64_t t) { body([&](int64_t& s, int64_t& e) { return shares.claim(t, s, e); }); };
  hot_team::Team& team = hot_team::Team::get();
  if (team.hot_here()) {
    team.run(shares.threads(), part);
    return;
  }
  at::parallel_for(0, shares.threads(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) part(t);
  });
}

// at::parallel_for's contract (f(begin, end) over [0, rows), at least `grain` rows a task), on the
// hot team during a decode step's forward
template <typename F>
static void parallel_rows(int64_t rows, int64_t grain, const F& f) {
  hot_team::Team& team = hot_team::Team::get();
  if (team.hot_here() && rows > grain) {
    const int64_t n = std::min(team.size(), (rows + grain - 1) / grain);
    team.run(n, [&](int64_t t) { f(rows * t / n, rows * (t + 1) / n); });
    return;
  }
  at::parallel_for(0, rows, grain, f);
}

// the calling thread's decode forward starts (threads > 1) or ends (0)
void set_hot(int64_t threads) { hot_team::Team::get().set_hot(threads); }
bool hot_here() { return hot_team::Team::get().hot_here(); }

// Every build has AVX2 and FMA at least (kernels/variants.py); CPUs without run the torch path.
#if !defined(__AVX2__) || !defined(__FMA__)
#error "pdserve's CPU kernels are built with AVX2 and FMA or wider (kernels/variants.py)"
#endif
#include <immintrin.h>
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

// Vectors as wide as the build allows (16 floats with AVX-512, else 8); bf16 rounds to nearest
// even, as at::BFloat16 (and so torch) does.
// the plain arithmetic of vf, by the intrinsics' prefix
#define PDSERVE_VEC_OPS(P) \
  static inline vf vset1(float x) { return P##_set1_ps(x); } \
  static inline vf vadd(vf a, vf b) { return P##_add_ps(a, b); } \
  static inline vf vsub(vf a, vf b) { return P##_sub_ps(a, b); } \
  static inline vf vmul(vf a, vf b) { return P##_mul_ps(a, b); } \
  static inline vf vmin(vf a, vf b) { return P##_min_ps(a, b); } \
  static inline vf vmax(vf a, vf b) { return P##_max_ps(a, b); } \
  static inline vf vfmadd(vf a, vf b, vf c) { return P##_fmadd_ps(a, b, c); } \
  static inline vf vfnmadd(vf a, vf b, vf c) { return P##_fnmadd_ps(a, b, c); }
#if defined(__AVX512F__)
using vf = __m512;
constexpr int VW = 16;
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vload(const at::BFloat16* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
static inline __m512i bf16_bits(vf v) {   // the rounded bf16 in each lane's high half
  const __m512i u = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  return _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
}
static inline void vstore(at::BFloat16* p, vf v) {
  _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_bits(v), 16)));
}
static inline vf vround_bf16(vf v) { return _mm512_castsi512_ps(_mm512_and_si512(bf16_bits(v), _mm512_set1_epi32(int(0xffff0000u)))); }
PDSERVE_VEC_OPS(_mm512)
// a / b by the reciprocal estimate and one Newton step (about float32's precision; a divide
// instruction is several times slower)
static inline vf vdiv(vf a, vf b) {
  const vf r = _mm512_rcp14_ps(b);
  return _mm512_mul_ps(a, _mm512_mul_ps(r, _mm512_fnmadd_ps(b, r, _mm512_set1_ps(2.f))));
}
static inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }
static inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
// NaN lanes by their bits: -ffast-math lets the compiler drop a float compare's NaN cases
static inline uint32_t vnan_lanes(vf v) {
  return _mm512_cmpgt_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff)),
                                 _mm512_set1_epi32(0x7f800000));
}
static inline uint32_t veq_lanes(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
static inline vf vfloor_round(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vexp2i(vf fx) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(fx), _mm512_set1_epi32(127)), 23));
}
#else
using vf = __m256;
constexpr int VW = 8;
static inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
static inline vf vload(const at::BFloat16* p) { return load8(p); }
static inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
static inline __m256i bf16_bits(vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  return _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
}
static inline void vstore(at::BFloat16* p, vf v) {
  const __m256i h = _mm256_srli_epi32(bf16_bits(v), 16);
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128((__m128i*)p, packed);
}
static inline vf vround_bf16(vf v) { return _mm256_castsi256_ps(_mm256_and_si256(bf16_bits(v), _mm256_set1_epi32(int(0xffff0000u)))); }
PDSERVE_VEC_OPS(_mm256)
static inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline float vsum(vf v) { return hsum8(v); }
static inline float vhmax(vf v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
static inline uint32_t vnan_lanes(vf v) {
  return _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(
      _mm256_and_si256(_mm256_castps_si256(v), _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000))));
}
static inline uint32_t veq_lanes(vf a, vf b) { return _mm256_movemask_ps(_mm256_cmp_ps(a, b, _CMP_EQ_OQ)); }
static inline vf vfloor_round(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vexp2i(vf fx) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23));
}
#endif
// the value a float rounds to in T
static inline vf vround(vf v, const float*) { return v; }
static inline vf vround(vf v, const at::BFloat16*) { return vround_bf16(v); }
static inline float round_to(float x, const float*) { return x; }
static inline float round_to(float x, const at::BFloat16*) { return to_float(at::BFloat16(x)); }
// exp for x <= 0 (scores minus their maximum): Cephes' expf polynomial, about 1 ulp
static inline vf vexp(vf x) {
  x = vmax(x, vset1(-87.0f));
  const vf fx = vfloor_round(vmul(x, vset1(1.44269504088896341f)));
  vf r = vfnmadd(fx, vset1(0.693359375f), x);
  r = vfnmadd(fx, vset1(-2.12194440e-4f), r);
  vf y = vset1(1.9875691500e-4f);
  y = vfmadd(y, r, vset1(1.3981999507e-3f));
  y = vfmadd(y, r, vset1(8.3334519073e-3f));
  y = vfmadd(y, r, vset1(4.1665795894e-2f));
  y = vfmadd(y, r, vset1(1.6666665459e-1f));
  y = vfmadd(y, r, vset1(5.0000001201e-1f));
  y = vfmadd(y, vmul(r, r), vadd(r, vset1(1.0f)));
  return vmul(y, vexp2i(fx));
}

// x / (1 + e^-x), the exponent's argument capped where e^x would overflow
static inline vf vsilu(vf x) {
  return vdiv(x, vadd(vset1(1.f), vexp(vmin(vsub(vset1(0.f), x), vset1(88.f)))));
}

// One decode-attention call: the pool seen through its strides, the queries, and the work
// split (one task per sequence, or per sequence and KV head when there are too few sequences to
// keep every thread busy).
template <typename T>
struct DecodeShape {
  int64_t B, H, BS, KVH, G, s_block, s_kv, s_tok, s_head, tab_stride, qs_b, qs_h, splits, per;
  const T* base;
  const int64_t* tab;
  const int64_t* len;
  const T* qp;
  T* op;
  DecodeShape(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t layer, const at::Tensor& tables,
              const at::Tensor& lens)
      : B(q.size(0)), H(q.size(1)), BS(kv.size(3)), KVH(kv.size(4)), G(H / KVH), s_block(kv.stride(0)),
        s_kv(kv.stride(2)), s_tok(kv.stride(3)), s_head(kv.stride(4)), tab_stride(tables.stride(0)),
        qs_b(q.stride(0)), qs_h(q.stride(1)), splits(B >= 2 * at::get_num_threads() ? 1 : KVH), per(KVH / splits),
        base(kv.data_ptr<T>() + layer * kv.stride(1)), tab(tables.data_ptr<int64_t>()), len(lens.data_ptr<int64_t>()),
        qp(q.data_ptr<T>()), op(out.data_ptr<T>()) {}
};

// out[b, h, :] = softmax(q[b, h] . K[b]^T * scale) V[b], K and V read in place from the pool
// [num_blocks, layers, 2, block_size, kv_heads, dim] through block_tables[b] for context_lens[b] tokens,
// in one pass over the context (online softmax, block by block): each block's keys and values
// (adjacent in the pool) are read together, and the next block is prefetched.
// One task is one sequence and a range of its KV heads (all of them when there are enough
// sequences to keep every thread busy): the keys of one token for those heads are one
// contiguous row, read once; the query heads of a GQA group share each key and value load.
template <typename T, int D>
static void decode_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t layer,
                          const at::Tensor& tables, const at::Tensor& lens, float scale) {
  const DecodeShape<T> dv(out, q, kv, layer, tables, lens);
  parallel_shares(dv.B * dv.splits, 1, [&](const auto& claim) {
    const int64_t nh = dv.per * dv.G;
    std::vector<float> qf(nh * D), acc(nh * D), sc(nh * dv.BS), mx(nh), sum(nh);
    for (int64_t begin, end; claim(begin, end);)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dv.splits, g0 = (task % dv.splits) * dv.per, n = dv.len[b];
      for (int64_t h = 0; h < nh; ++h) {
        for (int d = 0; d < D; ++d) qf[h * D + d] = to_float(dv.qp[b * dv.qs_b + (g0 * dv.G + h) * dv.qs_h + d]) * scale;
        mx[h] = -INFINITY;
        sum[h] = 0.f;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t0 = 0; t0 < n; t0 += dv.BS) {
        const T* kb = dv.base + dv.tab[b * dv.tab_stride + t0 / dv.BS] * dv.s_block + g0 * dv.s_head;
        const T* vb = kb + dv.s_kv;
        const int64_t m = std::min(dv.BS, n - t0);
        // the next block's rows are fetched a row per token, spread over this block's work
        const T* nb = t0 + dv.BS < n ? dv.base + dv.tab[b * dv.tab_stride + t0 / dv.BS + 1] * dv.s_block + g0 * dv.s_head : nullptr;
        for (int64_t j = 0; j < m; ++j) {
          if (nb) prefetch_row(nb + j * dv.s_tok, dv.per * dv.s_head);
          for (int64_t g = 0; g < dv.per; ++g) {
            const T* kp = kb + j * dv.s_tok + g * dv.s_head;
            vf k[D / VW];
            for (int c = 0; c < D / VW; ++c) k[c] = vload(kp + VW * c);
            for (int64_t i = 0; i < dv.G; ++i) {
              const float* qh = &qf[(g * dv.G + i) * D];
              vf a = vmul(vload(qh), k[0]);
              for (int c = 1; c < D / VW; ++c) a = vfmadd(vload(qh + VW * c), k[c], a);
              sc[(g * dv.G + i) * dv.BS + j] = vsum(a);
            }
          }
        }
        for (int64_t h = 0; h < nh; ++h) {
          float* s = &sc[h * dv.BS];
          float bm = mx[h];
          for (int64_t j = 0; j < m; ++j) bm = std::max(bm, s[j]);
          if (bm > mx[h]) {
            const float corr = std::exp(mx[h] - bm);   // 0 for the first block
            sum[h] *= corr;
            const vf vc = vset1(corr);
            float* ah = &acc[h * D];
            for (int c = 0; c < D / VW; ++c) vstore(ah + VW * c, vmul(vc, vload(ah + VW * c)));
            mx[h] = bm;
          }
          int64_t j = 0;
          vf vs = vset1(0.f);
          const vf vm = vset1(bm);
          for (; j + VW <= m; j += VW) {
            const vf e = vexp(vsub(vload(s + j), vm));
            vstore(s + j, e);
            vs = vadd(vs, e);
          }
          float total = vsum(vs);
          for (; j < m; ++j) { s[j] = std::exp(s[j] - bm); total += s[j]; }
          sum[h] += total;
        }
        if (nb)
          for (int64_t j = 0; j < m; ++j) prefetch_row(nb + dv.s_kv + j * dv.s_tok, dv.per * dv.s_head);
        // a head's accumulator stays in registers over the block's keys (the value rows, read
        // once per head of the group, are in L1 after the first)
        for (int64_t g = 0; g < dv.per; ++g)
          for (int64_t i = 0; i < dv.G; ++i) {
            const float* s = &sc[(g * dv.G + i) * dv.BS];
            float* ah = &acc[(g * dv.G + i) * D];
            vf o[D / VW];
            for (int c = 0; c < D / VW; ++c) o[c] = vload(ah + VW * c);
            for (int64_t j = 0; j < m; ++j) {
              const T* vp = vb + j * dv.s_tok + g * dv.s_head;
              const vf p = vset1(s[j]);
              for (int c = 0; c < D / VW; ++c) o[c] = vfmadd(p, vload(vp + VW * c), o[c]);
            }
            for (int c = 0; c < D / VW; ++c) vstore(ah + VW * c, o[c]);
          }
      }
      for (int64_t h = 0; h < nh; ++h) {
        const float inv = 1.f / sum[h];
        for (int d = 0; d < D; ++d) from_float(acc[h * D + d] * inv, &dv.op[(b * dv.H + g0 * dv.G + h) * D + d]);
      }
    }
  });
}

#if defined(__AVX512F__)
// r[i] = row i of a 16x16 matrix of dwords -> half a transpose (two unpack rounds, no cross-lane
// shuffles): r[4i + c], in 128-bit lane L, holds rows 4i .. 4i + 3 of column 4L + c.
static inline void half_transpose16(__m512i* r) {
  __m512i t[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
}

// r[i] = row i of a 16x16 matrix of dwords -> r[i] = column i: the half transpose, then the
// 128-bit lanes gathered (each c reads and writes only r[c], r[4 + c], r[8 + c], r[12 + c])
static inline void transpose16x16(__m512i* r) {
  half_transpose16(r);
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xdd);
    const __m512i w0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x88), w1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(v0, w0, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(v0, w0, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(v1, w1, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, w1, 0xdd);
  }
}
#endif

#if defined(__AVX512BF16__)
// bf16 KV with avx512_bf16: both products as bf16 dot products (vdpbf16ps: 32 bf16 products a
// step, float32 sums), 16 keys at a time. QK^T: a tile's 16 key rows half transposed (unpacks
// within 128-bit lanes only: the cross-lane shuffles of a full transpose cost more than the
// products), each head's scores in four accumulators summed across lanes at the end. PV: the
// tile's value rows interleaved by key pairs (unpack, no transpose) against each head's
// probabilities rounded to bf16, as torch's bf16 attention rounds them before its PV product.
// The accumulators hold the dims in the unpack's lane order, put back in order at the end.
// Both products run on blocks of heads and tiles whose chains are independent, each load
// shared across the block.
static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// One chunk of a head's scores sh[0, cn) through the softmax, online across chunks: the
// probabilities exp(s - max) go to ph[0, span) in bf16 (zeros past cn) and into sum. Returns the
// factor the head's earlier sum (done here) and accumulators (the caller's) are scaled by: below
// 1 where this chunk raised the maximum, 0 on the first chunk, else 1.
static inline float chunk_softmax(const float* sh, int64_t cn, int64_t span, float& mx, float& sum, uint16_t* ph) {
  const int64_t full = cn / 16 * 16;
  const __mmask16 tail = (__mmask16)((1u << (cn - full)) - 1);
  __m512 vm = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < full; j += 16) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sh + j));
  if (tail) vm = _mm512_mask_max_ps(vm, tail, vm, _mm512_maskz_loadu_ps(tail, sh + full));
  const float bm = std::max(mx, _mm512_reduce_max_ps(vm));
  float corr = 1.f;
  if (bm > mx) {
    corr = std::exp(mx - bm);
    sum *= corr;
    mx = bm;
  }
  const __m512 vb = _mm512_set1_ps(bm);
  __m512 vs = _mm512_setzero_ps();
  for (int64_t j = 0; j < span; j += 16) {
    const __mmask16 mk = j < full ? (__mmask16)0xffff : j == full ? tail : (__mmask16)0;
    const __m512 e = _mm512_maskz_mov_ps(mk, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, sh + j), vb)));
    vs = _mm512_add_ps(vs, e);
    _mm256_storeu_si256((__m256i*)(ph + j), (__m256i)_mm512_cvtneps_pbh(e));
  }
  sum += _mm512_reduce_add_ps(vs);
  return corr;
}

// The keys of a 16-key tile after half_transpose16 of each 32-dim chunk c: vector 4i + cc of chunk
// c holds, in 128-bit lane L, dim pair 16c + 4L + cc of keys 4i .. 4i + 3. Against queries laid out
// to match (qA[h][c][cc]: lane L holds the head's pair 16c + 4L + cc, four times), accumulator i
// sums, in lane (L, e), key 4i + e's products over the pairs of lane L; the four lanes' sums of the
// four accumulators are one cross-lane reduction away from the tile's 16 scores in key order.

// lane 4i + e = the sum over 128-bit lanes of a[i]'s element e
static inline __m512 lane_sums4(const __m512* a) {
  const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(a[0], a[1], 0x44), _mm512_shuffle_f32x4(a[0], a[1], 0xee));
  const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(a[2], a[3], 0x44), _mm512_shuffle_f32x4(a[2], a[3], 0xee));
  return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
}

// Scores of KB consecutive tiles (kA: each tile's C x 16 half-transposed vectors) for HB heads
// (qA as above, per head C x 4 vectors): sc[h][16 kb + lane] = scale * q . key.
template <int C, int HB, int KB>
static inline void dp_scores(const uint32_t* kA, const uint32_t* qA, float* sc, int64_t ldsc, float scale) {
  __m512 a[KB][HB][4];
  for (int k = 0; k < KB; ++k)
    for (int h = 0; h < HB; ++h)
      for (int i = 0; i < 4; ++i) a[k][h][i] = _mm512_setzero_ps();
  for (int c = 0; c < C; ++c)
    for (int cc = 0; cc < 4; ++cc) {
      __m512bh kv[KB][4];
      for (int k = 0; k < KB; ++k)
        for (int i = 0; i < 4; ++i) kv[k][i] = as_bh(_mm512_loadu_si512(kA + ((k * C + c) * 16 + 4 * i + cc) * 16));
      for (int h = 0; h < HB; ++h) {
        const __m512bh w = as_bh(_mm512_loadu_si512(qA + ((h * C + c) * 4 + cc) * 16));
        for (int k = 0; k < KB; ++k)
          for (int i = 0; i < 4; ++i) a[k][h][i] = _mm512_dpbf16_ps(a[k][h][i], kv[k][i], w);
      }
    }
  const __m512 s = _mm512_set1_ps(scale);
  for (int k = 0; k < KB; ++k)
    for (int h = 0; h < HB; ++h) _mm512_storeu_ps(sc + h * ldsc + 16 * k, _mm512_mul_ps(lane_sums4(a[k][h]), s));
}

// acc[h][16 (x0 + x) + lane] += P V over a chunk's `pairs` key pairs for HB heads and XB groups
// of 16 accumulator lanes: vc[pair][x][16] the values interleaved by key pairs, pb[h][key] the
// heads' probabilities in bf16 (a dword: one key pair's). Each value load is shared by the heads.
template <int X, int HB, int XB>
static inline void dp_values(const uint32_t* vc, int64_t pairs, int x0, const uint16_t* pb, int64_t ldp, float* acc,
                             int64_t lda) {
  __m512 a[HB][XB];
  for (int h = 0; h < HB; ++h)
    for (int x = 0; x < XB; ++x) a[h][x] = _mm512_loadu_ps(acc + h * lda + 16 * (x0 + x));
  for (int64_t t = 0; t < pairs; ++t) {
    __m512bh v[XB];
    for (int x = 0; x < XB; ++x) v[x] = as_bh(_mm512_loadu_si512(vc + (t * X + x0 + x) * 16));
    for (int h = 0; h < HB; ++h) {
      uint32_t w2;
      std::memcpy(&w2, pb + h * ldp + 2 * t, 4);
      const __m512bh w = as_bh(_mm512_set1_epi32((int)w2));
      for (int x = 0; x < XB; ++x) a[h][x] = _mm512_dpbf16_ps(a[h][x], v[x], w);
    }
  }
  for (int h = 0; h < HB; ++h)
    for (int x = 0; x < XB; ++x) _mm512_storeu_ps(acc + h * lda + 16 * (x0 + x), a[h][x]);
}

// The heads of a group in blocks of up to 4 (HB, a template argument: the chains live in registers).
template <typename F>
static inline void head_blocks(int64_t G, const F& body) {
  int64_t h0 = 0;
  for (; h0 + 4 <= G; h0 += 4) body(h0, std::integral_constant<int, 4>());
  switch (G - h0) {
    case 3: body(h0, std::integral_constant<int, 3>()); break;
    case 2: body(h0, std::integral_constant<int, 2>()); break;
    case 1: body(h0, std::integral_constant<int, 1>()); break;
    default: break;
  }
}

template <int D>
static void decode_kernel_dpbf16(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t layer,
                                 const at::Tensor& tables, const at::Tensor& lens, float scale) {
  static_assert(D % 32 == 0, "rows are whole 32-dim chunks");
  using T = at::BFloat16;
  // dim pairs (one dword each); 32-dim chunks (one zmm); 16-lane accumulator groups; groups per PV pass
  constexpr int P = D / 2, C = D / 32, X = 2 * C, XB = X % 4 == 0 ? 4 : 2;
  const DecodeShape<T> dv(out, q, kv, layer, tables, lens);
  // The context in chunks of whole blocks, about 256 keys: a chunk's keys are half transposed and
  // its values interleaved for all the task's KV heads as the pool is read (16 rows at a time,
  // prefetched a tile ahead); the scores, one softmax pass (a max and a rescale per head per
  // chunk) and the PV product run from those copies in L2.
  const int64_t CH = std::max<int64_t>(256 / dv.BS, 1) * dv.BS, CHP = (CH + 16 + 15) / 16 * 16;
  parallel_shares(dv.B * dv.splits, 1, [&](const auto& claim) {
    const int64_t nh = dv.per * dv.G;
    std::vector<uint32_t> qA(nh * C * 4 * 16), kA(dv.per * CHP * P), vc(dv.per * (CHP / 2) * X * 16);
    std::vector<float> acc(nh * D), mx(nh), sum(nh), sc(nh * CHP);
    std::vector<uint16_t> pb(nh * CHP);
    for (int64_t begin, end; claim(begin, end);)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dv.splits, g0 = (task % dv.splits) * dv.per, n = dv.len[b];
      for (int64_t h = 0; h < nh; ++h) {   // qA[h][c][cc], lane (L, e): the head's dim pair 16c + 4L + cc
        const uint32_t* qh = reinterpret_cast<const uint32_t*>(dv.qp + b * dv.qs_b + (g0 * dv.G + h) * dv.qs_h);
        for (int c = 0; c < C; ++c)
          for (int cc = 0; cc < 4; ++cc)
            for (int l = 0; l < 16; ++l) qA[((h * C + c) * 4 + cc) * 16 + l] = qh[16 * c + 4 * (l / 4) + cc];
      }
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      // the rows of these heads' keys (part 0) or values (1) of tokens [t0, t0 + m), m <= 16, into
      // at: a tile may span blocks (blocks of 8)
      auto tile_rows = [&](int64_t t0, int64_t m, int64_t part, const T** at) {
        int64_t bi = t0 / dv.BS, off = t0 % dv.BS;
        for (int64_t j = 0; j < m; off = 0) {   // one run of rows per block
          const T* blk = dv.base + dv.tab[b * dv.tab_stride + bi++] * dv.s_block + part * dv.s_kv + g0 * dv.s_head;
          const int64_t run = std::min(m - j, dv.BS - off);
          for (int64_t r = 0; r < run; ++r) at[j + r] = blk + (off + r) * dv.s_tok;
          j += run;
        }
      };
      const T* rows[16];
      auto prefetch_rows = [&](int64_t t0, int64_t t1, int64_t part) {   // keys or values of tokens [t0, t1)
        const T* ahead[16];
        t1 = std::min(t1, n);
        if (t0 >= t1) return;
        tile_rows(t0, t1 - t0, part, ahead);
        for (int64_t j = 0; j < t1 - t0; ++j) prefetch_row(ahead[j], dv.per * dv.s_head);
      };
      for (int64_t c0 = 0; c0 < n; c0 += CH) {
        const int64_t cn = std::min(CH, n - c0), tiles = (cn + 15) / 16, pairs = (cn + 1) / 2;
        // keys: kA[g][tile][c][16], each tile half transposed; the next tile prefetched, after the
        // last one this chunk's first values
        for (int64_t k0 = c0; k0 < c0 + cn; k0 += 16) {
          const int64_t mt = std::min<int64_t>(16, c0 + cn - k0);
          tile_rows(k0, mt, 0, rows);
          if (k0 + 16 < c0 + cn) prefetch_rows(k0 + 16, std::min(k0 + 32, c0 + cn), 0);
          else prefetch_rows(c0, c0 + 16, 1);
          for (int64_t g = 0; g < dv.per; ++g) {
            uint32_t* kg = &kA[(g * CHP + k0 - c0) * P];
            for (int c = 0; c < C; ++c) {
              __m512i r[16];
              for (int j = 0; j < 16; ++j)
                r[j] = j < mt ? _mm512_loadu_si512(rows[j] + g * dv.s_head + 32 * c) : _mm512_setzero_si512();
              half_transpose16(r);
              for (int i = 0; i < 16; ++i) _mm512_storeu_si512(kg + (16 * c + i) * 16, r[i]);
            }
          }
        }
        // scores: sc[h][key - c0], scaled
        for (int64_t g = 0; g < dv.per; ++g)
          head_blocks(dv.G, [&](int64_t h0, auto hb) {
            constexpr int HB = decltype(hb)::value;
            const int64_t h = g * dv.G + h0;
            constexpr int KB = HB <= 2 ? 2 : 1;   // tiles at a time: 16 to 24 accumulators
            int64_t t = 0;
            for (; t + KB <= tiles; t += KB)
              dp_scores<C, HB, KB>(&kA[(g * CHP + 16 * t) * P], &qA[h * C * 64], &sc[h * CHP + 16 * t], CHP, scale);
            for (; t < tiles; ++t)
              dp_scores<C, HB, 1>(&kA[(g * CHP + 16 * t) * P], &qA[h * C * 64], &sc[h * CHP + 16 * t], CHP, scale);
          });
        // softmax over the chunk, online across chunks; probabilities in bf16, zero past the chunk
        for (int64_t h = 0; h < nh; ++h) {
          const float corr = chunk_softmax(&sc[h * CHP], cn, cn / 16 * 16 + 16, mx[h], sum[h], &pb[h * CHP]);
          if (corr != 1.f) {
            float* ah = &acc[h * D];
            for (int d = 0; d < D; d += 16) _mm512_storeu_ps(ah + d, _mm512_mul_ps(_mm512_set1_ps(corr), _mm512_loadu_ps(ah + d)));
          }
        }
        // values: vc[g][pair][x], rows 2t and 2t + 1 interleaved (zeros past the context); the next
        // tile prefetched, after the last one the next chunk's first keys
        for (int64_t k0 = c0; k0 < c0 + cn; k0 += 16) {
          const int64_t mt = std::min<int64_t>(16, c0 + cn - k0);
          tile_rows(k0, mt, 1, rows);
          if (k0 + 16 < c0 + cn) prefetch_rows(k0 + 16, std::min(k0 + 32, c0 + cn), 1);
          else prefetch_rows(c0 + cn, c0 + cn + 16, 0);
          for (int64_t g = 0; g < dv.per; ++g) {
            uint32_t* vg = &vc[(g * (CHP / 2) + (k0 - c0) / 2) * X * 16];
            for (int64_t t = 0; t < (mt + 1) / 2; ++t)
              for (int c = 0; c < C; ++c) {
                const __m512i lo = _mm512_loadu_si512(rows[2 * t] + g * dv.s_head + 32 * c);
                const __m512i hi = 2 * t + 1 < mt ? _mm512_loadu_si512(rows[2 * t + 1] + g * dv.s_head + 32 * c) : _mm512_setzero_si512();
                _mm512_storeu_si512(vg + (t * X + 2 * c) * 16, _mm512_unpacklo_epi16(lo, hi));
                _mm512_storeu_si512(vg + (t * X + 2 * c + 1) * 16, _mm512_unpackhi_epi16(lo, hi));
              }
          }
        }
        // acc[h] += P V
        for (int64_t g = 0; g < dv.per; ++g)
          head_blocks(dv.G, [&](int64_t h0, auto hb) {
            constexpr int HB = decltype(hb)::value;
            const int64_t h = g * dv.G + h0;
            for (int x0 = 0; x0 < X; x0 += XB)
              dp_values<X, HB, XB>(&vc[g * (CHP / 2) * X * 16], pairs, x0, &pb[h * CHP], CHP, &acc[h * D], D);
          });
      }
      for (int64_t h = 0; h < nh; ++h) {   // accumulator lane k of chunk c's lo / hi: dim 32c + 8(k/4) + k%4 (+4)
        const float inv = 1.f / sum[h];
        const float* ah = &acc[h * D];
        T* oh = dv.op + (b * dv.H + g0 * dv.G + h) * D;
        for (int c = 0; c < C; ++c)
          for (int k = 0; k < 16; ++k) {
            const int d = 32 * c + 8 * (k / 4) + k % 4;
            from_float(ah[32 * c + k] * inv, &oh[d]);
            from_float(ah[32 * c + 16 + k] * inv, &oh[d + 4]);
          }
      }
    }
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// bf16 KV with AMX: both products as tile multiplies (tdpbf16ps: 16 x 16 x 32 products a step).
// QK^T as K times Q^T: the A tile is 16 key rows of one KV head read straight from the pool (a
// strided tile load, no transpose), the B tile the group's queries in pairs of dims (packed
// once per sequence), so a tile's result is scores[key][head], read back per head. PV: the A
// tile is the chunk's probabilities, [head][32 keys] in bf16 (rounded as torch's bf16 attention
// rounds them), the B tiles the value rows interleaved by key pairs, as the avx512_bf16 kernel
// builds them; the accumulator tiles (16 heads x 16 dims each, dims in the unpack's lane order)
// stay in memory across chunks, where the online softmax rescales them. Linux hands out the
// tile registers on request (arch_prctl), once per process.
#include <sys/syscall.h>
#include <unistd.h>

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
  TileConfig() {
    for (int t = 0; t < 8; ++t) { colsb[t] = 64; rows[t] = 16; }   // every tile 16 rows of 64 bytes
  }
};

static bool amx_permitted() {
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return ok;
}

// The most query heads per KV head at which the AMX decode kernel prefetches a block's values
// with its keys (measured at 2 and 7 heads: bench/RESULTS.md).
constexpr int64_t kPrefetchValuesMaxGroup = 4;

template <int D>
static void decode_kernel_amx(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t layer,
                              const at::Tensor& tables, const at::Tensor& lens, float scale) {
  static_assert(D % 32 == 0, "rows are whole 32-dim chunks");
  using T = at::BFloat16;
  constexpr int C = D / 32, XT = 2 * C;   // 32-dim chunks; 16-dim accumulator tiles
  const DecodeShape<T> dv(out, q, kv, layer, tables, lens);
  const int64_t CH = std::max<int64_t>(256 / dv.BS, 1) * dv.BS, CHP = (CH + 32 + 31) / 32 * 32;
  const int64_t kstride = dv.s_tok * (int64_t)sizeof(T);
  const bool prefetch_values = dv.G <= kPrefetchValuesMaxGroup;
  parallel_shares(dv.B * dv.splits, 1, [&](const auto& claim) {
    const TileConfig cfg;
    _tile_loadconfig(&cfg);
    const int64_t nh = dv.per * dv.G;
    std::vector<uint32_t> qb(dv.per * C * 256);   // per KV head: C tiles [dim pair][head]
    std::vector<float> acc(dv.per * XT * 256 + 16), mx(nh), sum(nh), sc(nh * CHP);
    std::vector<uint16_t> pb((nh + 16) * CHP);   // 16 rows past the last head: a tile's spare rows
    std::vector<const T*> vrow(CHP);              // the chunk's value rows (these heads), by key
    alignas(64) float st[16][16];
    alignas(64) uint32_t vb[4][16][16];
    for (int64_t begin, end; claim(begin, end);)
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / dv.splits, g0 = (task % dv.splits) * dv.per, n = dv.len[b];
      std::fill(qb.begin(), qb.end(), 0u);   // heads past the group score zeros
      for (int64_t g = 0; g < dv.per; ++g)
        for (int64_t i = 0; i < dv.G; ++i) {
          const uint32_t* qh = reinterpret_cast<const uint32_t*>(dv.qp + b * dv.qs_b + ((g0 + g) * dv.G + i) * dv.qs_h);
          for (int c = 0; c < C; ++c)
            for (int p = 0; p < 16; ++p) qb[((g * C + c) * 16 + p) * 16 + i] = qh[16 * c + p];
        }
      std::fill(mx.begin(), mx.end(), -INFINITY);
      std::fill(sum.begin(), sum.end(), 0.f);
      std::fill(acc.begin(), acc.end(), 0.f);
      auto block = [&](int64_t t0) { return dv.base + dv.tab[b * dv.tab_stride + t0 / dv.BS] * dv.s_block + g0 * dv.s_head; };
      for (int64_t c0 = 0; c0 < n; c0 += CH) {
        const int64_t cn = std::min(CH, n - c0);
        // scores: sc[h][key - c0], scaled
        for (int64_t t0 = c0; t0 < c0 + cn; t0 += dv.BS) {
          const T* blk = block(t0);
          const int64_t m = std::min(dv.BS, n - t0);
          // the value rows' addresses once per key (the PV loop below would otherwise divide
          // by the block size per key and dim chunk), and, where few query heads share a KV
          // head, the rows fetched while the keys multiply: with more, each key's scores take
          // long enough that the burst of prefetches stalls them more than it saves the PV loop
          for (int64_t j = 0; j < m; ++j) {
            vrow[t0 - c0 + j] = blk + dv.s_kv + j * dv.s_tok;
            if (prefetch_values) prefetch_row(vrow[t0 - c0 + j], dv.per * dv.s_head);
          }
          if (t0 + dv.BS < c0 + cn) {
            const T* nb = block(t0 + dv.BS);
            for (int64_t j = 0; j < std::min(dv.BS, n - t0 - dv.BS); ++j) prefetch_row(nb + j * dv.s_tok, dv.per * dv.s_head);
          }
          for (int64_t j0 = 0; j0 < m; j0 += 16) {   // rows past m: the block's own slots, scores unused
            const int mt = (int)std::min<int64_t>(16, m - j0);
            const __mmask16 valid = mt == 16 ? (__mmask16)0xffff : (__mmask16)((1u << mt) - 1);
            for (int64_t g = 0; g < dv.per; ++g) {
              const T* kb = blk + g * dv.s_head + j0 * dv.s_tok;
              _tile_zero(0);
              for (int c = 0; c < C; ++c) {
                _tile_loadd(1, kb + 32 * c, kstride);
                _tile_loadd(2, &qb[(g * C + c) * 256], 64);
                _tile_dpbf16ps(0, 1, 2);
              }
              _tile_stored(0, st, 64);
              const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                      _mm512_set1_epi32(16));
              for (int64_t i = 0; i < dv.G; ++i) {
                const __m512 s = _mm512_i32gather_ps(_mm512_add_epi32(rows, _mm512_set1_epi32((int)i)), &st[0][0], 4);
                _mm512_mask_storeu_ps(&sc[(g * dv.G + i) * CHP + t0 - c0 + j0], valid, _mm512_mul_ps(s, _mm512_set1_ps(scale)));
              }
            }
          }
        }
        // softmax over the chunk, online across chunks; probabilities in bf16, zero past the
        // chunk up to a whole 32-key tile
        for (int64_t h = 0; h < nh; ++h) {
          const float corr = chunk_softmax(&sc[h * CHP], cn, (cn + 31) / 32 * 32, mx[h], sum[h], &pb[h * CHP]);
          if (corr != 1.f) {
            const int64_t g = h / dv.G, i = h % dv.G;
            for (int x = 0; x < XT; ++x) {
              float* row = &acc[((g * XT + x) * 16 + i) * 16];
              _mm512_storeu_ps(row, _mm512_mul_ps(_mm512_set1_ps(corr), _mm512_loadu_ps(row)));
            }
          }
        }
        // values: acc[g] += P V, up to 4 accumulator tiles (two 32-dim chunks) at a time
        for (int64_t g = 0; g < dv.per; ++g)
          for (int c0d = 0; c0d < C; c0d += 2) {
            const int cs = std::min(2, C - c0d), xs = 2 * cs;
            float* ag = &acc[(g * XT + 2 * c0d) * 256];
            if (xs > 0) _tile_loadd(4, ag, 64);
            if (xs > 1) _tile_loadd(5, ag + 256, 64);
            if (xs > 2) _tile_loadd(6, ag + 512, 64);
            if (xs > 3) _tile_loadd(7, ag + 768, 64);
            for (int64_t k0 = 0; k0 < cn; k0 += 32) {
              for (int p = 0; p < 16; ++p) {
                const int64_t ka = k0 + 2 * p, kb2 = ka + 1;   // in the chunk
                const T* ra = ka < cn ? vrow[ka] + g * dv.s_head + 32 * c0d : nullptr;
                const T* rb = kb2 < cn ? vrow[kb2] + g * dv.s_head + 32 * c0d : nullptr;
                for (int c = 0; c < cs; ++c) {
                  const __m512i lo = ra ? _mm512_loadu_si512(ra + 32 * c) : _mm512_setzero_si512();
                  const __m512i hi = rb ? _mm512_loadu_si512(rb + 32 * c) : _mm512_setzero_si512();
                  _mm512_store_si512(vb[2 * c][p], _mm512_unpacklo_epi16(lo, hi));
                  _mm512_store_si512(vb[2 * c + 1][p], _mm512_unpackhi_epi16(lo, hi));
                }
              }
              _tile_loadd(0, &pb[g * dv.G * CHP + k0], CHP * (int64_t)sizeof(uint16_t));
              _tile_loadd(1, vb[0], 64);
              _tile_dpbf16ps(4, 0, 1);
              _tile_loadd(2, vb[1], 64);
              _tile_dpbf16ps(5, 0, 2);
              if (xs > 2) {
                _tile_loadd(1, vb[2], 64);
                _tile_dpbf16ps(6, 0, 1);
                _tile_loadd(2, vb[3], 64);
                _tile_dpbf16ps(7, 0, 2);
              }
            }
            if (xs > 0) _tile_stored(4, ag, 64);
            if (xs > 1) _tile_stored(5, ag + 256, 64);
            if (xs > 2) _tile_stored(6, ag + 512, 64);
            if (xs > 3) _tile_stored(7, ag + 768, 64);
          }
      }
      for (int64_t h = 0; h < nh; ++h) {   // tile 2c / 2c + 1, lane k: dim 32c + 8(k/4) + k%4 (+4)
        const float inv = 1.f / sum[h];
        const int64_t g = h / dv.G, i = h % dv.G;
        T* oh = dv.op + (b * dv.H + g0 * dv.G + h) * D;
        for (int c = 0; c < C; ++c)
          for (int k = 0; k < 16; ++k) {
            const int d = 32 * c + 8 * (k / 4) + k % 4;
            from_float(acc[((g * XT + 2 * c) * 16 + i) * 16 + k] * inv, &oh[d]);
            from_float(acc[((g * XT + 2 * c + 1) * 16 + i) * 16 + k] * inv, &oh[d + 4]);
          }
      }
    }
    _tile_release();
  });
}
#endif
#endif

// The head sizes the bf16 tile kernels are instantiated for (whole 32-dim chunks); any other
// falls through to the next kernel.
#define PDSERVE_BF16_HEAD_SIZES(kernel)                                   \
  switch (q.size(2)) {                                                    \
    case 64: return kernel<64>(out, q, kv, layer, tables, lens, scale);   \
    case 128: return kernel<128>(out, q, kv, layer, tables, lens, scale); \
    case 256: return kernel<256>(out, q, kv, layer, tables, lens, scale); \
    case 32: return kernel<32>(out, q, kv, layer, tables, lens, scale);   \
    case 96: return kernel<96>(out, q, kv, layer, tables, lens, scale);   \
    default: break;                                                       \
  }

template <typename T>
static void dispatch_dim(at::Tensor& out, const at::Tensor& q, const at::Tensor& kv, int64_t layer,
                         const at::Tensor& tables, const at::Tensor& lens, float scale) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  // whole 16-key tiles inside each block, a group's heads in one tile's 16 columns
  if constexpr (std::is_same<T, at::BFloat16>::value) {
    if (kv.size(3) % 16 == 0 && q.size(1) / kv.size(4) <= 16 && amx_permitted()) {
      PDSERVE_BF16_HEAD_SIZES(decode_kernel_amx)
    }
  }
#endif
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<T, at::BFloat16>::value) {
    PDSERVE_BF16_HEAD_SIZES(decode_kernel_dpbf16)
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
// Below this much work (elements) an op runs on the calling thread: waking the OpenMP team (a
// futex wake-up per thread when they sleep, as served with OMP_WAIT_POLICY=PASSIVE) costs more
// than the second core saves. Measured per op at a decode step's sizes (bench/RESULTS.md);
// set_serial_work changes them for such measurements.
enum SmallOp { kRmsNorm, kSiluMul, kRope, kNumSmallOps };
static int64_t serial_work[kNumSmallOps] = {1 << 16, 1 << 15, 1 << 17};
static const char* small_op_names[kNumSmallOps] = {"rms_norm", "silu_and_mul", "rope"};
// rows per task: a thread's share is at least the op's serial work
static inline int64_t row_grain(SmallOp op, int64_t n) {
  return std::max<int64_t>(1, serial_work[op] / std::max<int64_t>(n, 1));
}

int64_t set_serial_work(std::string op, int64_t elements) {
  for (int i = 0; i < kNumSmallOps; ++i)
    if (op == small_op_names[i]) {
      const int64_t old = serial_work[i];
      if (elements >= 0) serial_work[i] = elements;
      return old;
    }
  TORCH_CHECK(false, "set_serial_work: no op ", op);
}

// out = rms_norm(x) * w per row; with `res`, first res = x + res (the residual stream, rounded
// to T like torch's add) and the norm is of that. Float32 math, rounded as kernels/reference.py.
template <typename T>
static void rms_norm_rows(T* out, const T* x, int64_t xs, T* res, int64_t rs, const T* w, int64_t rows, int64_t n,
                          float eps) {
  parallel_rows(rows, row_grain(kRmsNorm, n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * xs;
      const T* src = xr;      // the row normed: x, or the new residual stream
      vf ss = vset1(0.f);
      float tail = 0.f;
      int64_t i = 0;
      if (res) {
        T* rr = res + r * rs;
        for (; i + VW <= n; i += VW) {
          const vf v = vround(vadd(vload(xr + i), vload(rr + i)), rr);
          vstore(rr + i, v);
          ss = vfmadd(v, v, ss);
        }
        for (; i < n; ++i) {
          from_float(to_float(xr[i]) + to_float(rr[i]), &rr[i]);
          tail += to_float(rr[i]) * to_float(rr[i]);
        }
        src = rr;
      } else {
        for (; i + VW <= n; i += VW) { const vf v = vload(xr + i); ss = vfmadd(v, v, ss); }
        for (; i < n; ++i) tail += to_float(xr[i]) * to_float(xr[i]);
      }
      const float inv = 1.f / std::sqrt((vsum(ss) + tail) / (float)n + eps);
      const vf vinv = vset1(inv);
      T* o = out + r * n;
      for (i = 0; i + VW <= n; i += VW)
        vstore(o + i, vmul(vload(w + i), vround(vmul(vload(src + i), vinv), o)));
      for (; i < n; ++i) from_float(to_float(w[i]) * round_to(to_float(src[i]) * inv, o), &o[i]);
    }
  });
}
void rms_norm(at::Tensor out, at::Tensor x, at::Tensor residual, at::Tensor w, double eps) {
  const int64_t n = x.size(-1), rows = x.numel() / n;
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && out.is_contiguous() && w.is_contiguous() && w.numel() == n);
  const bool add = residual.numel() > 0;
  TORCH_CHECK(!add || (residual.dim() == 2 && residual.stride(1) == 1 && residual.size(0) == rows));
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "rms_norm: float32 or bfloat16 only");
  py::gil_scoped_release nogil;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows<float>(out.data_ptr<float>(), x.data_ptr<float>(), x.stride(0),
                         add ? residual.data_ptr<float>() : nullptr, add ? residual.stride(0) : 0,
                         w.data_ptr<float>(), rows, n, (float)eps);
  else if (x.scalar_type() == at::kBFloat16)
    rms_norm_rows<at::BFloat16>(out.data_ptr<at::BFloat16>(), x.data_ptr<at::BFloat16>(), x.stride(0),
                                add ? residual.data_ptr<at::BFloat16>() : nullptr, add ? residual.stride(0) : 0,
                                w.data_ptr<at::BFloat16>(), rows, n, (float)eps);
}

// out[t] = silu(gate[t]) * up[t], gate_up[t] = [gate | up]; silu rounded to T first, as torch does
template <typename T>
static void silu_mul_rows(T* out, const T* gu, int64_t gs, int64_t rows, int64_t n) {
  parallel_rows(rows, row_grain(kSiluMul, n), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* g = gu + r * gs;
      const T* u = g + n;
      T* o = out + r * n;
      int64_t i = 0;
      for (; i + VW <= n; i += VW) {
        const vf x = vload(g + i);
        const vf silu = vround(vsilu(x), o);
        vstore(o + i, vmul(silu, vload(u + i)));
      }
      for (; i < n; ++i) {
        const float x = to_float(g[i]);
        T silu;
        from_float(x / (1.f + std::exp(-x)), &silu);
        from_float(to_float(silu) * to_float(u[i]), &o[i]);
      }
    }
  });
}

void silu_and_mul(at::Tensor out, at::Tensor gate_up) {
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.stride(1) == 1 && out.is_contiguous());
  const int64_t rows = gate_up.size(0), n = gate_up.size(1) / 2;
  TORCH_CHECK(gate_up.scalar_type() == at::kFloat || gate_up.scalar_type() == at::kBFloat16,
              "silu_and_mul: float32 or bfloat16 only");
  py::gil_scoped_release nogil;
  if (gate_up.scalar_type() == at::kFloat)
    silu_mul_rows<float>(out.data_ptr<float>(), gate_up.data_ptr<float>(), gate_up.stride(0), rows, n);
  else if (gate_up.scalar_type() == at::kBFloat16)
    silu_mul_rows<at::BFloat16>(out.data_ptr<at::BFloat16>(), gate_up.data_ptr<at::BFloat16>(),
                                gate_up.stride(0), rows, n);
}

// Rotary embedding in place (rotate-half convention): x [T, heads, D] (a view into the QKV
// output), cos and sin [T, 1, D] in x's dtype. Float32 math, rounded once.
template <typename T>
static void rope_rows(T* x, int64_t xs_t, int64_t xs_h, const T* cos, int64_t cs, const T* sin, int64_t ss,
                      int64_t tokens, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  parallel_rows(tokens, row_grain(kRope, heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * cs;
      const T* s = sin + t * ss;
      for (int64_t h = 0; h < heads; ++h) {
        T* x1 = x + t * xs_t + h * xs_h;
        T* x2 = x1 + half;
        int64_t i = 0;
        for (; i + VW <= half; i += VW) {
          const vf a = vload(x1 + i), b = vload(x2 + i), vc = vload(c + i), vs = vload(s + i);
          vstore(x1 + i, vfnmadd(b, vs, vmul(a, vc)));
          vstore(x2 + i, vfmadd(a, vs, vmul(b, vc)));
        }
        for (; i < half; ++i) {
          const float a = to_float(x1[i]), b = to_float(x2[i]), ci = to_float(c[i]), si = to_float(s[i]);
          from_float(a * ci - b * si, &x1[i]);
          from_float(b * ci + a * si, &x2[i]);
        }
      }
    }
  });
}

void rope(at::Tensor x, at::Tensor cos, at::Tensor sin) {
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0);
  TORCH_CHECK(cos.dim() == 3 && sin.dim() == 3 && cos.stride(2) == 1 && sin.stride(2) == 1 &&
              cos.size(0) == x.size(0) && sin.size(0) == x.size(0) && cos.size(2) == x.size(2) && sin.size(2) == x.size(2));
  TORCH_CHECK(x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type());
  py::gil_scoped_release nogil;
  if (x.scalar_type() == at::kFloat)
    rope_rows<float>(x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(), cos.stride(0),
                     sin.data_ptr<float>(), sin.stride(0), x.size(0), x.size(1), x.size(2));
  else if (x.scalar_type() == at::kBFloat16)
    rope_rows<at::BFloat16>(x.data_ptr<at::BFloat16>(), x.stride(0), x.stride(1), cos.data_ptr<at::BFloat16>(),
                            cos.stride(0), sin.data_ptr<at::BFloat16>(), sin.stride(0), x.size(0), x.size(1), x.size(2));
  else TORCH_CHECK(false, "rope: float32 or bfloat16 only");
}

// Writes each token's K and V rows [KVH * D] into its slot of the pool (one copy per row).
void store_kv(at::Tensor kv, int64_t layer, at::Tensor k, at::Tensor v, at::Tensor blocks,
              at::Tensor offsets) {
  const int64_t T = k.size(0), row = k.size(1) * k.size(2);
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.stride(2) == 1 && k.stride(1) == k.size(2) &&
              v.stride(2) == 1 && v.stride(1) == v.size(2) && kv.stride(5) == 1 && kv.stride(4) == kv.size(5));
  TORCH_CHECK(k.scalar_type() == kv.scalar_type() && v.scalar_type() == kv.scalar_type());
  TORCH_CHECK(blocks.scalar_type() == at::kLong && offsets.scalar_type() == at::kLong &&
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
// multiplied the next one is prefetched. At 32 rows the multiply, not the memory, bounds it: the
// AVX-512 builds take four panels (64 outputs) at a time, so each broadcast of x feeds four
// 16-wide multiply-adds, and walk K in chunks that every row tile multiplies while the chunk is
// in L1 (the partial sums wait in the output between chunks).
#if defined(__AVX512F__)
constexpr int PANEL_GROUP = 4;    // panels a tile multiplies at once
constexpr int PANEL_ROWS = 6;     // rows a tile takes: 6 x 4 accumulators of the 32 registers
constexpr int64_t PANEL_KC = 128; // k per chunk: 4 panels x 128 x 64 bytes, half of L1

// rows R of x times NP panels over k in [k0, k1): R x NP accumulators of 16 outputs in registers,
// started at zero on the first chunk, else from c; the bias added on the last. Every `every` k one
// line of each of the NP streams in pf is prefetched.
template <int NP, int R>
static inline void panel_tile512(const float* a, int64_t lda, const float* b, int64_t K, int64_t k0, int64_t k1,
                                 const float* bias, float* c, int64_t ldc, int cols, const char** pf, int every) {
  __mmask16 mask[NP];
  for (int j = 0; j < NP; ++j) mask[j] = (__mmask16)((1u << std::min(16, cols - 16 * j)) - 1);
  __m512 acc[R][NP];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j)
      acc[r][j] = k0 == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[j], c + r * ldc + 16 * j);
  int count = 0;
  for (int64_t k = k0; k < k1; ++k) {
    __m512 w[NP];
#pragma GCC unroll 4
    for (int j = 0; j < NP; ++j) w[j] = _mm512_loadu_ps(b + j * K * 16 + k * 16);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const __m512 x = _mm512_set1_ps(a[r * lda + k]);
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_fmadd_ps(x, w[j], acc[r][j]);
    }
    if (pf && ++count == every) {
      count = 0;
#pragma GCC unroll 4
      for (int j = 0; j < NP; ++j) { _mm_prefetch(pf[j], _MM_HINT_T0); pf[j] += 64; }
    }
  }
  for (int j = 0; j < NP; ++j) {
    const __m512 bv = bias && k1 == K ? _mm512_maskz_loadu_ps(mask[j], bias + 16 * j) : _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(c + r * ldc + 16 * j, mask[j], _mm512_add_ps(acc[r][j], bv));
  }
}

// all M rows times NP panels (b, the first of them), chunk by chunk of K; each chunk's tiles
// prefetch the next chunk, the last one the panels at `next` (nullptr: nothing after)
template <int NP>
static void panel_group512(const float* a, int64_t lda, int64_t M, const float* b, int64_t K, const float* bias,
                           float* c, int64_t ldc, int cols, const float* next) {
  const int tiles = (int)((M + PANEL_ROWS - 1) / PANEL_ROWS);
  for (int64_t k0 = 0; k0 < K; k0 += PANEL_KC) {
    const int64_t k1 = std::min(K, k0 + PANEL_KC);
    // One tile reads a chunk straight from memory, where the hardware prefetcher keeps up.
    const char* ahead[NP];
    const char** pf = nullptr;
    if (tiles > 1 && (k1 < K || next)) {
      for (int j = 0; j < NP; ++j)
        ahead[j] = reinterpret_cast<const char*>(k1 < K ? b + j * K * 16 + k1 * 16 : next + j * K * 16);
      pf = ahead;
    }
    for (int64_t m = 0, t = 0; t < tiles; ++t) {
      const int rows = (int)((M - m + tiles - t - 1) / (tiles - t));
      const float* at = a + m * lda;
      float* ct = c + m * ldc;
      switch (rows) {
#define PDSERVE_TILE(r) case r: panel_tile512<NP, r>(at, lda, b, K, k0, k1, bias, ct, ldc, cols, pf, tiles); break;
        PDSERVE_TILE(1) PDSERVE_TILE(2) PDSERVE_TILE(3) PDSERVE_TILE(4) PDSERVE_TILE(5) PDSERVE_TILE(6)
#undef PDSERVE_TILE
        default: break;
      }
      m += rows;
    }
  }
}
#endif

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

// out [M, N] = x [M, K] @ W^T + bias, W as pack_panels (Python) laid it out
void panel_linear(at::Tensor out, at::Tensor x, at::Tensor panels, at::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.scalar_type() == at::kFloat && out.is_contiguous());
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1), P = panels.size(0);
  TORCH_CHECK(panels.size(1) == K && panels.size(2) == 16 && P == (N + 15) / 16 && out.size(0) == M);
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == N && bias.is_contiguous() && bias.scalar_type() == at::kFloat));
  const float* a = x.data_ptr<float>();
  const float* b = panels.data_ptr<float>();
  const float* bs = bias.numel() ? bias.data_ptr<float>() : nullptr;
  float* c = out.data_ptr<float>();
  const int64_t lda = x.stride(0);
  py::gil_scoped_release nogil;
#if defined(__AVX512F__)
  constexpr int NP = PANEL_GROUP;
  const int64_t groups = (P + NP - 1) / NP;
  parallel_shares(groups, groups / (16 * at::get_num_threads()), [&](const auto& claim) {
    for (int64_t g0, g1; claim(g0, g1);)
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t p = g * NP;
      if (p + NP <= P) {
        const float* next = g + 1 < g1 && p + 2 * NP <= P ? b + (p + NP) * K * 16 : nullptr;
        panel_group512<NP>(a, lda, M, b + p * K * 16, K, bs ? bs + p * 16 : nullptr, c + p * 16, N,
                           (int)std::min<int64_t>(16 * NP, N - p * 16), next);
      } else {
        for (int64_t q = p; q < P; ++q)   // the last panels, fewer than a group
          panel_group512<1>(a, lda, M, b + q * K * 16, K, bs ? bs + q * 16 : nullptr, c + q * 16, N,
                            (int)std::min<int64_t>(16, N - q * 16), nullptr);
      }
    }
  });
#else
  parallel_shares(P, P / (16 * at::get_num_threads()), [&](const auto& claim) {
    const int every = (int)std::max<int64_t>(1, (M + 5) / 6);   // tiles per panel share its prefetching
    for (int64_t p0, p1; claim(p0, p1);)
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
#endif
}

// ---- bfloat16 linears for a few rows on weight tiles (decode steps) ------------------------------
// The float32 panels' reasoning in bf16: at decode sizes a linear streams its weight from memory
// once, and oneDNN's blocked AMX GEMM reads it well below the memory's speed. Here the weight is
// laid out (pack_tiles in Python) as the B tiles of tdpbf16ps in the order they are multiplied:
// per group of TILE_GROUP panels of 16 outputs, per 32 k, the panels' tiles [16 k pairs][16][2],
// so each thread reads a few long runs (parallel_shares), prefetched ahead of the tile loads. The
// rows (up to 32: two A tiles, loaded through x's stride) multiply every B tile once; each group's four
// accumulator tiles go through a float32 scratch to bf16 with the bias added. An MLP's gate_up
// packed with each group's two panels the gate and the up rows of the same 16 outputs
// (silu_mul) gets SiLU-and-mul in that epilogue, while the next weights stream in: its output
// is the MLP's intermediate row, rounded at each step as the separate ops round it.
constexpr int TILE_GROUP = 2;                  // panels per group: 2 B tiles + 2 A + 4 C of the 8
constexpr int64_t TILE_PREFETCH = 4096;        // bytes ahead of the tile loads
#if defined(__AVX512BF16__)
// One group's float32 sums (st: rows x the group's 32 outputs) to bf16 with the bias added, or,
// with silu_mul, to the group's 16 SiLU-and-mul outputs.
static inline void store_group(float (*st)[32], int64_t rows, at::BFloat16* c, int64_t ldc, int64_t g, int64_t N,
                               const at::BFloat16* bias, bool silu_mul) {
  const int64_t n0 = g * 16 * TILE_GROUP;
  const int cols = (int)std::min<int64_t>(16 * TILE_GROUP, N - n0);
  __mmask16 mask[2];
  __m512 bv[2];
  for (int j = 0; j < 2; ++j) {
    const int cj = std::clamp(cols - 16 * j, 0, 16);
    mask[j] = (__mmask16)((1u << cj) - 1);
    bv[j] = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16(mask[j], bias + n0 + 16 * j)), 16)) : _mm512_setzero_ps();
  }
  if (silu_mul) {   // whole groups: the gate in panel 0, the up rows in panel 1
    for (int64_t r = 0; r < rows; ++r) {
      const vf gate = vround_bf16(_mm512_add_ps(_mm512_load_ps(&st[r][0]), bv[0]));
      const vf up = vround_bf16(_mm512_add_ps(_mm512_load_ps(&st[r][16]), bv[1]));
      const vf silu = vround_bf16(vsilu(gate));
      _mm256_storeu_si256((__m256i*)(c + r * ldc + g * 16), (__m256i)_mm512_cvtneps_pbh(vmul(silu, up)));
    }
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int j = 0; j < 2; ++j)
      if (mask[j])
        _mm256_mask_storeu_epi16(c + r * ldc + n0 + 16 * j, mask[j],
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(_mm512_load_ps(&st[r][16 * j]), bv[j])));
}

// Without AMX (or where Linux refuses the tiles), the same layout by bf16 dot products: each B
// tile row is one vector of 16 outputs x 2 k, so R rows x the group's 2 panels are 2R
// accumulators in registers, each broadcast pair of x feeding two vdpbf16ps. Row tiles after the
// first read the group's tiles from L2.
template <int R>
static inline void dot_rows(float (*st)[32], const uint16_t* a, int64_t lda, const uint16_t* bg, int64_t KB,
                            const char* ahead, const char* end) {
  __m512 acc[R][2];
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t kb = 0; kb < KB; ++kb) {
    const uint16_t* bt = bg + kb * TILE_GROUP * 512;
    if (ahead && ahead + kb * TILE_GROUP * 1024 < end)
      for (int l = 0; l < TILE_GROUP * 16; ++l) _mm_prefetch(ahead + kb * TILE_GROUP * 1024 + 64 * l, _MM_HINT_T0);
    for (int p = 0; p < 16; ++p) {
      const __m512bh w0 = (__m512bh)_mm512_loadu_si512(bt + p * 32);
      const __m512bh w1 = (__m512bh)_mm512_loadu_si512(bt + 512 + p * 32);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r) {
        const __m512bh x = (__m512bh)_mm512_set1_epi32(*reinterpret_cast<const int32_t*>(a + r * lda + kb * 32 + 2 * p));
        acc[r][0] = _mm512_dpbf16_ps(acc[r][0], x, w0);
        acc[r][1] = _mm512_dpbf16_ps(acc[r][1], x, w1);
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) { _mm512_store_ps(&st[r][0], acc[r][0]); _mm512_store_ps(&st[r][16], acc[r][1]); }
}

constexpr int DOT_ROWS = 12;   // 24 accumulators, 2 weights and a broadcast of the 32 registers

static void dot_linear_rows(at::BFloat16* c, int64_t ldc, const uint16_t* a, int64_t lda, int64_t M,
                            const uint16_t* b, int64_t K, const at::BFloat16* bias, int64_t N,
                            int64_t g0, int64_t g1, bool silu_mul) {
  const int64_t KB = K / 32, group_elems = KB * TILE_GROUP * 512;
  alignas(64) float st[DOT_ROWS][32];
  const char* end = reinterpret_cast<const char*>(b + g1 * group_elems);
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* bg = b + g * group_elems;
    for (int64_t m = 0; m < M; m += DOT_ROWS) {
      const int rows = (int)std::min<int64_t>(DOT_ROWS, M - m);
      const char* ahead = m == 0 ? reinterpret_cast<const char*>(bg) + TILE_PREFETCH : nullptr;
      const uint16_t* am = a + m * lda;
      switch (rows) {
#define PDSERVE_DOT(r) case r: dot_rows<r>(st, am, lda, bg, KB, ahead, end); break;
        PDSERVE_DOT(1) PDSERVE_DOT(2) PDSERVE_DOT(3) PDSERVE_DOT(4) PDSERVE_DOT(5) PDSERVE_DOT(6)
        PDSERVE_DOT(7) PDSERVE_DOT(8) PDSERVE_DOT(9) PDSERVE_DOT(10) PDSERVE_DOT(11) PDSERVE_DOT(12)
#undef PDSERVE_DOT
        default: break;
      }
      store_group(st, rows, c + m * ldc, ldc, g, N, bias, silu_mul);
    }
  }
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
static void tile_linear_rows(at::BFloat16* c, int64_t ldc, const uint16_t* a, int64_t lda, int64_t M,
                             const uint16_t* b, int64_t K, const at::BFloat16* bias, int64_t N,
                             int64_t g0, int64_t g1, bool silu_mul) {
  const int64_t KB = K / 32, group_elems = KB * TILE_GROUP * 512;
  const int m0 = (int)std::min<int64_t>(16, M), m1 = (int)(M - m0);
  TileConfig cfg;
  cfg.rows[0] = cfg.rows[4] = cfg.rows[5] = m0;
  cfg.rows[1] = cfg.rows[6] = cfg.rows[7] = std::max(m1, 1);
  _tile_loadconfig(&cfg);
  alignas(64) float st[32][32];
  const char* end = reinterpret_cast<const char*>(b + g1 * group_elems);
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* bg = b + g * group_elems;
    _tile_zero(4); _tile_zero(5); _tile_zero(6); _tile_zero(7);
    for (int64_t kb = 0; kb < KB; ++kb) {
      const uint16_t* bt = bg + kb * TILE_GROUP * 512;
      const char* ahead = reinterpret_cast<const char*>(bt) + TILE_PREFETCH;
      if (ahead < end)
        for (int l = 0; l < TILE_GROUP * 16; ++l) _mm_prefetch(ahead + 64 * l, _MM_HINT_T0);
      _tile_loadd(0, a + kb * 32, lda * 2);
      _tile_loadd(2, bt, 64);
      _tile_loadd(3, bt + 512, 64);
      _tile_dpbf16ps(4, 0, 2);
      _tile_dpbf16ps(5, 0, 3);
      if (m1) {
        _tile_loadd(1, a + 16 * lda + kb * 32, lda * 2);
        _tile_dpbf16ps(6, 1, 2);
        _tile_dpbf16ps(7, 1, 3);
      }
    }
    _tile_stored(4, &st[0][0], 128);
    _tile_stored(5, &st[0][16], 128);
    if (m1) { _tile_stored(6, &st[16][0], 128); _tile_stored(7, &st[16][16], 128); }
    store_group(st, M, c, ldc, g, N, bias, silu_mul);
  }
}
#endif

// out [M, N] = x [M, K] @ W^T + bias in bf16, W as pack_tiles (Python) laid it out, M <= 32;
// with silu_mul, out [M, N / 2] = silu(gate) * up, W and bias packed with gate and up rows
// interleaved by 16. On AMX tiles, else by bf16 dot products. Returns whether it ran: false on
// builds without avx512_bf16 (an empty x asks just that).
bool tile_linear(at::Tensor out, at::Tensor x, at::Tensor tiles, at::Tensor bias, bool silu_mul) {
#if defined(__AVX512BF16__)
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  const bool amx = amx_permitted();
#else
  const bool amx = false;
#endif
  const int64_t M = x.size(0), K = x.size(1), N = out.size(1) * (silu_mul ? 2 : 1), groups = tiles.size(0);
  TORCH_CHECK(!silu_mul || N % (16 * TILE_GROUP) == 0, "tile_linear: silu_mul needs whole groups");
  if (M == 0) return true;
  TORCH_CHECK(M <= 32 && x.stride(1) == 1 && x.scalar_type() == at::kBFloat16 && out.is_contiguous()
              && out.scalar_type() == at::kBFloat16 && out.size(0) == M);
  TORCH_CHECK(K % 32 == 0 && tiles.is_contiguous() && tiles.numel() == groups * TILE_GROUP * 16 * K
              && groups == (N + 16 * TILE_GROUP - 1) / (16 * TILE_GROUP));
  TORCH_CHECK(bias.numel() == 0 || (bias.numel() == N && bias.is_contiguous() && bias.scalar_type() == at::kBFloat16));
  const uint16_t* a = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const uint16_t* b = reinterpret_cast<const uint16_t*>(tiles.data_ptr());
  const at::BFloat16* bs = bias.numel() ? bias.data_ptr<at::BFloat16>() : nullptr;
  at::BFloat16* c = out.data_ptr<at::BFloat16>();
  const int64_t lda = x.stride(0), ldc = out.size(1);
  py::gil_scoped_release nogil;
  parallel_shares(groups, groups / (16 * at::get_num_threads()), [&](const auto& claim) {
    for (int64_t g0, g1; claim(g0, g1);) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
      if (amx) {
        tile_linear_rows(c, ldc, a, lda, M, b, K, bs, N, g0, g1, silu_mul);
        continue;
      }
#endif
      dot_linear_rows(c, ldc, a, lda, M, b, K, bs, N, g0, g1, silu_mul);
    }
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx) _tile_release();
#endif
  });
  return true;
#else
  return false;
#endif
}

void paged_decode(at::Tensor out, at::Tensor q, at::Tensor kv, int64_t layer,
                  at::Tensor tables, at::Tensor lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 6 && q.stride(2) == 1 && kv.stride(5) == 1 && out.is_contiguous());
  TORCH_CHECK(q.scalar_type() == kv.scalar_type() && out.scalar_type() == kv.scalar_type());
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && lens.is_contiguous());
  TORCH_CHECK(q.size(1) % kv.size(4) == 0 && q.size(2) == kv.size(5));
  py::gil_scoped_release nogil;   // the worker's asyncio thread runs while the kernel does
  if (kv.scalar_type() == at::kFloat) dispatch_dim<float>(out, q, kv, layer, tables, lens, (float)scale);
  else if (kv.scalar_type() == at::kBFloat16) dispatch_dim<at::BFloat16>(out, q, kv, layer, tables, lens, (float)scale);
  else TORCH_CHECK(false, "paged_decode: float32 or bfloat16 only");
}

// ---- prefill attention: float32 FMAs, avx512_bf16 dot products, or AMX tiles ---------------------
// Causal attention of whole prompts (no cached prefix) in one flat batch, as a flash attention. A
// task is (prompt, KV head, 16 query rows), for each query head of the group. It works on
// transposed products so that the softmax runs down the columns:
// scores^T = K Q^T, one vector holding a key's scores for all 16 rows, so the maximum, the
// exponentials and the sums are plain vector ops with no horizontal reductions, and
// out^T = V^T P^T. Each (prompt, KV head)'s keys and values are packed once (zero padded to 32
// keys) and shared by the GQA group's query heads; q, k and v are read through their strides
// (views into the QKV output). Scores in float32, the softmax online across chunks of CH keys.
// The causal triangle makes tasks unequal (work grows with the rows' offset), so the threads take
// them longest first from a counter.
// float32: both products by FMAs against broadcast key and value elements (keys and values packed
// as rows). bf16: probabilities rounded to bf16 before the PV product as torch's bf16 attention
// rounds them; the two products from a policy: DotProducts (vdpbf16ps: the rows' Q^T pairs against
// each key's broadcast dim pair; P^T pairs against each dim's broadcast value pair), or
// TileProducts (tile multiplies, each phase's tile work for all the group's heads back to back:
// AMX runs slower for a while after vector work).
#if defined(__AVX512F__)
#include <atomic>
#include <memory>

struct PrefillTask {
  int64_t piece, group, r0, keys;   // group: the KV head; keys: the last row's keys, the task's work
};

// Every (piece, KV head, 16 rows), longest first.
static std::vector<PrefillTask> prefill_tasks(const int64_t* bounds, int64_t pieces, int64_t kv_heads) {
  std::vector<PrefillTask> tasks;
  for (int64_t p = 0; p < pieces; ++p) {
    const int64_t n = bounds[2 * p + 1] - bounds[2 * p];
    for (int64_t r0 = 0; r0 < n; r0 += 16)
      for (int64_t g = 0; g < kv_heads; ++g) tasks.push_back({p, g, r0, std::min(r0 + 16, n)});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const PrefillTask& a, const PrefillTask& b) { return a.keys > b.keys; });
  return tasks;
}

// 2^t for t in float range (not -inf): 2^round(t) times a degree-5 fit of 2^f on [-0.5, 0.5]
// (relative error near float's own).
static inline __m512 exp2_fit(__m512 t) {
  const __m512 r = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, r);
  __m512 p = _mm512_set1_ps(1.326697039e-3f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.675459746e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550742616e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402212175e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931469492e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.000000071f));
  return _mm512_scalef_ps(p, r);
}

// One head's chunk of scores^T sh[key][row] (cn keys; key j seen by the rows seen(j) masks)
// through the online softmax down the columns: the 16 rows' maxima mx and sums sum updated, the
// head's accumulators acc (n floats) scaled down where a maximum rose (not on the first chunk),
// and the probabilities exp(scale (s - max)) of each key pair j, j + 1 < span (zero where unseen or
// past cn) handed to store(j, e_j, e_j+1).
template <typename Seen, typename Store>
static inline void column_softmax(const float* sh, int64_t cn, int64_t span, const Seen& seen, float scale2,
                                  float* mx, float* sum, float* acc, int64_t n, bool first, const Store& store) {
  const __m512 m = _mm512_loadu_ps(mx);
  // four chains of maxima: one would wait on each max's latency
  __m512 m0 = m, m1 = m, m2 = m, m3 = m;
  auto upto = [&](__m512 a, int64_t j) { return _mm512_mask_max_ps(a, seen(j), a, _mm512_loadu_ps(sh + j * 16)); };
  int64_t j = 0;
  for (; j + 4 <= cn; j += 4) {
    m0 = upto(m0, j);
    m1 = upto(m1, j + 1);
    m2 = upto(m2, j + 2);
    m3 = upto(m3, j + 3);
  }
  for (; j < cn; ++j) m0 = upto(m0, j);
  const __m512 cm = _mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3));
  const __m512 shift = _mm512_mul_ps(cm, _mm512_set1_ps(scale2));
  __m512 s = _mm512_loadu_ps(sum);
  if (!first) {   // rows whose maximum rose: the earlier sums and accumulators scaled down
    const __m512 corr = exp2_fit(_mm512_fmsub_ps(m, _mm512_set1_ps(scale2), shift));
    s = _mm512_mul_ps(s, corr);
    for (int64_t x = 0; x < n; x += 16) _mm512_storeu_ps(acc + x, _mm512_mul_ps(corr, _mm512_loadu_ps(acc + x)));
  }
  _mm512_storeu_ps(mx, cm);
  for (j = 0; j < span; j += 2) {
    const __m512 e0 = _mm512_maskz_mov_ps(j < cn ? seen(j) : 0,
        exp2_fit(_mm512_fmsub_ps(_mm512_loadu_ps(sh + j * 16), _mm512_set1_ps(scale2), shift)));
    const __m512 e1 = _mm512_maskz_mov_ps(j + 1 < cn ? seen(j + 1) : 0,
        exp2_fit(_mm512_fmsub_ps(_mm512_loadu_ps(sh + (j + 1) * 16), _mm512_set1_ps(scale2), shift)));
    s = _mm512_add_ps(s, _mm512_add_ps(e0, e1));
    store(j, e0, e1);
  }
  _mm512_storeu_ps(sum, s);
}

// key c0 + j is seen by rows i >= c0 + j - r0 of the task's 16 (all of them below r0)
static inline __mmask16 seen_by(int64_t c0, int64_t r0, int64_t j) {
  const int64_t late = c0 + j - r0;
  return late <= 0 ? (__mmask16)0xffff : late >= 16 ? (__mmask16)0 : (__mmask16)(0xffffu << late);
}

// out rows r0 .. r0 + rows of head h (op + its first row's offset, row stride ld) from out^T
// acc[dim][row] and the rows' sums
template <int D, typename T>
static inline void store_rows(T* o, int64_t ld, int64_t rows, const float* acc, const float* sum) {
  const __m512 inv = _mm512_div_ps(_mm512_set1_ps(1.f), _mm512_loadu_ps(sum));
  alignas(64) float ot[16][D];
  for (int x = 0; x < D / 16; ++x) {
    __m512i r[16];
    for (int d = 0; d < 16; ++d) r[d] = _mm512_castps_si512(_mm512_mul_ps(inv, _mm512_loadu_ps(acc + (16 * x + d) * 16)));
    transpose16x16(r);
    for (int i = 0; i < 16; ++i) _mm512_store_si512(&ot[i][16 * x], r[i]);
  }
  for (int64_t i = 0; i < rows; ++i)
    for (int d = 0; d < D; d += 16) vstore(o + i * ld + d, _mm512_load_ps(&ot[i][d]));
}

// float32: sh[j][row] = K Q^T for 16 keys at a time (16 chains), keys as rows kt[key][D]
template <int D>
static inline void scores_f32(const float* qt, const float* kt, int64_t span, float* sh) {
  for (int64_t j0 = 0; j0 < span; j0 += 16) {
    const float* kj = kt + j0 * D;
    __m512 a[16];
    for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
    for (int d = 0; d < D; ++d) {
      const __m512 qv = _mm512_loadu_ps(qt + d * 16);
      for (int j = 0; j < 16; ++j) a[j] = _mm512_fmadd_ps(qv, _mm512_set1_ps(kj[j * D + d]), a[j]);
    }
    for (int j = 0; j < 16; ++j) _mm512_storeu_ps(sh + (j0 + j) * 16, a[j]);
  }
}

// float32: ah[dim][row] (+)= V^T P^T for 16 dims at a time (16 chains), values as rows vt[key][D]
template <int D>
static inline void values_f32(float* ah, const float* pt, const float* vt, int64_t span, bool first) {
  for (int x = 0; x < D / 16; ++x) {
    __m512 a[16];
    for (int d = 0; d < 16; ++d) a[d] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ah + (16 * x + d) * 16);
    for (int64_t j = 0; j < span; ++j) {
      const __m512 pv = _mm512_loadu_ps(pt + j * 16);
      for (int d = 0; d < 16; ++d) a[d] = _mm512_fmadd_ps(pv, _mm512_set1_ps(vt[j * D + 16 * x + d]), a[d]);
    }
    for (int d = 0; d < 16; ++d) _mm512_storeu_ps(ah + (16 * x + d) * 16, a[d]);
  }
}

template <int D>
static void prefill_kernel_f32(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const int64_t* bounds, int64_t pieces, float scale) {
  static_assert(D % 16 == 0, "16 x 16 transposes");
  constexpr int64_t CH = 256;   // keys per softmax chunk
  const int64_t H = q.size(1), KVH = k.size(1), G = H / KVH;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto start = [&](int64_t p) { return bounds[2 * p]; };
  auto length = [&](int64_t p) { return bounds[2 * p + 1] - bounds[2 * p]; };
  auto padded = [&](int64_t p) { return (length(p) + 31) / 32 * 32; };
  // per (piece, KV head): keys and values as rows [key][D], zeros past the piece
  std::vector<int64_t> packed_at(pieces + 1, 0);
  for (int64_t p = 0; p < pieces; ++p) packed_at[p + 1] = packed_at[p] + padded(p) * KVH * D;
  std::unique_ptr<float[]> kbuf(new float[packed_at[pieces]]), vbuf(new float[packed_at[pieces]]);
  auto packed = [&](float* buf, int64_t p, int64_t g) { return buf + packed_at[p] + g * padded(p) * D; };
  at::parallel_for(0, pieces * KVH, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / KVH, g = item % KVH, n = length(p);
      for (const at::Tensor* src : {&k, &v}) {
        const float* row = src->data_ptr<float>() + start(p) * src->stride(0) + g * src->stride(1);
        float* dst = packed(src == &k ? kbuf.get() : vbuf.get(), p, g);
        for (int64_t j = 0; j < n; ++j) std::memcpy(dst + j * D, row + j * src->stride(0), D * sizeof(float));
        std::memset(dst + n * D, 0, (padded(p) - n) * D * sizeof(float));
      }
    }
  });
  const std::vector<PrefillTask> tasks = prefill_tasks(bounds, pieces, KVH);
  std::atomic<int64_t> next{0};
  const int64_t ntasks = (int64_t)tasks.size();
  const float scale2 = scale * 1.44269504088896341f;   // exp(x scale) = 2^(x scale2)
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    // per query head of the group: Q^T [dim][row]; scores^T and P^T [key][row]; out^T [dim][row]
    std::vector<float> qtr(G * D * 16), st(G * CH * 16), pt(G * CH * 16), acc(G * D * 16), mxs(G * 16), sums(G * 16);
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) {
      const PrefillTask& task = tasks[t];
      const int64_t p = task.piece, g = task.group, r0 = task.r0, kn = task.keys, rows = kn - r0;
      const float* kg = packed(kbuf.get(), p, g);
      const float* vg = packed(vbuf.get(), p, g);
      for (int64_t hh = 0; hh < G; ++hh)
        for (int x = 0; x < D / 16; ++x) {   // rows past the prompt: zeros, their results dropped
          __m512i r[16];
          for (int64_t i = 0; i < 16; ++i)
            r[i] = i < rows ? _mm512_loadu_si512(qp + (start(p) + r0 + i) * q.stride(0) + (g * G + hh) * q.stride(1) + 16 * x)
                            : _mm512_setzero_si512();
          transpose16x16(r);
          for (int d = 0; d < 16; ++d) _mm512_storeu_si512(&qtr[(hh * D + 16 * x + d) * 16], r[d]);
        }
      std::fill(mxs.begin(), mxs.end(), -INFINITY);
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t c0 = 0; c0 < kn; c0 += CH) {   // c0 <= r0: every row sees a key of each chunk
        const int64_t cn = std::min(CH, kn - c0), span = (cn + 15) / 16 * 16;
        const auto seen = [&](int64_t j) { return seen_by(c0, r0, j); };
        for (int64_t hh = 0; hh < G; ++hh) {
          float* sh = &st[hh * CH * 16];
          float* ph = &pt[hh * CH * 16];
          scores_f32<D>(&qtr[hh * D * 16], kg + c0 * D, span, sh);
          column_softmax(sh, cn, span, seen, scale2, &mxs[hh * 16], &sums[hh * 16], &acc[hh * D * 16], D * 16, c0 == 0,
                         [&](int64_t j, __m512 e0, __m512 e1) {
                           _mm512_storeu_ps(ph + j * 16, e0);
                           _mm512_storeu_ps(ph + (j + 1) * 16, e1);
                         });
          values_f32<D>(&acc[hh * D * 16], ph, vg + c0 * D, span, c0 == 0);
        }
      }
      for (int64_t hh = 0; hh < G; ++hh)
        store_rows<D>(op + ((start(p) + r0) * H + g * G + hh) * D, H * D, rows, &acc[hh * D * 16], &sums[hh * 16]);
    }
  });
}
#endif

#if defined(__AVX512BF16__)
// A permutation of 32 words: lane 2i + e takes word a + i of the first operand (e = 0) or b + i
// (e = 1; 32 and up name the second operand of a two-source permute).
static inline __m512i interleave_index(int a, int b) {
  alignas(64) uint16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = (uint16_t)(a + i);
    idx[2 * i + 1] = (uint16_t)(b + i);
  }
  return _mm512_load_si512(idx);
}

constexpr int64_t kPrefillTile = 512;   // bf16 in a V^T tile: 16 dims x 32 keys

// One head's products by dot products. Layouts (the kernel's): Q^T qh [dim pair][row] dwords;
// keys kg [key][D]; scores^T sh [key][row]; P^T ph [key pair][row][2]; V^T tiles vg [32-key
// block][16-dim tile][dim][key pair]; out^T ah [dim][row].
struct DotProducts {
  static void begin() {}
  static void end() {}

  // sh[j][.] = scores of keys c0 + j, j < span (a multiple of 32), 16 keys' accumulators at a time
  template <int D>
  static void scores(const uint32_t* qh, const uint16_t* kg, int64_t c0, int64_t span, float* sh) {
    constexpr int KB = 16;
    for (int64_t j0 = 0; j0 < span; j0 += KB) {
      const uint32_t* kt = reinterpret_cast<const uint32_t*>(kg + (c0 + j0) * D);
      __m512 acc[KB];
      for (int j = 0; j < KB; ++j) acc[j] = _mm512_setzero_ps();
      for (int dp = 0; dp < D / 2; ++dp) {
        const __m512bh qv = as_bh(_mm512_loadu_si512(qh + dp * 16));
        for (int j = 0; j < KB; ++j)
          acc[j] = _mm512_dpbf16_ps(acc[j], qv, as_bh(_mm512_set1_epi32((int)kt[j * (D / 2) + dp])));
      }
      for (int j = 0; j < KB; ++j) _mm512_storeu_ps(sh + (j0 + j) * 16, acc[j]);
    }
  }

  // ah (+)= V^T P^T over keys c0 .. c0 + span, 16 dims' accumulators at a time
  template <int D>
  static void pv(float* ah, const uint16_t* ph, const uint16_t* vg, int64_t c0, int64_t span, bool first) {
    constexpr int XT = D / 16;
    for (int x = 0; x < XT; ++x) {
      __m512 acc[16];
      for (int d = 0; d < 16; ++d) acc[d] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(ah + (x * 16 + d) * 16);
      for (int64_t k0 = 0; k0 < span; k0 += 32) {
        const uint32_t* vt = reinterpret_cast<const uint32_t*>(vg + ((c0 + k0) / 32 * XT + x) * kPrefillTile);
        for (int pr = 0; pr < 16; ++pr) {
          const __m512bh pv = as_bh(_mm512_loadu_si512(ph + (k0 + 2 * pr) * 16));
          for (int d = 0; d < 16; ++d) acc[d] = _mm512_dpbf16_ps(acc[d], pv, as_bh(_mm512_set1_epi32((int)vt[16 * d + pr])));
        }
      }
      for (int d = 0; d < 16; ++d) _mm512_storeu_ps(ah + (x * 16 + d) * 16, acc[d]);
    }
  }
};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The same products as tile multiplies (the layouts above are the tiles' own).
struct TileProducts {
  static void begin() {
    const TileConfig cfg;
    _tile_loadconfig(&cfg);
  }
  static void end() { _tile_release(); }

  template <int D>
  static void scores(const uint32_t* qh, const uint16_t* kg, int64_t c0, int64_t span, float* sh) {
    static_assert(D == 64 || D == 128, "Q^T in at most 4 tiles");
    constexpr int C = D / 32;
    _tile_loadd(4, qh, 64);
    _tile_loadd(5, qh + 256, 64);
    if constexpr (C > 2) {
      _tile_loadd(6, qh + 512, 64);
      _tile_loadd(7, qh + 768, 64);
    }
    for (int64_t j0 = 0; j0 < span; j0 += 32) {
      const uint16_t* kt = kg + (c0 + j0) * D;
      _tile_zero(0);
      _tile_zero(1);
// chunk x of both key tiles against Q^T tile qx (a literal: the tile instructions' operands)
#define PDSERVE_QK(x, qx)                                     \
  _tile_loadd(2, kt + 32 * (x), D * sizeof(uint16_t));        \
  _tile_dpbf16ps(0, 2, qx);                                   \
  _tile_loadd(3, kt + 16 * D + 32 * (x), D * sizeof(uint16_t)); \
  _tile_dpbf16ps(1, 3, qx);
      PDSERVE_QK(0, 4)
      PDSERVE_QK(1, 5)
      if constexpr (C > 2) {
        PDSERVE_QK(2, 6)
        PDSERVE_QK(3, 7)
      }
#undef PDSERVE_QK
      _tile_stored(0, sh + j0 * 16, 64);
      _tile_stored(1, sh + (j0 + 16) * 16, 64);
    }
  }

  // four 16-dim tiles of out^T at a time
  template <int D>
  static void pv(float* ah, const uint16_t* ph, const uint16_t* vg, int64_t c0, int64_t span, bool first) {
    constexpr int XT = D / 16;
    for (int xg = 0; xg < XT; xg += 4) {
      float* ag = ah + xg * 256;
      if (first) {
        _tile_zero(4);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
      } else {
        _tile_loadd(4, ag, 64);
        _tile_loadd(5, ag + 256, 64);
        _tile_loadd(6, ag + 512, 64);
        _tile_loadd(7, ag + 768, 64);
      }
      for (int64_t k0 = 0; k0 < span; k0 += 32) {
        const uint16_t* vt = vg + ((c0 + k0) / 32 * XT + xg) * kPrefillTile;
        _tile_loadd(0, ph + k0 * 16, 64);
        _tile_loadd(1, vt, 64);
        _tile_dpbf16ps(4, 1, 0);
        _tile_loadd(2, vt + kPrefillTile, 64);
        _tile_dpbf16ps(5, 2, 0);
        _tile_loadd(3, vt + 2 * kPrefillTile, 64);
        _tile_dpbf16ps(6, 3, 0);
        _tile_loadd(1, vt + 3 * kPrefillTile, 64);
        _tile_dpbf16ps(7, 1, 0);
      }
      _tile_stored(4, ag, 64);
      _tile_stored(5, ag + 256, 64);
      _tile_stored(6, ag + 512, 64);
      _tile_stored(7, ag + 768, 64);
    }
  }
};
#endif

template <int D, typename Products>
static void prefill_kernel(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const int64_t* bounds, int64_t pieces, float scale) {
  static_assert(D == 64 || D == 128, "dims in 32-dim chunks, out^T in groups of four 16-dim tiles");
  using T = at::BFloat16;
  constexpr int C = D / 32, XT = D / 16;   // 32-dim chunks; 16-dim tiles of out^T
  constexpr int64_t CH = 256, TILE = kPrefillTile;   // keys per softmax chunk; bf16 in a tile
  const int64_t H = q.size(1), KVH = k.size(1), G = H / KVH;
  const int64_t sq_t = q.stride(0), sq_h = q.stride(1), sk_t = k.stride(0), sk_h = k.stride(1);
  const int64_t sv_t = v.stride(0), sv_h = v.stride(1);
  const uint16_t* qp = reinterpret_cast<const uint16_t*>(q.data_ptr<T>());
  const uint16_t* kp = reinterpret_cast<const uint16_t*>(k.data_ptr<T>());
  const uint16_t* vp = reinterpret_cast<const uint16_t*>(v.data_ptr<T>());
  T* op = out.data_ptr<T>();
  auto start = [&](int64_t p) { return bounds[2 * p]; };
  auto length = [&](int64_t p) { return bounds[2 * p + 1] - bounds[2 * p]; };
  auto padded = [&](int64_t p) { return (length(p) + 31) / 32 * 32; };

  // where each piece's packing starts, the 32-key blocks to pack (piece, block)
  std::vector<int64_t> packed_at(pieces + 1, 0);
  std::vector<std::pair<int64_t, int64_t>> blocks;
  for (int64_t p = 0; p < pieces; ++p) {
    packed_at[p + 1] = packed_at[p] + padded(p) * KVH * D;
    for (int64_t b = 0; b < padded(p) / 32; ++b) blocks.emplace_back(p, b);
  }
  const std::vector<PrefillTask> tasks = prefill_tasks(bounds, pieces, KVH);
  // per (piece, KV head): keys as rows [key][D]; values as V^T tiles [32-key block][16-dim tile],
  // row d of a tile dim d's 32 values in key order
  std::unique_ptr<uint16_t[]> kbuf(new uint16_t[packed_at[pieces]]), vbuf(new uint16_t[packed_at[pieces]]);
  auto packed = [&](uint16_t* buf, int64_t p, int64_t g) { return buf + packed_at[p] + g * padded(p) * D; };

  at::parallel_for(0, (int64_t)blocks.size() * KVH, 1, [&](int64_t begin, int64_t end) {
    const __m512i lower = interleave_index(0, 32), upper = interleave_index(16, 48);
    for (int64_t item = begin; item < end; ++item) {
      const auto [p, b] = blocks[item / KVH];
      const int64_t g = item % KVH, n = length(p), k0 = 32 * b;
      const uint16_t* krow = kp + start(p) * sk_t + g * sk_h;
      const uint16_t* vrow = vp + start(p) * sv_t + g * sv_h;
      uint16_t* kt = packed(kbuf.get(), p, g) + k0 * D;
      uint16_t* vt = packed(vbuf.get(), p, g) + b * XT * TILE;
      for (int64_t j = 0; j < 32; ++j) {
        if (k0 + j < n) std::memcpy(kt + j * D, krow + (k0 + j) * sk_t, D * sizeof(T));
        else std::memset(kt + j * D, 0, D * sizeof(T));
      }
      for (int c = 0; c < C; ++c) {   // key pairs interleaved (dword i of row p: keys 2p, 2p + 1 of dim i), then transposed
        __m512i lo16[16], hi16[16];
        for (int pr = 0; pr < 16; ++pr) {
          const int64_t ka = k0 + 2 * pr;
          const __m512i a = ka < n ? _mm512_loadu_si512(vrow + ka * sv_t + 32 * c) : _mm512_setzero_si512();
          const __m512i z = ka + 1 < n ? _mm512_loadu_si512(vrow + (ka + 1) * sv_t + 32 * c) : _mm512_setzero_si512();
          lo16[pr] = _mm512_permutex2var_epi16(a, lower, z);
          hi16[pr] = _mm512_permutex2var_epi16(a, upper, z);
        }
        transpose16x16(lo16);
        transpose16x16(hi16);
        for (int d = 0; d < 16; ++d) {
          _mm512_storeu_si512(vt + 2 * c * TILE + 32 * d, lo16[d]);
          _mm512_storeu_si512(vt + (2 * c + 1) * TILE + 32 * d, hi16[d]);
        }
      }
    }
  });

  std::atomic<int64_t> next{0};
  const int64_t ntasks = (int64_t)tasks.size();
  const float scale2 = scale * 1.44269504088896341f;   // exp(x scale) = 2^(x scale2)
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    Products::begin();
    // per query head of the group: Q^T [chunk][dim pair][row]; scores^T [key][row]; P^T, key
    // pairs interleaved [key pair][row][2]; out^T [dim tile][dim][row]; row maxima and sums
    std::vector<uint32_t> qtr(G * C * 256);
    std::vector<float> st(G * CH * 16), acc(G * XT * 256), mxs(G * 16), sums(G * 16);
    std::vector<uint16_t> pt(G * CH * 16);
    const __m512i pairs = interleave_index(0, 16);
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < ntasks;) {
      const PrefillTask& task = tasks[t];
      const int64_t p = task.piece, g = task.group, r0 = task.r0, kn = task.keys, rows = kn - r0;
      const uint16_t* kg = packed(kbuf.get(), p, g);
      const uint16_t* vg = packed(vbuf.get(), p, g);
      for (int64_t hh = 0; hh < G; ++hh)
        for (int c = 0; c < C; ++c) {   // rows past the prompt: zeros, their results dropped
          __m512i r[16];
          for (int64_t i = 0; i < 16; ++i)
            r[i] = i < rows ? _mm512_loadu_si512(qp + (start(p) + r0 + i) * sq_t + (g * G + hh) * sq_h + 32 * c)
                            : _mm512_setzero_si512();
          transpose16x16(r);
          for (int pr = 0; pr < 16; ++pr) _mm512_storeu_si512(&qtr[((hh * C + c) * 16 + pr) * 16], r[pr]);
        }
      std::fill(mxs.begin(), mxs.end(), -INFINITY);
      std::fill(sums.begin(), sums.end(), 0.f);
      for (int64_t c0 = 0; c0 < kn; c0 += CH) {   // c0 <= r0: every row sees a key of each chunk
        const int64_t cn = std::min(CH, kn - c0), span = (cn + 31) / 32 * 32;
        for (int64_t hh = 0; hh < G; ++hh)
          Products::template scores<D>(&qtr[hh * C * 256], kg, c0, span, &st[hh * CH * 16]);
        const auto seen = [&](int64_t j) { return seen_by(c0, r0, j); };
        for (int64_t hh = 0; hh < G; ++hh) {
          // P^T: each key's probabilities for the 16 rows, two keys interleaved per pair row
          uint16_t* ph = &pt[hh * CH * 16];
          column_softmax(&st[hh * CH * 16], cn, span, seen, scale2, &mxs[hh * 16], &sums[hh * 16], &acc[hh * XT * 256],
                         XT * 256, c0 == 0, [&](int64_t j, __m512 e0, __m512 e1) {
                           const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);   // e0 in the low half
                           _mm512_storeu_si512(ph + j * 16, _mm512_permutexvar_epi16(pairs, both));
                         });
        }
        for (int64_t hh = 0; hh < G; ++hh)
          Products::template pv<D>(&acc[hh * XT * 256], &pt[hh * CH * 16], vg, c0, span, c0 == 0);
      }
      for (int64_t hh = 0; hh < G; ++hh)
        store_rows<D>(op + ((start(p) + r0) * H + g * G + hh) * D, H * D, rows, &acc[hh * XT * 256], &sums[hh * 16]);
    }
    Products::end();
  });
}

template <typename Products>
static void prefill_by(at::Tensor& out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const int64_t* bounds, int64_t pieces, float scale) {
  if (q.size(2) == 64) prefill_kernel<64, Products>(out, q, k, v, bounds, pieces, scale);
  else prefill_kernel<128, Products>(out, q, k, v, bounds, pieces, scale);
}
#endif

// Causal attention of the pieces bounds[i] = (start, end) of a flat batch, each a whole prompt
// (no cached prefix): out [T, H, D] (contiguous) from q [T, H, D], k, v [T, KVH, D] (any row
// and head strides, unit last stride). Returns whether it ran, for head sizes 64 and 128: float32
// on every AVX-512 build, bf16 on builds with avx512_bf16 (on AMX tiles where permitted);
// otherwise the caller takes its torch path (nothing written).
bool prefill_attention(at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor bounds, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && k.sizes() == v.sizes() && out.sizes() == q.sizes() && out.is_contiguous());
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1);
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(2) == q.size(2) && k.size(1) > 0 && q.size(1) % k.size(1) == 0);
  TORCH_CHECK(bounds.scalar_type() == at::kLong && bounds.dim() == 2 && bounds.size(1) == 2 && bounds.is_contiguous());
  const int64_t* b = bounds.data_ptr<int64_t>();
  for (int64_t i = 0; i < bounds.size(0); ++i)
    TORCH_CHECK(0 <= b[2 * i] && b[2 * i] <= b[2 * i + 1] && b[2 * i + 1] <= q.size(0), "prefill_attention: a piece outside the batch");
  const auto all = [&](at::ScalarType t) {
    return q.scalar_type() == t && k.scalar_type() == t && v.scalar_type() == t && out.scalar_type() == t;
  };
  if (q.size(2) != 64 && q.size(2) != 128) return false;
#if defined(__AVX512F__)
  if (all(at::kFloat)) {
    py::gil_scoped_release nogil;
    if (q.size(2) == 64) prefill_kernel_f32<64>(out, q, k, v, b, bounds.size(0), (float)scale);
    else prefill_kernel_f32<128>(out, q, k, v, b, bounds.size(0), (float)scale);
    return true;
  }
#endif
#if defined(__AVX512BF16__)
  if (all(at::kBFloat16)) {
    py::gil_scoped_release nogil;
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx_permitted()) {
      prefill_by<TileProducts>(out, q, k, v, b, bounds.size(0), (float)scale);
      return true;
    }
#endif
    prefill_by<DotProducts>(out, q, k, v, b, bounds.size(0), (float)scale);
    return true;
  }
#endif
  return false;
}

// ---- greedy sampling -------------------------------------------------------------------------------
// The index of each row's largest value, as torch's max(dim).indices: the first of tied maxima,
// and a NaN wins over every number (the first NaN). Two reads of the row (its maximum, then
// where it first is): the second comes from cache, a row being one vocabulary.
template <typename T>
static int64_t row_argmax(const T* x, int64_t n) {
  vf best = vset1(-INFINITY);
  int64_t i = 0;
  for (; i + VW <= n; i += VW) {
    const vf v = vload(x + i);
    const uint32_t nan = vnan_lanes(v);
    if (nan) return i + __builtin_ctz(nan);
    best = vmax(best, v);
  }
  float m = vhmax(best);
  for (int64_t j = i; j < n; ++j) {
    const float v = to_float(x[j]);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return j;   // the first NaN (the vector part had none)
    m = std::max(m, v);
  }
  const vf vm = vset1(m);
  for (i = 0; i + VW <= n; i += VW) {
    const uint32_t eq = veq_lanes(vload(x + i), vm);
    if (eq) return i + __builtin_ctz(eq);
  }
  for (; i < n; ++i) if (to_float(x[i]) == m) return i;
  return 0;   // a row of -inf only: torch's answer too
}

void argmax_rows(at::Tensor out, at::Tensor logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.stride(1) == 1 && out.is_contiguous() && out.scalar_type() == at::kLong
              && out.numel() == logits.size(0));
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16,
              "argmax_rows: float32 or bfloat16 only");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  int64_t* o = out.data_ptr<int64_t>();
  py::gil_scoped_release nogil;
  const int64_t grain = std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(n, 1));
  parallel_rows(rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (logits.scalar_type() == at::kFloat) o[r] = row_argmax(logits.data_ptr<float>() + r * stride, n);
      else o[r] = row_argmax(logits.data_ptr<at::BFloat16>() + r * stride, n);
    }
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode", torch::wrap_pybind_function(paged_decode), "decode attention over the paged KV pool");
  m.def("rms_norm", torch::wrap_pybind_function(rms_norm), "rms_norm, with an optional residual add first");
  m.def("silu_and_mul", torch::wrap_pybind_function(silu_and_mul), "silu(gate) * up");
  m.def("rope", torch::wrap_pybind_function(rope), "rotary embedding in place (rotate half)");
  m.def("set_hot", &set_hot, "threads > 1: the calling thread's kernels run on the hot team until set_hot(0)");
  m.def("hot_here", &hot_here, "whether the calling thread's kernels run on the hot team now");
  m.def("set_serial_work", &set_serial_work, "the work below which an op runs on one thread; returns the old value");
  m.def("store_kv", torch::wrap_pybind_function(store_kv), "K and V rows into their pool slots");
  m.def("argmax_rows", torch::wrap_pybind_function(argmax_rows), "each row's first largest value's index (greedy)");
  m.def("panel_linear", torch::wrap_pybind_function(panel_linear), "float32 x @ W^T + b over weight panels");
  m.def("tile_linear", torch::wrap_pybind_function(tile_linear),
        "bf16 x @ W^T + b of up to 32 rows over weight tiles (AMX tiles or avx512_bf16 dot products), "
        "optionally SiLU-and-mul "
        "of gate and up rows interleaved by 16; returns whether it ran");
  m.def("prefill_attention", torch::wrap_pybind_function(prefill_attention),
        "causal attention of whole prompts in a flat batch (AVX-512 builds: float32; avx512_bf16 and AMX: bf16); returns whether it ran");
}

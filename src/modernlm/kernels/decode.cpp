// Decoding kernels for the CPU: few rows (a decode step) against weights read once from memory.
//
// A decode step of a small model is memory-bound: every weight is read once per step and used by
// only a few rows, so the time is bytes / bandwidth. These kernels stream each weight row once and
// reuse it for several activation rows held in registers; the weights may be float32, or 8-bit or
// 4-bit in blocks of 32 with a float scale per block (GGUF's Q8_0 and Q4_1, so a .gguf file's blocks
// are used as they are; Q8_0 packed 16 rows side by side). The 8-bit kernel rounds the activations to
// 8 bits too and multiplies bytes into int32 sums (as llama.cpp does): fast enough for a prefill's
// many rows as well. The attention kernel reads a paged KV cache in place.
//
// Written with GCC/Clang vector extensions (vectors of 16 floats): the compiler maps them to
// AVX-512, AVX2 or NEON with -march=native. Threads: ATen's pool (at::parallel_for), the one
// PyTorch's own ops use, so the two never compete. Built on first use by modernlm/kernels/__init__.py.
//
// Shapes: M activation rows, K input features, N output features, QB = K / 32 blocks per row.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

typedef float f16v __attribute__((vector_size(64)));    // 16 floats
typedef uint8_t u16v __attribute__((vector_size(16)));  // 16 uint8
typedef int32_t s16v __attribute__((vector_size(64)));  // 16 int32

static inline f16v load16(const float* p) {
  f16v v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
#if defined(__AVX512F__)
#include <immintrin.h>
static inline float hsum(f16v v) { return _mm512_reduce_add_ps((__m512)v); }  // a shuffle tree, not 15 adds
#else
static inline float hsum(f16v v) {
  float s = 0.f;
  for (int i = 0; i < 16; i++) s += v[i];
  return s;
}
#endif
#if defined(__AVX512F__)
// GCC scalarises the generic uint8 -> float conversion below; one instruction pair does it here
static inline f16v u8_to_f(u16v b) { return (f16v)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32((__m128i)b)); }
#else
static inline f16v u8_to_f(u16v b) { return __builtin_convertvector(__builtin_convertvector(b, s16v), f16v); }
#endif

constexpr int QK = 32;   // weights per quantization block
constexpr int MR = 8;    // activation rows kept in registers per pass over a weight row
constexpr int NC = 16;   // weight rows per tile: read from memory in the first pass, from cache in the others

// The next tile's weights, asked of memory a cache line at a time (`step`, once per inner step of a
// tile's loop) while the passes after a tile's first compute from cache: memory then works while
// they compute, where it sat idle until the next tile's first pass asked for its weights (16 rows
// of float32 ran in the sum of the two times, not the larger). Into L2 (prefetcht1): a tile of
// float32 rows can be larger than L1. One line a step: at 16 rows the three passes after a float32
// tile's first, K = 576, fetch 3/4 of the next tile's 576 lines, and the hardware prefetcher
// streams the rest. No result changes.
struct Ahead {
  const char* p = nullptr;
  const char* end = nullptr;
  inline void step() {
    if (p < end) {
      __builtin_prefetch(p, 0, 2);
      p += 64;
    }
  }
};

// The loop every matmul here shares: y (M, N) = x @ w.T in tiles of NC weight rows (a task's
// rows, so both cores work), and in each tile passes of R <= MRX activation rows: every pass runs
// over the tile while its weights are in cache, so the weights come from memory once whatever M is.
// `Tile<R>::run(a, c0, c1, m0, ahead)` computes weight rows c0 .. c1-1 against activation rows m0 ..
// m0+R-1, calling ahead.step() as it goes; `a.row(n)` is where weight row n's bytes start (rows
// are contiguous). R is a template argument so that the accumulators live in registers: with a
// runtime count they went through memory, and each add then waited for the last one's store (3x slower).
template <template <int> class Tile, int MRX, typename Args>
static void for_tiles(int64_t M, int64_t N, const Args& a) {
  at::parallel_for(0, N, NC, [&](int64_t n0, int64_t n1) {
    for (int64_t c0 = n0; c0 < n1; c0 += NC) {
      const int64_t c1 = std::min(n1, c0 + NC);
      Ahead ahead;  // nothing in the first pass: it reads this tile from memory itself
      for (int64_t m0 = 0; m0 < M; m0 += MRX) {
        if (m0 == MRX) ahead = Ahead{a.row(c1), a.row(std::min(n1, c1 + NC))};
        switch (std::min<int64_t>(MRX, M - m0)) {  // the cases past MRX are never built
          case 1: Tile<1>::run(a, c0, c1, m0, ahead); break;
          case 2: if constexpr (MRX >= 2) Tile<2>::run(a, c0, c1, m0, ahead); break;
          case 3: if constexpr (MRX >= 3) Tile<3>::run(a, c0, c1, m0, ahead); break;
          case 4: if constexpr (MRX >= 4) Tile<4>::run(a, c0, c1, m0, ahead); break;
          case 5: if constexpr (MRX >= 5) Tile<5>::run(a, c0, c1, m0, ahead); break;
          case 6: if constexpr (MRX >= 6) Tile<6>::run(a, c0, c1, m0, ahead); break;
          case 7: if constexpr (MRX >= 7) Tile<7>::run(a, c0, c1, m0, ahead); break;
          default: Tile<MRX>::run(a, c0, c1, m0, ahead); break;
        }
      }
    }
  });
}

static void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be contiguous float32");
}

// float32: NW weight rows x R activation rows at a time, one accumulator for each of the NW * R
// outputs, all in registers: each activation load feeds NW products and each weight load R (one
// weight row at a time spent a load on every product: at 16 rows it ran at a third of the memory's
// speed). Every output is the same chain over k, 16 lanes a step, then one horizontal sum, whatever
// R and NW are: a row gives the same bits alone and in any batch.
#if defined(__AVX512F__)
constexpr int NW32 = 4, MR32 = 4;  // 16 accumulators of AVX-512's 32 registers
#else
constexpr int NW32 = 2, MR32 = 4;  // 8 (16 registers' halves with AVX2)
#endif

#if defined(__AVX512F__)
// The 16 horizontal sums of v[0..15] at once, each summed in hsum's order (lanes i and i + 8, then
// i + 4, i + 2, i + 1: _mm512_reduce_add_ps's tree), so each is hsum(v[j]) to the bit; 15 vector
// adds for 16 sums where 16 hsums take 64 (with K = 576 those were ~30% of a tile's instructions).
// Lane 4c + r of the result holds the sum of v[4r + c].
static inline f16v hsum16(const f16v* v) {
  __m512 a[8], b[4], c[2];
  for (int k = 0; k < 8; k++) {  // (i, i + 8): 256-bit halves of v[2k] | v[2k + 1]
    const __m512 x = (__m512)v[2 * k], y = (__m512)v[2 * k + 1];
    a[k] = _mm512_add_ps(_mm512_shuffle_f32x4(x, y, 0x44), _mm512_shuffle_f32x4(x, y, 0xEE));
  }
  for (int k = 0; k < 4; k++)  // (i, i + 4): 128-bit quarters
    b[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x88), _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xDD));
  for (int k = 0; k < 2; k++)  // (i, i + 2), inside each 128-bit lane
    c[k] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0x44), _mm512_shuffle_ps(b[2 * k], b[2 * k + 1], 0xEE));
  // (i, i + 1)
  return (f16v)_mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}
#endif

template <int R, int NW>
static inline void tile_f32(const float* X, const float* W, int64_t K, int64_t N, int64_t n, int64_t m0, float* y,
                            Ahead& ahead) {
  f16v acc[NW][R] = {};
  for (int64_t k = 0; k < K; k += 16) {
    ahead.step();
    f16v w[NW];
    for (int j = 0; j < NW; j++) w[j] = load16(W + (n + j) * K + k);
    for (int i = 0; i < R; i++) {
      const f16v x = load16(X + (m0 + i) * K + k);
      for (int j = 0; j < NW; j++) acc[j][i] += x * w[j];
    }
  }
#if defined(__AVX512F__)
  if constexpr (R == 4 && NW == 4) {  // a whole tile: its 16 sums at once, row i's 4 outputs in lanes 4i..4i+3
    f16v v[16];
    for (int i = 0; i < 4; i++)
      for (int j = 0; j < 4; j++) v[4 * j + i] = acc[j][i];  // lane 4c + r holds v[4r + c]: r = j, c = i
    const f16v s = hsum16(v);
    for (int i = 0; i < 4; i++) std::memcpy(y + (m0 + i) * N + n, (const float*)&s + 4 * i, 4 * sizeof(float));
    return;
  }
#endif
  for (int i = 0; i < R; i++)
    for (int j = 0; j < NW; j++) y[(m0 + i) * N + n + j] = hsum(acc[j][i]);
}

struct F32Args {
  const float* X; const float* W; float* Y; int64_t K, N;
  const char* row(int64_t n) const { return (const char*)(W + n * K); }
};
// weight rows c0 .. c1-1 against activation rows m0 .. m0+R-1: NW32 at a time, then one at a time
template <int R> struct TileF32 {
  static void run(const F32Args& a, int64_t c0, int64_t c1, int64_t m0, Ahead& ahead) {
    int64_t n = c0;
    for (; n + NW32 <= c1; n += NW32) tile_f32<R, NW32>(a.X, a.W, a.K, a.N, n, m0, a.Y, ahead);
    for (; n < c1; n++) tile_f32<R, 1>(a.X, a.W, a.K, a.N, n, m0, a.Y, ahead);
  }
};

// float32 weights w (N, K), K a multiple of 16
at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1), M = x.size(0);
  check_x(x, K);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && K % 16 == 0, "w must be contiguous float32, K % 16 == 0");
  at::Tensor y = at::empty({M, N}, x.options());
  for_tiles<TileF32, MR32>(M, N, F32Args{x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), K, N});
  return y;
}

struct Q4Args {
  const float* X; const uint8_t* Q; const float* S; const float* Mn; const float* XS; float* Y; int64_t K, N;
  const char* row(int64_t n) const { return (const char*)(Q + n * (K / 2)); }
};
// one weight row n against activation rows m0 .. m0+R-1 into out[0 .. R-1]
template <int R> struct DotQ4 {
  static void run(const Q4Args& a, int64_t n, int64_t m0, float* out, Ahead& ahead) {
    const int64_t QB = a.K / QK;
    const uint8_t* qr = a.Q + n * (a.K / 2);
    const float* sr = a.S + n * QB;
    const float* mr = a.Mn + n * QB;
    const float* xr = a.X + m0 * a.K;
    f16v acc0[R] = {}, acc1[R] = {};
    float macc[R] = {};
    for (int64_t b = 0; b < QB; b++) {
      ahead.step();
      u16v bytes;
      std::memcpy(&bytes, qr + b * 16, 16);
      f16v s = sr[b] - (f16v){};
      f16v w0 = s * u8_to_f(bytes & 15), w1 = s * u8_to_f(bytes >> 4);
      for (int i = 0; i < R; i++) {
        acc0[i] += load16(xr + i * a.K + b * QK) * w0;
        acc1[i] += load16(xr + i * a.K + b * QK + 16) * w1;
        macc[i] += mr[b] * a.XS[(m0 + i) * QB + b];
      }
    }
    for (int i = 0; i < R; i++) out[i] = hsum(acc0[i] + acc1[i]) + macc[i];
  }
};
template <int R> struct TileQ4 {
  static void run(const Q4Args& a, int64_t c0, int64_t c1, int64_t m0, Ahead& ahead) {
    for (int64_t n = c0; n < c1; n++) {
      float acc[R];
      DotQ4<R>::run(a, n, m0, acc, ahead);
      for (int i = 0; i < R; i++) a.Y[(m0 + i) * a.N + n] = acc[i];
    }
  }
};

// 4-bit weights in GGUF's Q4_1 order: q (N, K / 2) uint8, block b of row n in bytes 16b..16b+15;
// byte j of a block holds weight j (low nibble) and weight j + 16 (high nibble).
// w[n, k] = scales[n, b] * nibble + mins[n, b]. Q4_0 is the case mins = -8 * scales.
at::Tensor linear_q4(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scales, const at::Tensor& mins) {
  const int64_t N = q.size(0), K = 2 * q.size(1), M = x.size(0), QB = K / QK;
  check_x(x, K);
  TORCH_CHECK(q.scalar_type() == at::kByte && q.is_contiguous() && K % QK == 0, "q must be contiguous uint8, K % 32 == 0");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.numel() == N * QB, "bad scales");
  TORCH_CHECK(mins.scalar_type() == at::kFloat && mins.is_contiguous() && mins.numel() == N * QB, "bad mins");
  at::Tensor y = at::empty({M, N}, x.options());
  const float* X = x.data_ptr<float>();
  // the sum of each block of each x row, for the mins: sum_k (s q_k + m) x_k = s (q . x) + m sum(x)
  std::vector<float> xsum(M * QB);
  for (int64_t i = 0; i < M; i++)
    for (int64_t b = 0; b < QB; b++) {
      const float* xr = X + i * K + b * QK;
      xsum[i * QB + b] = hsum(load16(xr) + load16(xr + 16));
    }
  for_tiles<TileQ4, MR>(M, N, Q4Args{X, q.data_ptr<uint8_t>(), scales.data_ptr<float>(), mins.data_ptr<float>(), xsum.data(),
                                     y.data_ptr<float>(), K, N});
  return y;
}

// ---- 8-bit weights times 8-bit activations (llama.cpp's Q8_0 x Q8_0 on CPUs) ----------------------
// Each activation row is rounded to 8 bits per block of 32 (Q8_0: d = max|x| / 127, q = round(x / d),
// d kept at float16 as llama.cpp does), and a block's products are exact int32 sums: one AVX512-VNNI
// instruction (vpdpbusd) does 64 multiply-adds, where the float32 path above does 16. The float work
// (int -> float, the two scales) is paid once per block of 32, not once per weight.
//
// Weights are packed for it ("q8p"): 16 output features side by side, 4 input features each, so one
// 64-byte load feeds 16 outputs: qp (G = N/16, K/4, 16, 4) uint8 = q + 128 (vpdpbusd multiplies
// unsigned by signed bytes: the weights take the unsigned side, and the row's 128 * sum(xq) is taken
// off again), sp (G, QB, 16) float32 the weights' scales in the same order.
// Every output is the same sequence of operations whatever M is or which tile computes it, so a row
// gets the same bits alone as in a batch, and in a prefill as in a decode step.

struct XQ { std::vector<int8_t> q; std::vector<float> d; std::vector<int32_t> c; };

// x (M, K) -> 8-bit rows: q (M, K), d (M, QB) the scale, c (M, QB) = -128 * sum of the block's q
static void quantize_rows(const float* X, int64_t M, int64_t K, XQ& out) {
  const int64_t QB = K / QK;
  out.q.resize(M * K); out.d.resize(M * QB); out.c.resize(M * QB);
  at::parallel_for(0, M * QB, 64, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) {
      const float* xb = X + i * QK;  // block i of the flat (M, K) array: row i / QB, block i % QB
      float amax = 0.f;
      for (int j = 0; j < QK; j++) amax = std::max(amax, std::fabs(xb[j]));
      const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
      int32_t sum = 0;
      for (int j = 0; j < QK; j++) {
        const int v = (int)std::nearbyint(xb[j] * id);  // half to even, as llama.cpp's x86 path
        out.q[i * QK + j] = (int8_t)v;
        sum += v;
      }
      out.d[i] = (float)c10::Half(d);
      out.c[i] = -128 * sum;
    }
  });
}

struct Q8PArgs { const int8_t* XQ; const float* XD; const int32_t* XC; const uint8_t* W; const float* S; float* Y; int64_t K, N; };

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
// vpdpbusd: 16 lanes, each += 4 unsigned x signed byte products. The weights are q + 128, so a lane
// starts at -128 * sum(xq) of its block (XC) to end at sum(q * xq).
typedef __m512i i32x16;
static inline i32x16 start(int32_t xc) { return _mm512_set1_epi32(xc); }
static inline i32x16 loadw(const uint8_t* p) { return _mm512_loadu_si512(p); }
static inline i32x16 dp(i32x16 acc, i32x16 w, const int8_t* x4) {
  int32_t v;
  std::memcpy(&v, x4, 4);
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(v));
}
static inline f16v to_f(i32x16 v) { return (f16v)_mm512_cvtepi32_ps(v); }
static inline f16v fmav(f16v a, f16v b, f16v c) { return (f16v)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#elif defined(__AVX2__)
// llama.cpp's AVX2 way: |x| (unsigned) times q with x's sign (signed) in pairs of int16, then pairs of
// those into int32; the same sum(q * xq) per lane, so the same bits as the VNNI path
#include <immintrin.h>
struct i32x16 { __m256i lo, hi; };
static inline i32x16 start(int32_t) { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline i32x16 loadw(const uint8_t* p) {
  const __m256i flip = _mm256_set1_epi8((char)0x80);  // q + 128 back to q
  return {_mm256_xor_si256(_mm256_loadu_si256((const __m256i*)p), flip),
          _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + 32)), flip)};
}
static inline __m256i dp8(__m256i acc, __m256i q, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(q, x));  // |products| <= 2 * 127 * 127
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
static inline i32x16 dp(i32x16 acc, i32x16 w, const int8_t* x4) {
  int32_t v;
  std::memcpy(&v, x4, 4);
  const __m256i x = _mm256_set1_epi32(v);
  return {dp8(acc.lo, w.lo, x), dp8(acc.hi, w.hi, x)};
}
static inline f16v to_f(i32x16 v) {
  f16v f;
  _mm256_storeu_ps((float*)&f, _mm256_cvtepi32_ps(v.lo));
  _mm256_storeu_ps((float*)&f + 8, _mm256_cvtepi32_ps(v.hi));
  return f;
}
static inline f16v fmav(f16v a, f16v b, f16v c) { return a * b + c; }  // contracted to FMAs
#else  // portable: the same integer sums, lane by lane
typedef int32_t i32x16 __attribute__((vector_size(64)));
static inline i32x16 start(int32_t) { return (i32x16){}; }
static inline i32x16 loadw(const uint8_t* p) {
  i32x16 v;
  std::memcpy(&v, p, 64);
  return v;
}
static inline i32x16 dp(i32x16 acc, i32x16 w, const int8_t* x4) {
  uint8_t b[64];
  std::memcpy(b, &w, 64);
  for (int l = 0; l < 16; l++)
    for (int j = 0; j < 4; j++) acc[l] += (b[4 * l + j] - 128) * x4[j];
  return acc;
}
static inline f16v to_f(i32x16 v) { return __builtin_convertvector(v, f16v); }
static inline f16v fmav(f16v a, f16v b, f16v c) { return a * b + c; }  // contracted to an FMA where there is one
#endif

// R activation rows (m0 ..) by C groups of 16 outputs (g ..): accumulators in registers
template <int R, int C>
static void tile_q8p(const Q8PArgs& a, int64_t g, int64_t m0) {
  const int64_t QB = a.K / QK, K4 = a.K / 4;
  f16v accf[R][C] = {};
  for (int64_t b = 0; b < QB; b++) {
    i32x16 acc[R][C];
    for (int r = 0; r < R; r++)
      for (int c = 0; c < C; c++) acc[r][c] = start(a.XC[(m0 + r) * QB + b]);
    for (int k4 = 0; k4 < QK / 4; k4++) {
      i32x16 w[C];
      for (int c = 0; c < C; c++) w[c] = loadw(a.W + ((g + c) * K4 + b * (QK / 4) + k4) * 64);
      for (int r = 0; r < R; r++) {
        const int8_t* x4 = a.XQ + (m0 + r) * a.K + b * QK + 4 * k4;
        for (int c = 0; c < C; c++) acc[r][c] = dp(acc[r][c], w[c], x4);
      }
    }
    f16v ws[C];
    for (int c = 0; c < C; c++) ws[c] = load16(a.S + ((g + c) * QB + b) * 16);
    for (int r = 0; r < R; r++) {
      const f16v xd = a.XD[(m0 + r) * QB + b] - (f16v){};
      for (int c = 0; c < C; c++) accf[r][c] = fmav(to_f(acc[r][c]) * xd, ws[c], accf[r][c]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int c = 0; c < C; c++) std::memcpy(a.Y + (m0 + r) * a.N + (g + c) * 16, &accf[r][c], 64);
}

template <int C>
static void rows_q8p(const Q8PArgs& a, int64_t M, int64_t g) {
  for (int64_t m0 = 0; m0 < M; m0 += 4) {
    switch (std::min<int64_t>(4, M - m0)) {
      case 1: tile_q8p<1, C>(a, g, m0); break;
      case 2: tile_q8p<2, C>(a, g, m0); break;
      case 3: tile_q8p<3, C>(a, g, m0); break;
      default: tile_q8p<4, C>(a, g, m0); break;
    }
  }
}

// x (M, K) float32, qp (G, K/4, 64) uint8, sp (G, K/32, 16) float32 -> (M, 16 G)
at::Tensor linear_q8(const at::Tensor& x, const at::Tensor& qp, const at::Tensor& sp) {
  const int64_t G = qp.size(0), K = 4 * qp.size(1), M = x.size(0), N = 16 * G, QB = K / QK;
  check_x(x, K);
  TORCH_CHECK(qp.dim() == 3 && qp.size(2) == 64 && qp.scalar_type() == at::kByte && qp.is_contiguous() && K % QK == 0,
              "qp must be contiguous uint8 (N/16, K/4, 64), K % 32 == 0");
  TORCH_CHECK(sp.scalar_type() == at::kFloat && sp.is_contiguous() && sp.numel() == G * QB * 16, "bad packed scales");
  XQ xq;
  quantize_rows(x.data_ptr<float>(), M, K, xq);
  at::Tensor y = at::empty({M, N}, x.options());
  const Q8PArgs a{xq.q.data(), xq.d.data(), xq.c.data(), qp.data_ptr<uint8_t>(), sp.data_ptr<float>(), y.data_ptr<float>(), K, N};
  // tasks of 2 groups (32 outputs); each runs every row over its groups while their weights are in cache
  at::parallel_for(0, (G + 1) / 2, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
      if (2 * t + 1 < G) rows_q8p<2>(a, M, 2 * t);
      else rows_q8p<1>(a, M, 2 * t);
    }
  });
  return y;
}

// e^x for 16 floats (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial for e^r, 2^n
// put in the exponent's bits): within 2 ulp of std::exp, and vectorised where std::exp is a call
// per float (scalar, that exp was a tenth of a 16-row step)
static inline f16v exp16(f16v x) {
  typedef int32_t i16v __attribute__((vector_size(64)));
  const f16v hi = 88.f - (f16v){}, lo = -87.3365447504019f - (f16v){};  // e^hi < FLT_MAX; e^lo a normal float
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const f16v shifted = x * 1.44269504088896341f + 12582912.f;  // 1.5 * 2^23: rounds x / ln2 to an integer n
  const f16v n = shifted - 12582912.f;
  const f16v r = x - n * 0.693359375f - n * -2.12194440e-4f;  // ln2 in two parts: r exact
  f16v p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const f16v er = p * r * r + r + 1.f;
  const i16v two_n = (__builtin_convertvector(n, i16v) + 127) << 23;  // 2^n as a float's bits
  f16v scale;
  std::memcpy(&scale, &two_n, 64);
  return er * scale;
}

// One decode step's attention over a paged KV cache, read in place.
// q (B, H, D) float32; k_pool, v_pool (num_blocks, KH, BS, D) float32 or float16 (a 16-bit cache: half
// the memory, as llama.cpp's default; converted to float32 as it is read); table (B, W) int64 block
// ids; lengths (B,) int64: keys each row attends to (its positions 0 .. lengths[b] - 1, the new
// token's included). Query head h reads kv head h / (H / KH) (GQA). Returns (B, H, D).
static inline f16v load16(const at::Half* p) {
#if defined(__AVX512F__)
  return (f16v)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
#else
  f16v v;
  for (int i = 0; i < 16; i++) v[i] = (float)p[i];
  return v;
#endif
}

// softmax in place over S scores padded to a multiple of 16 with -inf (their e^x, ~1e-38, is below
// a float's resolution of the sum, which is >= 1): 16 at a time, e^x vectorised
static void softmax_padded(float* sc, int64_t S) {
  const int64_t S16 = (S + 15) / 16 * 16;
  f16v mv = load16(sc);
  for (int64_t p = 16; p < S16; p += 16) {
    const f16v v = load16(sc + p);
    mv = v > mv ? v : mv;
  }
  float mx = mv[0];
  for (int i = 1; i < 16; i++) mx = std::max(mx, mv[i]);
  f16v sv = {};
  for (int64_t p = 0; p < S16; p += 16) {
    const f16v e = exp16(load16(sc + p) - mx);
    std::memcpy(sc + p, &e, 64);
    sv += e;
  }
  const float sum = hsum(sv);
  for (int64_t p = 0; p < S16; p += 16) {
    const f16v e = load16(sc + p) / sum;
    std::memcpy(sc + p, &e, 64);
  }
}

// out (D floats) = sum over p of sc[p] * v[p]: DV = D / 16 accumulators, a template argument so that
// they stay in registers (a runtime count put them in memory, each add waiting on the last store)
template <int DV, typename T>
static void weigh_values(const float* sc, int64_t S, const T* Vp, const int64_t* tb, int64_t KH, int64_t h, int64_t BS,
                         float* out) {
  constexpr int64_t D = 16 * DV;
  f16v acc[DV] = {};
  for (int64_t p = 0; p < S; p++) {
    const T* vr = Vp + ((tb[p / BS] * KH + h) * BS + p % BS) * D;
    for (int d = 0; d < DV; d++) acc[d] += sc[p] * load16(vr + 16 * d);
  }
  std::memcpy(out, acc, D * sizeof(float));
}

template <typename T>
static void attend_rows(const float* Qp, int64_t QS, const T* Kp, const T* Vp, const int64_t* Tb, const int64_t* L,
                        float* Y, int64_t B, int64_t H, int64_t KH, int64_t BS, int64_t D, int64_t W, double scale) {
  const int64_t G = H / KH, DV = D / 16;
  // one task per (row, kv head): its G query heads share every key read
  at::parallel_for(0, B * KH, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> scores;
    for (int64_t t = t0; t < t1; t++) {
      const int64_t b = t / KH, h = t % KH, S = L[b], S16 = (S + 15) / 16 * 16;
      TORCH_CHECK(S >= 1 && S <= W * BS, "lengths out of the table's range");
      scores.assign(G * S16, -INFINITY);
      for (int64_t p = 0; p < S; p++) {
        const T* kr = Kp + ((Tb[b * W + p / BS] * KH + h) * BS + p % BS) * D;
        for (int64_t g = 0; g < G; g++) {
          const float* qr = Qp + b * QS + (h * G + g) * D;  // QS: floats from one row's queries to the next
          f16v acc = {};
          for (int64_t d = 0; d < DV; d++) acc += load16(qr + 16 * d) * load16(kr + 16 * d);
          scores[g * S16 + p] = hsum(acc) * (float)scale;
        }
      }
      for (int64_t g = 0; g < G; g++) {
        float* sc = scores.data() + g * S16;
        softmax_padded(sc, S);
        float* out = Y + (b * H + h * G + g) * D;
        switch (DV) {  // D <= 128
          case 1: weigh_values<1>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          case 2: weigh_values<2>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          case 3: weigh_values<3>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          case 4: weigh_values<4>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          case 5: weigh_values<5>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          case 6: weigh_values<6>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          case 7: weigh_values<7>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
          default: weigh_values<8>(sc, S, Vp, Tb + b * W, KH, h, BS, out); break;
        }
      }
    }
  });
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_pool, const at::Tensor& v_pool,
                           const at::Tensor& table, const at::Tensor& lengths, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be contiguous float32 (B, H, D)");
  const auto kind = k_pool.scalar_type();
  TORCH_CHECK(k_pool.is_contiguous() && v_pool.is_contiguous() && (kind == at::kFloat || kind == at::kHalf), "bad pools");
  TORCH_CHECK(table.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong, "table and lengths must be int64");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  TORCH_CHECK(k_pool.dim() == 4 && v_pool.sizes() == k_pool.sizes() && v_pool.scalar_type() == kind,
              "k_pool and v_pool must be float32 or float16 (num_blocks, KH, BS, D) of one shape and type");
  TORCH_CHECK(table.dim() == 2 && table.size(0) == B && lengths.numel() == B, "table and lengths need one row per q row");
  const int64_t NB = k_pool.size(0), KH = k_pool.size(1), BS = k_pool.size(2), W = table.size(1);
  TORCH_CHECK(k_pool.size(3) == D && D % 16 == 0 && H % KH == 0, "head dims do not match");
  TORCH_CHECK(H / KH <= 8 && D <= 128, "paged_attention supports up to 8 query heads per kv head and head_dim 128");
  at::Tensor tab = table.contiguous(), len = lengths.contiguous();
  at::Tensor y = at::empty({B, H, D}, q.options());
  const int64_t *T = tab.data_ptr<int64_t>(), *L = len.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * W; i++) TORCH_CHECK(T[i] >= 0 && T[i] < NB, "table: block id out of range");
  if (kind == at::kFloat)
    attend_rows(q.data_ptr<float>(), H * D, k_pool.data_ptr<float>(), v_pool.data_ptr<float>(), T, L,
                y.data_ptr<float>(), B, H, KH, BS, D, W, scale);
  else
    attend_rows(q.data_ptr<float>(), H * D, k_pool.data_ptr<at::Half>(), v_pool.data_ptr<at::Half>(), T, L,
                y.data_ptr<float>(), B, H, KH, BS, D, W, scale);
  return y;
}

// ---- a whole decode step: every layer in one call ---------------------------------------------
// The step of a Llama block, for B rows of one new token each, over the paged KV cache:
//   h = rmsnorm(x) * attn_norm;  q, k, v = h @ wqkv.T;  RoPE on q, k;  k, v into the pool;
//   x += attention(q, pool) @ wo.T;  h = rmsnorm(x) * ffn_norm;  x += (silu(g) * u) @ w_down.T
// with [g; u] = h @ w_gate_up.T. The same operations as the model's forward (model.py) in the same
// order, without PyTorch's per-op dispatch: a 30-layer step ran ~300 small ops, whose fixed costs
// (or a compiled graph's guards and kernel launches) came to ~25% of a one-row step at 8 bits.
//
// weights: per layer [attn_norm, wqkv..., wo..., ffn_norm, w_gate_up..., w_down...], a linear's
// tensors by its kind in layout: 8 ints per layer, (kind, out features) of wqkv, wo, w_gate_up,
// w_down; kind 0 float32 w (N, K), 1 Q8_0 packed (qp, sp), 2 Q4_1 (q, scales, mins).
// cos, sin (B, D): each row's RoPE angles; k_pools, v_pools per layer as paged_attention's, written
// at each row's slot lengths[b] (table[b, lengths[b] / BS]). Returns the new x (B, C).

static at::Tensor linear_of(const at::Tensor& x, at::TensorList w, size_t& i, int64_t kind, int64_t n) {
  TORCH_CHECK(kind >= 0 && kind <= 2 && i + kind < w.size(), "layout: a kind 0, 1 or 2, and its tensors");
  at::Tensor y = kind == 0 ? linear_f32(x, w[i]) : kind == 1 ? linear_q8(x, w[i], w[i + 1]) : linear_q4(x, w[i], w[i + 1], w[i + 2]);
  i += kind + 1;  // tensors per kind: 1, 2, 3
  TORCH_CHECK(y.size(1) >= n, "layout: a linear has fewer outputs than its layout says");
  return y.size(1) == n ? y : y.narrow(1, 0, n).contiguous();  // Q8_0 packs outputs in 16s
}

// out = x / rms(x) * w, row by row; rms over C in float32, as RMSNorm.forward
static void rmsnorm(const float* X, const float* Wn, float* Out, int64_t B, int64_t C, double eps) {
  for (int64_t b = 0; b < B; b++) {
    const float* xr = X + b * C;
    float ss = 0.f;
    for (int64_t c = 0; c < C; c++) ss += xr[c] * xr[c];
    const float r = 1.f / std::sqrt(ss / (float)C + (float)eps);
    for (int64_t c = 0; c < C; c++) Out[b * C + c] = xr[c] * r * Wn[c];
  }
}

template <typename T>
static void store_kv(const float* src, T* dst, int64_t D) {
  for (int64_t d = 0; d < D; d++) dst[d] = (T)src[d];  // a float16 pool rounds to nearest even here
}

at::Tensor decode_layers(const at::Tensor& x0, at::TensorList w, at::IntArrayRef layout, const at::Tensor& cos,
                         const at::Tensor& sin, at::TensorList k_pools, at::TensorList v_pools,
                         const at::Tensor& table, const at::Tensor& lengths, int64_t H, double eps) {
  const int64_t B = x0.size(0), C = x0.size(1), NL = (int64_t)k_pools.size();
  TORCH_CHECK(x0.dim() == 2 && x0.scalar_type() == at::kFloat, "x must be float32 (B, C)");
  TORCH_CHECK(NL > 0 && (int64_t)v_pools.size() == NL && (int64_t)layout.size() == 8 * NL, "one pool pair and 8 layout ints per layer");
  const auto kind = k_pools[0].scalar_type();
  const int64_t NB = k_pools[0].size(0), KH = k_pools[0].size(1), BS = k_pools[0].size(2), D = k_pools[0].size(3);
  const int64_t W = table.size(1), QKV = (H + 2 * KH) * D;
  TORCH_CHECK(kind == at::kFloat || kind == at::kHalf, "pools must be float32 or float16");
  TORCH_CHECK(H % KH == 0 && H / KH <= 8 && D % 16 == 0 && D <= 128, "heads: up to 8 query heads per kv head, head_dim <= 128");
  TORCH_CHECK(cos.sizes() == at::IntArrayRef({B, D}) && sin.sizes() == cos.sizes() && cos.scalar_type() == at::kFloat
              && cos.is_contiguous() && sin.is_contiguous(), "cos, sin must be contiguous float32 (B, D)");
  TORCH_CHECK(table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == B && table.is_contiguous()
              && lengths.scalar_type() == at::kLong && lengths.numel() == B && lengths.is_contiguous(), "bad table or lengths");
  const int64_t *Tb = table.data_ptr<int64_t>(), *Ln = lengths.data_ptr<int64_t>();
  std::vector<int64_t> seen(B);  // keys each row attends to: its past and the new token
  for (int64_t b = 0; b < B; b++) {
    TORCH_CHECK(Ln[b] >= 0 && Ln[b] < W * BS, "lengths: no slot for the new token in the table");
    for (int64_t j = 0; j < W; j++) TORCH_CHECK(Tb[b * W + j] >= 0 && Tb[b * W + j] < NB, "table: block id out of range");
    seen[b] = Ln[b] + 1;
  }
  const float *Cs = cos.data_ptr<float>(), *Sn = sin.data_ptr<float>();
  at::Tensor x = x0.contiguous().clone(), h = at::empty_like(x), y = at::empty({B, H * D}, x.options());
  float* X = x.data_ptr<float>();
  size_t i = 0;
  for (int64_t l = 0; l < NL; l++) {
    const at::Tensor &kp = k_pools[l], &vp = v_pools[l];
    TORCH_CHECK(kp.sizes() == k_pools[0].sizes() && vp.sizes() == kp.sizes() && kp.scalar_type() == kind
                && vp.scalar_type() == kind && kp.is_contiguous() && vp.is_contiguous(), "pools differ in shape or type");
    const int64_t* lay = layout.data() + 8 * l;
    TORCH_CHECK(w[i].numel() == C && w[i].scalar_type() == at::kFloat, "attn_norm: C float32 weights expected");
    rmsnorm(X, w[i++].data_ptr<float>(), h.data_ptr<float>(), B, C, eps);
    at::Tensor qkv = linear_of(h, w, i, lay[0], lay[1]);  // (B, (H + 2 KH) D)
    TORCH_CHECK(qkv.size(1) == QKV, "wqkv: (H + 2 KH) * D outputs expected");
    float* P = qkv.data_ptr<float>();
    for (int64_t b = 0; b < B; b++) {
      for (int64_t hd = 0; hd < H + KH; hd++) {  // RoPE, "rotate half": (x1, x2) -> (x1 c - x2 s, x2 c + x1 s)
        float* v = P + b * QKV + hd * D;
        const float *c = Cs + b * D, *s = Sn + b * D;
        for (int64_t d = 0; d < D / 2; d++) {
          const float x1 = v[d], x2 = v[d + D / 2];
          v[d] = x1 * c[d] + -x2 * s[d];
          v[d + D / 2] = x2 * c[d + D / 2] + x1 * s[d + D / 2];
        }
      }
      const int64_t pos = Ln[b], slot = (Tb[b * W + pos / BS] * KH) * BS + pos % BS;
      for (int64_t j = 0; j < KH; j++) {  // the new key and value into the row's slot
        const float *k = P + b * QKV + (H + j) * D, *v = P + b * QKV + (H + KH + j) * D;
        const int64_t at = (slot + j * BS) * D;
        if (kind == at::kFloat) store_kv(k, kp.data_ptr<float>() + at, D), store_kv(v, vp.data_ptr<float>() + at, D);
        else store_kv(k, kp.data_ptr<at::Half>() + at, D), store_kv(v, vp.data_ptr<at::Half>() + at, D);
      }
    }
    const double scale = 1.0 / std::sqrt((double)D);
    if (kind == at::kFloat)
      attend_rows(P, QKV, kp.data_ptr<float>(), vp.data_ptr<float>(), Tb, seen.data(), y.data_ptr<float>(), B, H, KH, BS, D, W, scale);
    else
      attend_rows(P, QKV, kp.data_ptr<at::Half>(), vp.data_ptr<at::Half>(), Tb, seen.data(), y.data_ptr<float>(), B, H, KH,
                  BS, D, W, scale);
    at::Tensor o = linear_of(y, w, i, lay[2], lay[3]);
    TORCH_CHECK(o.size(1) == C, "wo: C outputs expected");
    const float* O = o.data_ptr<float>();
    for (int64_t j = 0; j < B * C; j++) X[j] += O[j];
    TORCH_CHECK(w[i].numel() == C && w[i].scalar_type() == at::kFloat, "ffn_norm: C float32 weights expected");
    rmsnorm(X, w[i++].data_ptr<float>(), h.data_ptr<float>(), B, C, eps);
    at::Tensor gu = linear_of(h, w, i, lay[4], lay[5]);  // (B, 2F): [gate; up]
    const int64_t F = gu.size(1) / 2;
    at::Tensor a = at::empty({B, F}, x.options());
    const float* GU = gu.data_ptr<float>();
    float* A = a.data_ptr<float>();
    TORCH_CHECK(F % 16 == 0, "w_gate_up: 2 F outputs, F a multiple of 16");
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {  // silu(g) * u, 16 features at a time
      for (int64_t b = b0; b < b1; b++)
        for (int64_t f = 0; f < F; f += 16) {
          const f16v g = load16(GU + b * 2 * F + f), u = load16(GU + b * 2 * F + F + f);
          const f16v y = g / (1.f + exp16(-g)) * u;
          std::memcpy(A + b * F + f, &y, 64);
        }
    });
    at::Tensor dn = linear_of(a, w, i, lay[6], lay[7]);
    TORCH_CHECK(dn.size(1) == C, "w_down: C outputs expected");
    const float* DN = dn.data_ptr<float>();
    for (int64_t j = 0; j < B * C; j++) X[j] += DN[j];
  }
  TORCH_CHECK(i == w.size(), "weights: more tensors than the layout reads");
  return x;
}

TORCH_LIBRARY(modernlm, m) {
  m.def("linear_f32(Tensor x, Tensor w) -> Tensor");
  m.def("linear_q8(Tensor x, Tensor qp, Tensor sp) -> Tensor");
  m.def("linear_q4(Tensor x, Tensor q, Tensor scales, Tensor mins) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor k_pool, Tensor v_pool, Tensor table, Tensor lengths, float scale) -> Tensor");
  m.def("decode_layers(Tensor x, Tensor[] weights, int[] layout, Tensor cos, Tensor sin, Tensor(a!)[] k_pools, "
        "Tensor(b!)[] v_pools, Tensor table, Tensor lengths, int n_head, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(modernlm, CPU, m) {
  m.impl("linear_f32", linear_f32);
  m.impl("linear_q8", linear_q8);
  m.impl("linear_q4", linear_q4);
  m.impl("paged_attention", paged_attention);
  m.impl("decode_layers", decode_layers);
}

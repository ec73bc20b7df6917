// One activation row times a 4-bit weight on x86 CPUs, an XLA FFI custom call (`gemma4_jax.kernels`).
//
// XLA:CPU reads 4-bit weights at ~12 GB/s: per weight element it unpacks, converts to float32 and multiplies.
// llama.cpp reads them at ~22 GB/s by quantizing the activation row to int8 once (per block of 32: scale
// amax / 127) and multiplying integers, 32 products per AVX2 instruction pair. This kernel does the same
// arithmetic, in a fixed order that `gemma4_jax.kernels.q4_matvec_reference` (pure JAX) reproduces bit for bit:
//   d_b = amax(x_b) * (1/127 rounded), x_b' = round_half_even(x_b * (1 / d_b)) (0 when d_b = 0);
//   row r, block b: 8 int32 lanes, lane l = sum of q x' over elements 4l..4l+3 of the block (exact);
//   acc_l += float(lane_l) * (scale_rb * d_b), blocks in order, no fused multiply-add;
//   y_r = ((acc0 + acc4) + (acc2 + acc6)) + ((acc1 + acc5) + (acc3 + acc7)).
// Codes are ggml's Q4_0 bytes (and the project's int4 codes, the same nibbles): per block of 32 elements 16
// bytes, element j in the low nibble of byte j and element j + 16 in its high nibble, q = nibble - 8.
// Rows are shared out in chunks over XLA's intra-op thread pool; the calling thread works too.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kBlock = 32;

#define GEMMA4_AVX2 __attribute__((target("avx2,fma,f16c")))

// x [k] -> int8 codes xq [k] and per-block scales dx [k / 32].
void QuantizeRow(const float* x, int64_t k, int8_t* xq, float* dx) {
  const float inv127 = 1.f / 127.f;
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    bool finite = true;
    for (int64_t j = 0; j < kBlock; ++j) {
      amax = std::max(amax, std::fabs(xb[j]));
      finite = finite && std::isfinite(xb[j]);
    }
    // A non-finite activation makes every output NaN (a NaN block scale), as a float product would.
    const float d = finite ? amax * inv127 : NAN;
    const float id = finite && d != 0.f ? 1.f / d : 0.f;
    dx[b] = d;
    for (int64_t j = 0; j < kBlock; ++j)
      xq[b * kBlock + j] = finite ? static_cast<int8_t>(std::nearbyint(xb[j] * id)) : 0;
  }
}

GEMMA4_AVX2 inline float BlockScale(uint16_t s) { return _cvtsh_ss(s); }
GEMMA4_AVX2 inline float BlockScale(float s) { return s; }

template <typename Scale>
GEMMA4_AVX2 float RowDot(const uint8_t* codes, const Scale* scales, const int8_t* xq, const float* dx, int64_t nb) {
  const __m256i low4 = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + b * 16));
    __m256i q = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);  // elements 0..15 | 16..31
    q = _mm256_sub_epi8(_mm256_and_si256(q, low4), eight);
    const __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + b * kBlock));
    // |q| x (y with q's sign): unsigned x signed byte products, pairs summed to int16 (|sum| <= 2032), then 4s
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(y, q));
    const __m256 lanes = _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, ones));
    const __m256 scale = _mm256_set1_ps(BlockScale(scales[b]) * dx[b]);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(lanes, scale));
  }
  const __m128 halves = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));  // l0+l4 .. l3+l7
  const __m128 pairs = _mm_add_ps(halves, _mm_movehl_ps(halves, halves));
  return _mm_cvtss_f32(_mm_add_ss(pairs, _mm_shuffle_ps(pairs, pairs, 1)));
}

template <typename Scale>
struct Job {
  const uint8_t* codes;
  const Scale* scales;
  float* y;
  int64_t rows, nb, rows_per_task;
  std::vector<int8_t> xq;
  std::vector<float> dx;
  std::atomic<int64_t> next{0}, done{0};

  GEMMA4_AVX2 void Work() {
    for (;;) {
      const int64_t start = next.fetch_add(rows_per_task, std::memory_order_relaxed);
      if (start >= rows) return;
      const int64_t end = std::min(rows, start + rows_per_task);
      for (int64_t r = start; r < end; ++r)
        y[r] = RowDot(codes + r * nb * 16, scales + r * nb, xq.data(), dx.data(), nb);
      done.fetch_add(end - start, std::memory_order_release);
    }
  }
};

template <ffi::DataType kScale, typename Scale>
ffi::Error Q4Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> codes,
                    ffi::Buffer<kScale> scales, ffi::ResultBuffer<ffi::F32> y) {
  const int64_t k = x.element_count(), rows = y->element_count();
  if (x.dimensions().size() != 1 || k % kBlock || codes.dimensions().size() != 2 || codes.dimensions()[0] != rows ||
      codes.dimensions()[1] * 2 != k || static_cast<int64_t>(scales.element_count()) != rows * (k / kBlock))
    return ffi::Error(ffi::ErrorCode::kInvalidArgument, "q4_matvec: x [K], codes [N, K/2], scales [N, K/32]");
  if (rows == 0) return ffi::Error::Success();
  auto job = std::make_shared<Job<Scale>>();
  job->codes = codes.typed_data();
  job->scales = reinterpret_cast<const Scale*>(scales.typed_data());
  job->y = y->typed_data();
  job->rows = rows;
  job->nb = k / kBlock;
  job->xq.resize(k);
  job->dx.resize(k / kBlock);
  QuantizeRow(x.typed_data(), k, job->xq.data(), job->dx.data());
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  job->rows_per_task = std::max<int64_t>(16, rows / (16 * threads));  // small tasks: threads finish together
  for (int64_t t = 1; t < threads && (t - 1) * job->rows_per_task < rows; ++t) pool.Schedule([job] { job->Work(); });
  job->Work();
  // Every row not yet done is held by a running helper (the caller took all unclaimed ones).
  while (job->done.load(std::memory_order_acquire) < rows) _mm_pause();
  return ffi::Error::Success();
}

}  // namespace

extern "C" {

// Whether this CPU runs the kernels (x86-64 with AVX2, FMA and F16C); the rest of this file is not called if not.
int gemma4_q4_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

}  // extern "C"

// One handler per block-scale type: Q4_0 has float16 scales, the project's int4 (block 32) float32 ones.
#define GEMMA4_Q4_MATVEC(name, kScale, Scale)                                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, (Q4Matvec<kScale, Scale>), ffi::Ffi::Bind()                    \
                                                                     .Ctx<ffi::ThreadPool>()         \
                                                                     .Arg<ffi::Buffer<ffi::F32>>()   \
                                                                     .Arg<ffi::Buffer<ffi::U8>>()    \
                                                                     .Arg<ffi::Buffer<kScale>>()     \
                                                                     .Ret<ffi::Buffer<ffi::F32>>())

GEMMA4_Q4_MATVEC(gemma4_q4_matvec_f16, ffi::F16, uint16_t);
GEMMA4_Q4_MATVEC(gemma4_q4_matvec_f32, ffi::F32, float);

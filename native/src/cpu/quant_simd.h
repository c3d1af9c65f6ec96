// The quantized GEMM of quant.h on 256-bit integer vectors, shared by quant_avx2.cpp (maddubs + madd) and
// quant_avx512vnni.cpp (vpdpbusd on ymm, AVX512_VNNI + VL). Include it INSIDE the file's
// `namespace vdiff::cpu { namespace {` (internal linkage, that file's -m flags; see kernels.h), after
// defining
//   __m256i dot32(__m256i w0, __m256i w1, __m256i a0, __m256i a1);
//       // int16 halves (elements 0..15 and 16..31): lane l = w0[2l]a0[2l] + w0[2l+1]a0[2l+1] + same of w1, a1
// It includes nothing itself.

constexpr int kTileRows = 4;  // rows of A per tile
constexpr int kTileCols = 2;  // weight rows (outputs) per tile

// The 32 weights of block b of a weight row as int16: elements 0..15 in w[0], 16..31 in w[1].
template <QType T>
inline void load_wblock(const uint8_t* row, int b, __m256i w[2]) {
  if constexpr (T == QType::Q8_0) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * b)));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 32 * b + 16)));
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 16 * b));
    const __m128i m = _mm_set1_epi8(0x0f);
    const __m256i eight = _mm256_set1_epi16(8);
    w[0] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(v, m)), eight);
    w[1] = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m)), eight);
  }
}

// ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)): the order quant.h specifies.
inline float hsum_q(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <QType T, int R, int C>
void qtile(int nblocks, const QMatA& A, int m0, const QMatB& B, int n0, float* Cout, int64_t ldc, bool accumulate) {
  __m256 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
  const uint8_t* wrow[C];
  const uint16_t* wscale[C];
  for (int c = 0; c < C; ++c) {
    wrow[c] = B.data + static_cast<int64_t>(n0 + c) * B.ld;
    wscale[c] = B.scales + static_cast<int64_t>(n0 + c) * B.ld_scales;
  }
  const int16_t* arow = A.q + static_cast<int64_t>(m0) * A.ld;
  const float* ascale = A.scales + static_cast<int64_t>(m0) * A.ld_scales;
  for (int b = 0; b < nblocks; ++b) {
    __m256i w[C][2];
    float dw[C];
    for (int c = 0; c < C; ++c) {
      load_wblock<T>(wrow[c], b, w[c]);
      dw[c] = _cvtsh_ss(wscale[c][b]);
    }
    for (int r = 0; r < R; ++r) {
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + r * A.ld + 32 * b));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(arow + r * A.ld + 32 * b + 16));
      const float sa = ascale[r * A.ld_scales + b];
      for (int c = 0; c < C; ++c) {
        const __m256 p = _mm256_cvtepi32_ps(dot32(w[c][0], w[c][1], a0, a1));
        acc[r][c] = _mm256_fmadd_ps(p, _mm256_set1_ps(sa * dw[c]), acc[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      const float v = hsum_q(acc[r][c]);
      float& out = Cout[static_cast<int64_t>(m0 + r) * ldc + n0 + c];
      out = accumulate ? out + v : v;
    }
}

template <QType T>
void qgemm_t(int M, int n0, int n1, int K, const QMatA& A, const QMatB& B, float* C, int64_t ldc, bool accumulate) {
  const int nblocks = K / kQBlock;
  using Tile = void (*)(int, const QMatA&, int, const QMatB&, int, float*, int64_t, bool);
  static constexpr Tile tiles[kTileRows][kTileCols] = {{qtile<T, 1, 1>, qtile<T, 1, 2>},
                                                       {qtile<T, 2, 1>, qtile<T, 2, 2>},
                                                       {qtile<T, 3, 1>, qtile<T, 3, 2>},
                                                       {qtile<T, 4, 1>, qtile<T, 4, 2>}};
  for (int n = n0; n < n1; n += kTileCols) {
    const int nc = n1 - n < kTileCols ? n1 - n : kTileCols;
    for (int m = 0; m < M; m += kTileRows) {
      const int mr = M - m < kTileRows ? M - m : kTileRows;
      tiles[mr - 1][nc - 1](nblocks, A, m, B, n, C, ldc, accumulate);
    }
  }
}

void qgemm(int M, int n0, int n1, int K, const QMatA& A, const QMatB& B, float* C, int64_t ldc, bool accumulate) {
  if (M <= 0 || n1 <= n0) return;
  if (B.type == QType::Q8_0) qgemm_t<QType::Q8_0>(M, n0, n1, K, A, B, C, ldc, accumulate);
  else qgemm_t<QType::Q4_0>(M, n0, n1, K, A, B, C, ldc, accumulate);
}

// Per row and block of 32: amax = max|x|, scale = amax / 32767, q = rne(x * (32767 / amax)).
void quantize_rows(int M, int K, const float* A, int64_t lda, int16_t* q, float* scales) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const int nblocks = K / kQBlock;
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < nblocks; ++b) {
      const float* x = A + static_cast<int64_t>(m) * lda + b * kQBlock;
      const __m256 x0 = _mm256_loadu_ps(x), x1 = _mm256_loadu_ps(x + 8), x2 = _mm256_loadu_ps(x + 16),
                   x3 = _mm256_loadu_ps(x + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(x0, absmask), _mm256_and_ps(x1, absmask)),
                                _mm256_max_ps(_mm256_and_ps(x2, absmask), _mm256_and_ps(x3, absmask)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
      const float amax = _mm_cvtss_f32(h);
      scales[static_cast<int64_t>(m) * nblocks + b] = amax / 32767.0f;
      const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(x0, inv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(x1, inv));
      const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(x2, inv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(x3, inv));
      // packs works per 128-bit lane: [i0 0..3, i1 0..3 | i0 4..7, i1 4..7]; the 64-bit permute restores order.
      int16_t* out = q + static_cast<int64_t>(m) * K + b * kQBlock;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xd8));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xd8));
    }
}

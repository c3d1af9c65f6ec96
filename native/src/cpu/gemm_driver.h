// The GEMM driver shared by the SIMD kernels (kernels_avx2.cpp, kernels_avx512.cpp and its avx512bf16 table):
// micro-kernel selection, the loops over k blocks, row blocks, column panels and row tiles, and the
// packed-panel entry points of the Kernels table, for each element format ("path") of the product.
//
// Include it once per ISA translation unit, INSIDE that file's `namespace vdiff::cpu { namespace {`, after
// the ISA's own pieces, so that everything here gets internal linkage and is compiled with that file's
// -m flags (the ODR note in kernels.h). It includes nothing itself. The including file defines:
//
//   constexpr int kMR, kNR, kKC, kLanes;  // rows per micro-tile, panel width, k block, f32 lanes per vector
//   constexpr bool kSplitThinTail;        // merge a 1..3-row remainder with the last full row tile
//   int min_int(int, int);
//   struct PanelMasks;                    // the lane masks of one panel's (possibly partial) width
//   PanelMasks panel_masks(int nv);       // for a panel of nv <= kNR valid columns
//   template <WType T> void pack_transposed(const void* W, int64_t ld, int n0, int nv, int k0, int kc, float* P);
//   template <WType T> void pack_k_major(const void* B, int64_t ld, int n0, int nv, int k0, int kc, float* P);
//       // P[k][j] = B(k0 + k, n0 + j) widened to f32 for k < kc, j < kNR; zero for j >= nv
//   template <int R, int NB> void micro_kernel(int kc, const float* A, int64_t lda, const float* P, float* C,
//                                              int64_t ldc, const PanelMasks& masks, bool load_c);
//       // C[0..R)[0..kLanes*NB) (masked) = (load_c ? C : 0) + A[0..R)[0..kc) . P[0..kc)[0..kLanes*NB),
//       // one FMA per k in ascending k.
//
// and, for the block-quantized weights of quant.h,
//   constexpr int kQuantMR;               // rows per micro-tile of the quantized path
//   int quant_k_block(QType);             // its k per block (a multiple of 32), asked once per format
//   constexpr bool kQ8Unsigned;           // the Q8_0 panels hold q + 128 (pack_quant_blocks)
//   void quantize_rows_isa(int M, int K, const float* A, int64_t lda, QBlockA* out);  // quantize_activations
//   template <QType T, int R, int NB> void quant_micro(int blocks, const QBlockA* A, int64_t lda,
//       const uint8_t* P, float* C, int64_t ldc, const PanelMasks& masks, bool load_c);
//       // C[0..R)[0..kLanes*NB) (masked) over `blocks` blocks of 32 k as quant.h specifies, the chain of each
//       // output starting from C when load_c or past the first block, else from 0.
//
// From those it builds the two paths every SIMD ISA runs (F32Path for f32 and f16 weights, Bf16Path for
// bf16 ones) and the Kernels entries gemm, gemm_scratch_floats, pack_panel and packed_panel_bytes over them.
// Bf16Path is Bf16FmaPath (bf16 widened to f32 panels) unless the file defines VDIFF_BF16_PAIR_PANELS to 1
// and with it
//   constexpr int kBf16PairMR;
//   template <int R, int NB> void bf16_pair_micro(int steps, const float* A, int64_t lda, const uint32_t* P,
//       float* C, int64_t ldc, const PanelMasks& masks, bool load_c);
//   void pack_bf16_pairs(const uint16_t* W, int64_t ld, int n0, int nv, int k0, int kc, uint32_t* P);
// for Bf16PairPath (the weight packed as bf16 pairs, its own size; see there).
// A path is a struct:
//
//   struct SomePath {
//     static constexpr int kMR;  // rows per micro-tile
//     using AT = ...;  // an element of A as the micro-kernel reads it
//     using PT = ...;  // an element of the packed panel P
//     static int k_block();         // k per block (even, so that k pairs never straddle two blocks)
//     static constexpr int kKStep;  // k per element of A and per row of P: 1, or 2 for bf16 pairs
//     static constexpr int kKPad;   // K is padded with zeros to a multiple of this (1, or 2 for bf16)
//     static constexpr bool kStagesA;  // A is converted per block into the scratch (else read in place)
//     // out[r * steps + s] = element s of row r of A's k block [k0, k0 + kc), steps = padded kc / kKStep.
//     static void stage(const float* A, int64_t lda, int rows, int kc, AT* out);
//     // P[s * kNR + j] = element s of column n0 + j of B's k block [k0, k0 + kc); zero for j >= nv and
//     // for the padding.
//     static void pack(const MatB& B, int n0, int nv, int k0, int kc, PT* P);
//     // The part of B that pack reads, to request into L2 ahead of it (source_of for a float B).
//     static L2Prefetch source(const MatB& B, int n0, int nv, int k0, int kc);
//     // C[0..R)[0..kLanes*NB) (masked) = (load_c ? C : 0) + A[0..R)[0..steps) . P[0..steps)[0..kLanes*NB).
//     template <int R, int NB>
//     static void micro(int steps, const AT* A, int64_t lda, const PT* P, float* C, int64_t ldc,
//                       const PanelMasks& masks, bool load_c);
//   };
//
// Every output is one chain in ascending k whatever the panel, k block or row tile, so the result does not
// depend on M, the thread split or the packing, and the ISAs agree bit for bit with each other.

static_assert(kNR % kLanes == 0, "a panel is a whole number of vectors");

template <class Path>
using MicroKernel = void (*)(int, const typename Path::AT*, int64_t, const typename Path::PT*, float*, int64_t,
                             const PanelMasks&, bool);

// The micro-kernel for R rows and nb vectors of columns (1 <= nb <= kNR / kLanes).
template <class Path, int R, int NB = 1>
constexpr MicroKernel<Path> micro_for(int nb) {
  if constexpr (NB == kNR / kLanes) return Path::template micro<R, NB>;
  else return nb == NB ? Path::template micro<R, NB> : micro_for<Path, R, NB + 1>(nb);
}

// The micro-kernel for `rows` rows (1 <= rows <= Path::kMR) and nb vectors of columns.
template <class Path, int R = 1>
MicroKernel<Path> select_micro(int rows, int nb) {
  if constexpr (R == Path::kMR) return micro_for<Path, R>(nb);
  else return rows == R ? micro_for<Path, R>(nb) : select_micro<Path, R + 1>(rows, nb);
}

// Row tiles of a block of M rows: kMR rows each. With kSplitThinTail, a remainder of 1 to 3 rows is merged
// with the last full tile and the two split evenly (32 rows: 6 6 6 6 4 4, not 6 6 6 6 6 2), as a thin tile
// wastes its loads of P. Each output is still one chain in ascending k, so the tiling does not change
// the result.
struct RowTiles {
  int m_full;        // rows in whole kMR tiles
  int tail_rows[2];  // the rows of up to two tail tiles after them (0: none)
};

template <int kMR>
RowTiles row_tiles(int M) {
  const int rest = M % kMR;
  const bool split = kSplitThinTail && rest > 0 && rest < 4 && M > kMR;
  return {split ? M - rest - kMR : M - rest, {split ? (kMR + rest + 1) / 2 : rest, split ? (kMR + rest) / 2 : 0}};
}

// A region to be brought into L2 while a panel's row tiles run: `rows` runs of `lines` 64-byte lines,
// `stride` bytes apart. It is requested a slice before each row tile: a burst of hundreds of prefetches
// overflows the core's queue of misses, and the ones past it are dropped.
struct L2Prefetch {
  const char* base = nullptr;
  int64_t stride = 0;
  int rows = 0;
  int lines = 0;
  // A second part per row, requested with it: a quantized weight's scales, which are stored apart.
  const char* base2 = nullptr;
  int64_t stride2 = 0;
  int lines2 = 0;

  // Slice `part` of `parts`.
  void issue(int part, int parts) const {
    const int per_row = lines + lines2;
    const int64_t total = static_cast<int64_t>(rows) * per_row;
    const int64_t begin = total * part / parts, end = total * (part + 1) / parts;
    if (begin >= end) return;
    int row = static_cast<int>(begin / per_row), line = static_cast<int>(begin % per_row);
    for (int64_t i = begin; i < end; ++i) {
      const char* p = line < lines ? base + row * stride + line * 64 : base2 + row * stride2 + (line - lines) * 64;
      _mm_prefetch(p, _MM_HINT_T1);
      if (++line == per_row) line = 0, ++row;
    }
  }
};

// The lines of bytes [p, p + n).
inline int lines_of(const void* p, size_t n) {
  const size_t first = reinterpret_cast<uintptr_t>(p) / 64, last = (reinterpret_cast<uintptr_t>(p) + n + 63) / 64;
  return static_cast<int>(last - first);
}

// What B packs into a panel of columns [n0, n0 + nv) over k in [k0, k0 + kc): a weight's nv rows of kc
// elements, or a k-major B's kc rows of nv elements.
L2Prefetch source_of(const MatB& B, int n0, int nv, int k0, int kc) {
  const size_t element = B.type == WType::F32 ? 4 : 2;
  const char* base = static_cast<const char*>(B.data);
  if (B.k_major) {
    const char* first = base + (static_cast<size_t>(k0) * B.ld + n0) * element;
    return {first, static_cast<int64_t>(B.ld * element), kc, lines_of(first, nv * element)};
  }
  const char* first = base + (static_cast<size_t>(n0) * B.ld + k0) * element;
  return {first, static_cast<int64_t>(B.ld * element), nv, lines_of(first, kc * element)};
}

// Requests into L1 the outputs of the row tile after this one (rows [m, min(m + count, rows))), which the
// micro-kernel loads first: they were last written a whole pass over the panels ago, so they come from L3.
inline void prefetch_c_rows(const float* C, int64_t ldc, int m, int rows, int count, int nb) {
  for (int r = m; r < rows && r < m + count; ++r)
    for (int v = 0; v < nb * kLanes; v += 16) _mm_prefetch(reinterpret_cast<const char*>(C + r * ldc + v), _MM_HINT_T0);
}

// C[rows of the block][panel] over one k block: the full tiles, then the tails; before each tile, a slice
// of the next panel's data is requested into L2.
template <class Path>
void panel_block(const RowTiles& tiles, int nb, const PanelMasks& masks, int steps, const typename Path::AT* A,
                 int64_t lda, const typename Path::PT* Pk, float* C, int64_t ldc, bool load_c, const L2Prefetch& next) {
  const MicroKernel<Path> full = select_micro<Path>(Path::kMR, nb);
  const int parts = tiles.m_full / Path::kMR + (tiles.tail_rows[0] > 0) + (tiles.tail_rows[1] > 0);
  int part = 0;
  const int rows = tiles.m_full + tiles.tail_rows[0] + tiles.tail_rows[1];
  for (int m = 0; m < tiles.m_full; m += Path::kMR) {
    next.issue(part++, parts);
    if (load_c) prefetch_c_rows(C, ldc, m + Path::kMR, rows, Path::kMR, nb);
    full(steps, A + m * lda, lda, Pk, C + m * ldc, ldc, masks, load_c);
  }
  for (int t = 0, m = tiles.m_full; t < 2 && tiles.tail_rows[t] > 0; m += tiles.tail_rows[t++]) {
    next.issue(part++, parts);
    if (load_c) prefetch_c_rows(C, ldc, m + tiles.tail_rows[t], rows, Path::kMR, nb);
    select_micro<Path>(tiles.tail_rows[t], nb)(steps, A + m * lda, lda, Pk, C + m * ldc, ldc, masks, load_c);
  }
}

// k padded as the path pads it, and the elements (rows of P, or elements of a row of A) it takes.
template <class Path>
constexpr int padded_k(int k) {
  return (k + Path::kKPad - 1) / Path::kKPad * Path::kKPad;
}
template <class Path>
constexpr int k_steps(int k) {
  return padded_k<Path>(k) / Path::kKStep;
}

// Rows of A per row block: the block's kMR-row slices of one k block (mc x k_block() floats) take at most half
// of the L2 cache the CPU reports, so they stay there while every panel of the call passes over them.
template <class Path>
int row_block_rows() {
  static const int rows = [] {
    const size_t budget = cache_sizes().l2_bytes / 2;
    const int r = static_cast<int>(budget / (sizeof(float) * Path::k_block())) / Path::kMR * Path::kMR;
    return r < Path::kMR ? Path::kMR : r;
  }();
  return rows;
}

// The scratch one gemm call of the path uses: a packed k block of one panel, then (when the path stages
// A) one row block of A's k block, each 64-byte aligned.
constexpr size_t aligned_floats(size_t bytes) { return (bytes + 63) / 64 * 16; }
template <class Path>
size_t panel_block_floats(int K) {
  return aligned_floats(sizeof(typename Path::PT) * k_steps<Path>(min_int(K, Path::k_block())) * kNR);
}
template <class Path>
size_t path_scratch_floats(int K) {
  const int kc = K > 0 ? min_int(K, Path::k_block()) : 1;
  size_t floats = panel_block_floats<Path>(kc);
  // A row block merged with a thin last one has up to kMR - 1 rows more than row_block_rows().
  if (Path::kStagesA)
    floats += aligned_floats(sizeof(typename Path::AT) * k_steps<Path>(kc) * (row_block_rows<Path>() + Path::kMR));
  return floats;
}

template <class Path>
size_t path_panel_bytes(int K) {
  return sizeof(typename Path::PT) * static_cast<size_t>(k_steps<Path>(K > 0 ? K : 1)) * kNR;
}

// Columns per chunk of gemm_path: C's rows over the chunk take at most half of L2, so that a k block finds
// the outputs the one before it left there (the micro-kernel loads each tile of C once per k block; over
// 12,288 columns they came from L3 and the Q8_0 GEMM ran at 50% of the peak instead of 60%). At least 8
// panels, since A's block is read again for each chunk.
inline int column_chunk(int M) {
  const size_t fit = cache_sizes().l2_bytes / 2 / (sizeof(float) * static_cast<size_t>(M > 0 ? M : 1));
  const int panels = static_cast<int>(fit / kNR);
  return kNR * (panels < 8 ? 8 : panels);
}

template <class Path>
void gemm_columns(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
                  bool accumulate, float* scratch, const typename Path::AT* staged, int64_t staged_ld);

// A staged whole (stage_rows): row m at staged + m * staged_ld elements; nullptr: A is staged here per
// block (or read in place). The columns go in chunks (column_chunk), each through all of K.
template <class Path>
void gemm_path(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
               bool accumulate, float* scratch, const typename Path::AT* staged = nullptr, int64_t staged_ld = 0) {
  const int chunk = column_chunk(M);
  for (int c0 = n0; c0 < n1; c0 += chunk)
    gemm_columns<Path>(M, c0, min_int(n1, c0 + chunk), K, A, lda, B, C, ldc, accumulate, scratch, staged, staged_ld);
}

template <class Path>
void gemm_columns(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
                  bool accumulate, float* scratch, const typename Path::AT* staged, int64_t staged_ld) {
  using AT = typename Path::AT;
  using PT = typename Path::PT;
  // K blocks outermost, then blocks of rows sized to L2, then the panels. The block of A a panel reads
  // (mc rows x kc) is the same for every panel of the range, so it is read from memory (and, for a path
  // that stages A, converted) once per k block rather than once per panel; each panel's block of P stays
  // in L1 while the row tiles pass over it. P is the weight packed at load (MatB::packed), or else this
  // block packed here into the scratch (again for each row block: a pack costs 1/mc of the block's products).
  const int mc = row_block_rows<Path>();
  PT* const pack_buffer = reinterpret_cast<PT*>(scratch);
  AT* const stage_buffer = reinterpret_cast<AT*>(scratch + panel_block_floats<Path>(K));
  const size_t panel_bytes = path_panel_bytes<Path>(K);
  const int k_block = Path::k_block();
  for (int k0 = 0; k0 < K; k0 += k_block) {
    const int kc = min_int(k_block, K - k0);
    const int steps = k_steps<Path>(kc);
    const bool load_c = accumulate || k0 > 0;
    for (int m0 = 0; m0 < M; m0 += mc) {
      const int rows = min_int(mc, M - m0);
      // A thin last block is merged with the one before it (its tiles would waste loads of P).
      const int block = M - m0 - rows < Path::kMR ? M - m0 : rows;
      const RowTiles tiles = row_tiles<Path::kMR>(block);
      const AT* Ab;
      int64_t ldab;
      if (staged != nullptr) {
        Ab = staged + static_cast<int64_t>(m0) * staged_ld + k0 / Path::kKStep;
        ldab = staged_ld;
      } else if constexpr (Path::kStagesA) {
        Path::stage(A + static_cast<int64_t>(m0) * lda + k0, lda, block, kc, stage_buffer);
        Ab = stage_buffer;
        ldab = steps;
      } else {
        Ab = A + static_cast<int64_t>(m0) * lda + k0;
        ldab = lda;
      }
      for (int np = n0; np < n1; np += kNR) {
        const int nv = min_int(kNR, n1 - np);
        const PT* Pk = pack_buffer;
        // The next block of B this loop reads (the next panel's, or after the last panel the first panel's
        // of the next k block): its packed P, or the part of B it packs from (read straight from a weight's
        // rows, that would otherwise arrive a few lines at a time, on demand: bench/cpu, the pack took 40%
        // of an llada-8b forward before).
        const bool last_panel = np + kNR >= n1;
        const int next_n0 = last_panel ? n0 : np + kNR, next_k0 = last_panel ? k0 + k_block : k0;
        const int next_nv = min_int(kNR, n1 - next_n0), next_kc = min_int(k_block, K - next_k0);
        L2Prefetch next;
        const bool has_next = next_kc > 0 && (!last_panel || m0 + block >= M);
        if (B.packed != nullptr) {
          const char* panel = static_cast<const char*>(B.packed) + static_cast<size_t>(np / kNR) * panel_bytes;
          Pk = reinterpret_cast<const PT*>(panel) + static_cast<int64_t>(k0 / Path::kKStep) * kNR;
          const char* next_panel =
              static_cast<const char*>(B.packed) + static_cast<size_t>(next_n0 / kNR) * panel_bytes;
          if (has_next)
            next = {next_panel + sizeof(PT) * (next_k0 / Path::kKStep) * kNR, 0, 1,
                    lines_of(next_panel, sizeof(PT) * k_steps<Path>(next_kc) * kNR)};
        } else {
          if (has_next) next = Path::source(B, next_n0, next_nv, next_k0, next_kc);
          Path::pack(B, np, nv, k0, kc, pack_buffer);
        }
        panel_block<Path>(tiles, (nv + kLanes - 1) / kLanes, panel_masks(nv), steps, Ab, ldab, Pk, C + m0 * ldc + np,
                          ldc, load_c, next);
      }
      m0 += block - rows;
    }
  }
}

// C = 0 (or left as it is when accumulating) for an empty K.
void gemm_empty_k(int M, int n0, int n1, float* C, int64_t ldc, bool accumulate) {
  if (accumulate) return;
  for (int m = 0; m < M; ++m)
    for (int n = n0; n < n1; ++n) C[static_cast<int64_t>(m) * ldc + n] = 0.0f;
}

// Sets FTZ and DAZ for the lifetime of the object (the bf16 dot product's treatment of denormals, for
// the paths that compute it with FMAs), and restores the caller's MXCSR after.
class FlushDenormals {
 public:
  FlushDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ | 0x8040u); }
  ~FlushDenormals() { _mm_setcsr(saved_); }
  FlushDenormals(const FlushDenormals&) = delete;
  FlushDenormals& operator=(const FlushDenormals&) = delete;

 private:
  unsigned saved_;
};

// ------------------------------------------------------------------------------------------------
// The two paths of every SIMD ISA, and the Kernels entries over them.

// B's k block widened to f32: P[k][j] = B(k0 + k, n0 + j) for k < kc, j < kNR; zero for j >= nv.
void pack_widened(const MatB& B, int n0, int nv, int k0, int kc, float* P) {
  if (B.k_major) {
    switch (B.type) {
      case WType::F32: return pack_k_major<WType::F32>(B.data, B.ld, n0, nv, k0, kc, P);
      case WType::BF16: return pack_k_major<WType::BF16>(B.data, B.ld, n0, nv, k0, kc, P);
      case WType::F16: return pack_k_major<WType::F16>(B.data, B.ld, n0, nv, k0, kc, P);
    }
  } else {
    switch (B.type) {
      case WType::F32: return pack_transposed<WType::F32>(B.data, B.ld, n0, nv, k0, kc, P);
      case WType::BF16: return pack_transposed<WType::BF16>(B.data, B.ld, n0, nv, k0, kc, P);
      case WType::F16: return pack_transposed<WType::F16>(B.data, B.ld, n0, nv, k0, kc, P);
    }
  }
}

// f32 and f16 weights: A read in place, B widened to f32, one FMA per k in ascending k.
struct F32Path {
  using AT = float;
  using PT = float;
  static constexpr int kMR = ::vdiff::cpu::kMR;
  static constexpr int kKC = ::vdiff::cpu::kKC;
  static constexpr int kKStep = 1, kKPad = 1;
  static constexpr bool kStagesA = false;
  static int k_block() { return kKC; }
  static void stage(const float*, int64_t, int, int, float*) {}
  static void pack(const MatB& B, int n0, int nv, int k0, int kc, float* P) { pack_widened(B, n0, nv, k0, kc, P); }
  static L2Prefetch source(const MatB& B, int n0, int nv, int k0, int kc) { return source_of(B, n0, nv, k0, kc); }
  template <int R, int NB>
  static void micro(int steps, const float* A, int64_t lda, const float* P, float* C, int64_t ldc,
                    const PanelMasks& masks, bool load_c) {
    micro_kernel<R, NB>(steps, A, lda, P, C, ldc, masks, load_c);
  }
};

// 8 floats rounded as round_to_bf16 (kernels.h) does, and widened back to f32.
inline __m256 round_bf16x8(__m256 v) {
  const __m256i x = _mm256_castps_si256(v);
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(x, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_and_si256(_mm256_add_epi32(x, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), high);
  const __m256i magnitude = _mm256_and_si256(x, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(magnitude, _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_and_si256(_mm256_or_si256(x, _mm256_set1_epi32(0x00400000)), high), nan);
  const __m256i denormal =
      _mm256_cmpeq_epi32(_mm256_and_si256(x, _mm256_set1_epi32(0x7f800000)), _mm256_setzero_si256());
  r = _mm256_blendv_epi8(r, _mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0x80000000u))), denormal);
  return _mm256_castsi256_ps(r);
}

// The lanes [0, n) of 8 (all when n >= 8).
inline __m256i first_lanes(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// bf16 weights on an ISA without vdpbf16ps: the bf16 dot product (kernels.h) computed with FMAs, by
// F32Path's micro-kernel. A is staged rounded to bf16 and B packed widened, both with the two k of each pair
// swapped (and an odd K padded with a zero pair member), so that the ascending FMA chain adds the odd
// product of each pair first, as vdpbf16ps does. The gemm runs it under FTZ and DAZ, vdpbf16ps's treatment
// of denormals.
struct Bf16FmaPath : F32Path {
  static constexpr int kKPad = 2;
  static constexpr bool kStagesA = true;
  static_assert(kKC % 2 == 0, "k pairs never straddle two blocks");

  static void stage(const float* A, int64_t lda, int rows, int kc, float* out) {
    const int steps = padded_k<Bf16FmaPath>(kc);
    for (int r = 0; r < rows; ++r) {
      const float* a = A + r * lda;
      float* o = out + static_cast<int64_t>(r) * steps;
      for (int k = 0; k < steps; k += 8) {
        // Lanes past kc load as zero: the padding of an odd kc.
        const __m256 v = kc - k >= 8 ? _mm256_loadu_ps(a + k) : _mm256_maskload_ps(a + k, first_lanes(kc - k));
        const __m256 swapped = _mm256_permute_ps(round_bf16x8(v), _MM_SHUFFLE(2, 3, 0, 1));
        if (steps - k >= 8) _mm256_storeu_ps(o + k, swapped);
        else _mm256_maskstore_ps(o + k, first_lanes(steps - k), swapped);
      }
    }
  }

  static void pack(const MatB& B, int n0, int nv, int k0, int kc, float* P) {
    pack_widened(B, n0, nv, k0, kc, P);
    const int steps = padded_k<Bf16FmaPath>(kc);
    if (steps > kc)
      for (int j = 0; j < kNR; j += 8) _mm256_store_ps(P + kc * kNR + j, _mm256_setzero_ps());
    for (int s = 0; s < steps; s += 2)
      for (int j = 0; j < kNR; j += 8) {
        float* even = P + s * kNR + j;
        const __m256 e = _mm256_load_ps(even), o = _mm256_load_ps(even + kNR);
        _mm256_store_ps(even, o);
        _mm256_store_ps(even + kNR, e);
      }
  }
};

#if VDIFF_BF16_PAIR_PANELS
// A row of A as Bf16PairPath reads it: per k pair, a[2s + 1] then a[2s], rounded to bf16 (Bf16FmaPath's
// staged row, whose bytes these are).
struct SwappedPair {
  float odd, even;
};

// bf16 weights on an ISA without vdpbf16ps, the same chain as Bf16FmaPath, but with the weight packed as
// bf16 pairs (P[s][j]: column j's k = 2s in the low half, 2s + 1 in the high half), widened in the
// micro-kernel: a panel is the weight's own size, so every bf16 matrix is packed at load in place of its
// mapped pages (CpuBackend::pack_weights), where f32 panels of a large model fit nowhere and were packed on
// every product. The ISA defines kBf16PairMR, bf16_pair_micro and pack_bf16_pairs.
struct Bf16PairPath {
  using AT = SwappedPair;
  using PT = uint32_t;
  static constexpr int kMR = kBf16PairMR;
  static constexpr int kKC = ::vdiff::cpu::kKC;
  static constexpr int kKStep = 2, kKPad = 2;
  static constexpr bool kStagesA = true;
  static_assert(kKC % 2 == 0, "k pairs never straddle two blocks");
  static int k_block() { return kKC; }

  static void stage(const float* A, int64_t lda, int rows, int kc, SwappedPair* out) {
    Bf16FmaPath::stage(A, lda, rows, kc, reinterpret_cast<float*>(out));
  }

  static L2Prefetch source(const MatB& B, int n0, int nv, int k0, int kc) { return source_of(B, n0, nv, k0, kc); }

  static void pack(const MatB& B, int n0, int nv, int k0, int kc, uint32_t* P) {
    const uint16_t* b = static_cast<const uint16_t*>(B.data);
    if (!B.k_major) return pack_bf16_pairs(b, B.ld, n0, nv, k0, kc, P);
    // A k-major B[K][N]: rows k0 + 2s and k0 + 2s + 1, interleaved.
    for (int s = 0; s < (kc + 1) / 2; ++s)
      for (int j = 0; j < kNR; ++j) {
        const int64_t at = static_cast<int64_t>(k0 + 2 * s) * B.ld + n0 + j;
        const uint32_t even = j < nv ? b[at] : 0, odd = j < nv && 2 * s + 1 < kc ? b[at + B.ld] : 0;
        P[s * kNR + j] = even | odd << 16;
      }
  }

  template <int R, int NB>
  static void micro(int steps, const SwappedPair* A, int64_t lda, const uint32_t* P, float* C, int64_t ldc,
                    const PanelMasks& masks, bool load_c) {
    bf16_pair_micro<R, NB>(steps, reinterpret_cast<const float*>(A), 2 * lda, P, C, ldc, masks, load_c);
  }
};
using Bf16Path = Bf16PairPath;
#else
using Bf16Path = Bf16FmaPath;
#endif

void gemm(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
          bool accumulate, float* scratch) {
  if (M <= 0 || n1 <= n0) return;
  if (K <= 0) return gemm_empty_k(M, n0, n1, C, ldc, accumulate);
  if (B.type == WType::BF16 && B.bf16_dot) {
    const FlushDenormals ftz_daz;
    gemm_path<Bf16Path>(M, n0, n1, K, A, lda, B, C, ldc, accumulate, scratch);
  } else {
    gemm_path<F32Path>(M, n0, n1, K, A, lda, B, C, ldc, accumulate, scratch);
  }
}

size_t gemm_scratch_floats(int K) {
  const size_t f = path_scratch_floats<F32Path>(K), b = path_scratch_floats<Bf16Path>(K);
  return f > b ? f : b;
}

// The bytes pack_panel writes for a panel of B: a bf16 B on the bf16 dot product's path, anything else
// (a bf16 B without it too) widened on the f32 path.
size_t packed_panel_bytes(const MatB& B, int K) {
  return B.type == WType::BF16 && B.bf16_dot ? path_panel_bytes<Bf16Path>(K) : path_panel_bytes<F32Path>(K);
}

void pack_panel(const MatB& B, int N, int K, int panel, void* out) {
  const int n0 = panel * kNR;
  if (B.type == WType::BF16 && B.bf16_dot)
    Bf16Path::pack(B, n0, min_int(kNR, N - n0), 0, K, static_cast<typename Bf16Path::PT*>(out));
  else F32Path::pack(B, n0, min_int(kNR, N - n0), 0, K, static_cast<float*>(out));
}

// Whole rows of A staged for a path (Kernels::stage_bf16_a): row m at out + m * staged_row_bytes<Path>(K).
template <class Path>
size_t staged_row_bytes(int K) {
  return (sizeof(typename Path::AT) * static_cast<size_t>(k_steps<Path>(K > 0 ? K : 1)) + 63) / 64 * 64;
}

template <class Path>
void stage_rows(int M, int K, const float* A, int64_t lda, void* out) {
  const size_t row_bytes = staged_row_bytes<Path>(K);
  for (int m = 0; m < M; ++m)
    Path::stage(A + static_cast<int64_t>(m) * lda, lda, 1, K,
                reinterpret_cast<typename Path::AT*>(static_cast<char*>(out) + m * row_bytes));
}

template <class Path>
void gemm_staged_path(int M, int n0, int n1, int K, const void* As, const MatB& B, float* C, int64_t ldc,
                      bool accumulate, float* scratch) {
  if (M <= 0 || n1 <= n0) return;
  if (K <= 0) return gemm_empty_k(M, n0, n1, C, ldc, accumulate);
  gemm_path<Path>(M, n0, n1, K, nullptr, 0, B, C, ldc, accumulate, scratch, static_cast<const typename Path::AT*>(As),
                  static_cast<int64_t>(staged_row_bytes<Path>(K) / sizeof(typename Path::AT)));
}

// ------------------------------------------------------------------------------------------------
// Block-quantized weights (quant.h): A staged as QBlockA (one per 32 k), one step of the driver per block
// of 32 k. B is the weight packed at load (pack_quant_panel_blocks), or else packed here per k block: then
// MatB::data points to the QMatB (the MoE experts, which stay mapped: only the routed ones are read).

// pack_quant_blocks (quant.h) for a panel of kNR columns on 128-bit registers, the same bytes (an f16 NaN
// scale aside, which F16C makes quiet): per 4 columns and 16 bytes of their blocks, a 4 x 4 transpose of
// dwords (4 groups of 4 k of each column into 4 columns per group), and their scales 8 blocks at a time.
// The MoE experts are packed this way per product, straight from the mapped weights: 4 columns at a time
// through all their blocks, the next 4 columns' lines requested meanwhile. bench/moe (llada2-mini, Q4_0,
// batch 1, Zen 4): 418-497 ms per denoising step with the byte-at-a-time pack, 248-294 ms with this one
// (289-331 ms while the scales were still converted one at a time in software).
template <QType T>
void pack_quant_panel_blocks(const QMatB& B, int N, int n0, int b0, int nb, void* out) {
  constexpr int qbytes = qblock_bytes(T);
  constexpr size_t block_stride = static_cast<size_t>(kNR) * qpacked_column_bytes(T);
  static_assert(kNR % 4 == 0 && qbytes % 16 == 0, "whole 4 x 4 dword transposes");
  const __m128i flip = _mm_set1_epi8(static_cast<char>(T == QType::Q8_0 && kQ8Unsigned ? 0x80 : 0x00));
  const __m128i lowest = _mm_set1_epi8(-127);
  uint8_t* o = static_cast<uint8_t*>(out);
  const int64_t span = static_cast<int64_t>(nb) * qbytes;  // the bytes of one column this reads
  const auto row_of = [&](int n) {
    return B.data + static_cast<int64_t>(n) * B.ld + static_cast<int64_t>(b0) * qbytes;
  };
  for (int c = 0; c < kNR; c += 4) {
    for (int i = 0; i < 4; ++i) {
      const int next = n0 + c + 4 + i;
      if (next >= N || c + 4 >= kNR) break;
      for (int64_t line = 0; line < span; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(row_of(next) + line), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(B.scales + static_cast<int64_t>(next) * B.ld_scales + b0),
                   _MM_HINT_T0);
    }
    const uint8_t* row[4];
    const uint16_t* scale_row[4];
    for (int i = 0; i < 4; ++i) {
      const bool present = n0 + c + i < N;
      row[i] = present ? row_of(n0 + c + i) : nullptr;
      scale_row[i] = present ? B.scales + static_cast<int64_t>(n0 + c + i) * B.ld_scales + b0 : nullptr;
    }
    // The scales 8 blocks at a time on F16C (exact, as f16_to_f32; an f16 NaN comes out quiet).
    alignas(32) float scale[4][8];
    for (int b = 0; b < nb; ++b) {
      if (b % 8 == 0)
        for (int i = 0; i < 4; ++i) {
          if (!scale_row[i]) {
            _mm256_store_ps(scale[i], _mm256_setzero_ps());
          } else if (nb - b >= 8) {
            _mm256_store_ps(scale[i],
                            _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale_row[i] + b))));
          } else {
            for (int j = 0; j < nb - b; ++j) scale[i][j] = f16_to_f32(scale_row[i][b + j]);
          }
        }
      uint8_t* ob = o + b * block_stride;
      float* scales = reinterpret_cast<float*>(ob + static_cast<size_t>(kNR) * qbytes);
      for (int i = 0; i < 4; ++i) scales[c + i] = scale[i][b % 8];
      for (int h = 0; h < qbytes / 16; ++h) {
        __m128i r[4];
        for (int i = 0; i < 4; ++i) {
          r[i] = row[i] ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(row[i] + b * qbytes + 16 * h))
                        : _mm_setzero_si128();
          // A Q8_0 byte as q8_value reads it (-128 as -127), then the unsigned form the kernel multiplies.
          if (T == QType::Q8_0 && row[i]) r[i] = _mm_xor_si128(_mm_max_epi8(r[i], lowest), flip);
        }
        const __m128i t0 = _mm_unpacklo_epi32(r[0], r[1]), t1 = _mm_unpacklo_epi32(r[2], r[3]);
        const __m128i t2 = _mm_unpackhi_epi32(r[0], r[1]), t3 = _mm_unpackhi_epi32(r[2], r[3]);
        const __m128i g[4] = {_mm_unpacklo_epi64(t0, t1), _mm_unpackhi_epi64(t0, t1), _mm_unpacklo_epi64(t2, t3),
                              _mm_unpackhi_epi64(t2, t3)};
        for (int j = 0; j < 4; ++j)
          _mm_storeu_si128(reinterpret_cast<__m128i*>(ob + (static_cast<size_t>(4 * h + j) * kNR + c) * 4), g[j]);
      }
    }
  }
}

template <QType T>
struct QuantPath {
  using AT = QBlockA;
  struct PT {
    uint8_t bytes[qpacked_column_bytes(T)];
  };
  static constexpr int kMR = kQuantMR;
  static constexpr int kKStep = kQBlock, kKPad = kQBlock;
  static constexpr bool kStagesA = true;
  static int k_block() {
    static const int kc = quant_k_block(T);  // a multiple of kQBlock: a k block is whole quantization blocks
    return kc;
  }
  static_assert(sizeof(PT) * kNR % 64 == 0, "each block of a panel starts on a cache line");

  static const QMatB& weight(const MatB& B) { return *static_cast<const QMatB*>(B.data); }
  static void stage(const float* A, int64_t lda, int rows, int kc, QBlockA* out) {
    quantize_rows_isa(rows, kc, A, lda, out);
  }
  static void pack(const MatB& B, int n0, int nv, int k0, int kc, PT* P) {
    pack_quant_panel_blocks<T>(weight(B), n0 + nv, n0, k0 / kQBlock, kc / kQBlock, P);
  }
  static L2Prefetch source(const MatB& B, int n0, int nv, int k0, int kc) {
    const QMatB& q = weight(B);
    const uint8_t* first =
        q.data + static_cast<int64_t>(n0) * q.ld + static_cast<int64_t>(k0 / kQBlock) * qblock_bytes(T);
    const uint16_t* scales = q.scales + static_cast<int64_t>(n0) * q.ld_scales + k0 / kQBlock;
    return {reinterpret_cast<const char*>(first),
            q.ld,
            nv,
            lines_of(first, kc / kQBlock * qblock_bytes(T)),
            reinterpret_cast<const char*>(scales),
            q.ld_scales * static_cast<int64_t>(sizeof(uint16_t)),
            lines_of(scales, kc / kQBlock * sizeof(uint16_t))};
  }
  template <int R, int NB>
  static void micro(int steps, const QBlockA* A, int64_t lda, const PT* P, float* C, int64_t ldc,
                    const PanelMasks& masks, bool load_c) {
    quant_micro<T, R, NB>(steps, A, lda, reinterpret_cast<const uint8_t*>(P), C, ldc, masks, load_c);
  }
};

void quant_gemm(int M, int n0, int n1, int K, const QBlockA* A, const QMatB& B, float* C, int64_t ldc, bool accumulate,
                float* scratch) {
  if (M <= 0 || n1 <= n0) return;
  if (K <= 0) return gemm_empty_k(M, n0, n1, C, ldc, accumulate);
  MatB b;
  b.data = &B;
  b.packed = B.packed;
  if (B.type == QType::Q8_0)
    gemm_path<QuantPath<QType::Q8_0>>(M, n0, n1, K, nullptr, 0, b, C, ldc, accumulate, scratch, A, K / kQBlock);
  else gemm_path<QuantPath<QType::Q4_0>>(M, n0, n1, K, nullptr, 0, b, C, ldc, accumulate, scratch, A, K / kQBlock);
}

size_t quant_gemm_scratch_floats(int K) {
  const size_t a = path_scratch_floats<QuantPath<QType::Q8_0>>(K), b = path_scratch_floats<QuantPath<QType::Q4_0>>(K);
  return a > b ? a : b;
}

size_t quant_packed_panel_bytes(int K, QType type) {
  return type == QType::Q8_0 ? path_panel_bytes<QuantPath<QType::Q8_0>>(K)
                             : path_panel_bytes<QuantPath<QType::Q4_0>>(K);
}

void quant_pack_panel(const QMatB& B, int N, int K, int panel, void* out) {
  if (B.type == QType::Q8_0) pack_quant_panel_blocks<QType::Q8_0>(B, N, panel * kNR, 0, K / kQBlock, out);
  else pack_quant_panel_blocks<QType::Q4_0>(B, N, panel * kNR, 0, K / kQBlock, out);
}

size_t bf16_a_row_bytes(int K) { return staged_row_bytes<Bf16Path>(K); }
void stage_bf16_a(int M, int K, const float* A, int64_t lda, void* out) { stage_rows<Bf16Path>(M, K, A, lda, out); }
void gemm_staged(int M, int n0, int n1, int K, const void* As, const MatB& B, float* C, int64_t ldc, bool accumulate,
                 float* scratch) {
  const FlushDenormals ftz_daz;
  gemm_staged_path<Bf16Path>(M, n0, n1, K, As, B, C, ldc, accumulate, scratch);
}

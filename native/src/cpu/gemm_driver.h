// The GEMM driver shared by the SIMD kernels (kernels_avx2.cpp, kernels_avx512.cpp): packing dispatch,
// micro-kernel selection, the loops over k blocks, row blocks, column panels and row tiles, and the packed-panel
// entry points of the Kernels table.
//
// Include it once per ISA translation unit, INSIDE that file's `namespace vdiff::cpu { namespace {`, after
// the ISA's own pieces, so that everything here gets internal linkage and is compiled with that file's
// -m flags (the ODR note in kernels.h). It includes nothing itself. The including file defines:
//
//   constexpr int kMR, kNR, kKC, kLanes;  // rows per micro-tile, panel width, k block, f32 lanes per vector
//   constexpr bool kSplitThinTail;         // merge a 1..3-row remainder with the last full row tile
//   int min_int(int, int);
//   struct PanelMasks;                     // the lane masks of one panel's (possibly partial) width
//   PanelMasks panel_masks(int nv);        // for a panel of nv <= kNR valid columns
//   template <WType T> void pack_transposed(const void* W, int64_t ld, int n0, int nv, int k0, int kc, float* P);
//   template <WType T> void pack_k_major(const void* B, int64_t ld, int n0, int nv, int k0, int kc, float* P);
//   template <int R, int NB> void micro_kernel(int kc, const float* A, int64_t lda, const float* P, float* C,
//                                              int64_t ldc, const PanelMasks& masks, bool load_c);
//       // C[0..R)[0..kLanes*NB) (masked) = (load_c ? C : 0) + A[0..R)[0..kc) · P[0..kc)[0..kLanes*NB),
//       // one FMA per k in ascending k.
//
// Every output is one FMA chain in ascending k whatever the panel, k block or row tile, so the ISAs agree
// bit for bit with each other and the result does not depend on M, the thread split or the packing.

static_assert(kNR % kLanes == 0, "a panel is a whole number of vectors");

// P[k][j] = B(k0 + k, n0 + j) for k < kc, j < kNR, as f32; zero for j >= nv.
void pack(const MatB& B, int n0, int nv, int k0, int kc, float* P) {
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

using MicroKernel = void (*)(int, const float*, int64_t, const float*, float*, int64_t, const PanelMasks&, bool);

// The micro-kernel for R rows and nb vectors of columns (1 <= nb <= kNR / kLanes).
template <int R, int NB = 1>
constexpr MicroKernel micro_for(int nb) {
  if constexpr (NB == kNR / kLanes) return micro_kernel<R, NB>;
  else return nb == NB ? micro_kernel<R, NB> : micro_for<R, NB + 1>(nb);
}

// The micro-kernel for `rows` rows (1 <= rows <= kMR) and nb vectors of columns.
template <int R = 1>
MicroKernel select_micro(int rows, int nb) {
  if constexpr (R == kMR) return micro_for<R>(nb);
  else return rows == R ? micro_for<R>(nb) : select_micro<R + 1>(rows, nb);
}

// Row tiles of a block of M rows: kMR rows each. With kSplitThinTail, a remainder of 1 to 3 rows is merged
// with the last full tile and the two split evenly (32 rows: 6 6 6 6 4 4, not 6 6 6 6 6 2), as a thin tile
// wastes its loads of P. Each output is still one FMA chain in ascending k, so the tiling does not change
// the result.
struct RowTiles {
  int m_full;        // rows in whole kMR tiles
  int tail_rows[2];  // the rows of up to two tail tiles after them (0: none)
};

RowTiles row_tiles(int M) {
  const int rest = M % kMR;
  const bool split = kSplitThinTail && rest > 0 && rest < 4 && M > kMR;
  return {split ? M - rest - kMR : M - rest, {split ? (kMR + rest + 1) / 2 : rest, split ? (kMR + rest) / 2 : 0}};
}

// C[rows of the block][panel] over one k block: the full tiles, then the tails.
void panel_block(const RowTiles& tiles, int nb, const PanelMasks& masks, int kc, const float* A, int64_t lda,
                 const float* Pk, float* C, int64_t ldc, bool load_c) {
  const MicroKernel full = select_micro(kMR, nb);
  for (int m = 0; m < tiles.m_full; m += kMR) full(kc, A + m * lda, lda, Pk, C + m * ldc, ldc, masks, load_c);
  for (int t = 0, m = tiles.m_full; t < 2 && tiles.tail_rows[t] > 0; m += tiles.tail_rows[t++])
    select_micro(tiles.tail_rows[t], nb)(kc, A + m * lda, lda, Pk, C + m * ldc, ldc, masks, load_c);
}

// Asks for floats p[0 .. n) to be brought into L2, one request per 64-byte line.
void prefetch_l2(const float* p, int n) {
  for (int i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T1);
}

// Rows of A per row block: the block's kMR-row slices of one k block (mc x kKC floats) take at most half
// of the L2 cache the CPU reports, so they stay there while every panel of the call passes over them.
int row_block_rows() {
  static const int rows = [] {
    const size_t budget = cache_sizes().l2_bytes / 2;
    const int r = static_cast<int>(budget / (sizeof(float) * kKC)) / kMR * kMR;
    return r < kMR ? kMR : r;
  }();
  return rows;
}

void gemm(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
          bool accumulate, float* scratch) {
  if (M <= 0 || n1 <= n0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n) C[static_cast<int64_t>(m) * ldc + n] = 0.0f;
    return;
  }
  // K blocks outermost, then blocks of rows sized to L2, then the panels. The block of A a panel reads
  // (mc rows x kc) is the same for every panel of the range, so it is read from memory once per k block
  // rather than once per panel; each panel's kc x kNR block of P stays in L1 while the row tiles pass over
  // it. P is the weight packed at load (MatB::packed), or else this block packed here into the scratch
  // (again for each row block: a kc x kNR pack costs 1/mc of the block's products).
  const int mc = row_block_rows();
  for (int k0 = 0; k0 < K; k0 += kKC) {
    const int kc = min_int(kKC, K - k0);
    const bool load_c = accumulate || k0 > 0;
    for (int m0 = 0; m0 < M; m0 += mc) {
      const int rows = min_int(mc, M - m0);
      // A thin last block is merged with the one before it (its tiles would waste loads of P).
      const int block = M - m0 - rows < kMR ? M - m0 : rows;
      const RowTiles tiles = row_tiles(block);
      for (int np = n0; np < n1; np += kNR) {
        const int nv = min_int(kNR, n1 - np);
        const float* Pk = scratch;
        if (B.packed != nullptr) {
          Pk = B.packed + static_cast<int64_t>(np / kNR) * K * kNR + static_cast<int64_t>(k0) * kNR;
          // The next panel's block of P is requested into L2 now, while this one's row tiles run: its
          // first tile would otherwise wait on memory for every line of it.
          if (np + kNR < n1) prefetch_l2(Pk + static_cast<int64_t>(K) * kNR, kc * kNR);
        } else {
          pack(B, np, nv, k0, kc, scratch);
        }
        panel_block(tiles, (nv + kLanes - 1) / kLanes, panel_masks(nv), kc, A + m0 * lda + k0, lda, Pk,
                    C + m0 * ldc + np, ldc, load_c);
      }
      m0 += block - rows;
    }
  }
}

size_t gemm_scratch_floats(int K) { return static_cast<size_t>(K > 0 ? min_int(K, kKC) : 1) * kNR; }

void pack_panel(const MatB& B, int N, int K, int panel, float* out) {
  const int n0 = panel * kNR;
  pack(B, n0, min_int(kNR, N - n0), 0, K, out);
}

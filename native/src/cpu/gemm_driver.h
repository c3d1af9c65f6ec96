// The GEMM driver shared by the SIMD kernels (kernels_avx2.cpp, kernels_avx512.cpp): packing dispatch,
// micro-kernel selection, the loops over column panels, k blocks and row tiles, and the packed-panel
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

void gemm(int M, int n0, int n1, int K, const float* A, int64_t lda, const MatB& B, float* C, int64_t ldc,
          bool accumulate, float* scratch) {
  if (M <= 0 || n1 <= n0) return;
  if (K <= 0) {
    if (!accumulate)
      for (int m = 0; m < M; ++m)
        for (int n = n0; n < n1; ++n) C[static_cast<int64_t>(m) * ldc + n] = 0.0f;
    return;
  }
  // Row tiles: kMR rows each. With kSplitThinTail, a remainder of 1 to 3 rows is merged with the last full
  // tile and the two split evenly (32 rows: 6 6 6 6 4 4, not 6 6 6 6 6 2), as a thin tile wastes its loads
  // of P. Each output is still one FMA chain in ascending k, so the tiling does not change the result.
  const int rest = M % kMR;
  const bool split = kSplitThinTail && rest > 0 && rest < 4 && M > kMR;
  const int m_full = split ? M - rest - kMR : M - rest;  // rows in whole kMR tiles
  const int tail_rows[2] = {split ? (kMR + rest + 1) / 2 : rest, split ? (kMR + rest) / 2 : 0};
  for (int np = n0; np < n1; np += kNR) {
    const int nv = min_int(kNR, n1 - np);
    const int nb = (nv + kLanes - 1) / kLanes;
    const PanelMasks masks = panel_masks(nv);
    const MicroKernel full = select_micro(kMR, nb);
    const MicroKernel tails[2] = {tail_rows[0] ? select_micro(tail_rows[0], nb) : nullptr,
                                  tail_rows[1] ? select_micro(tail_rows[1], nb) : nullptr};
    const float* P = B.packed != nullptr ? B.packed + static_cast<int64_t>(np / kNR) * K * kNR : scratch;
    if (B.packed == nullptr) pack(B, np, nv, 0, K, scratch);
    for (int k0 = 0; k0 < K; k0 += kKC) {
      const int kc = min_int(kKC, K - k0);
      const float* Pk = P + static_cast<int64_t>(k0) * kNR;
      const bool load_c = accumulate || k0 > 0;
      for (int m = 0; m < m_full; m += kMR) full(kc, A + m * lda + k0, lda, Pk, C + m * ldc + np, ldc, masks, load_c);
      for (int t = 0, m = m_full; t < 2 && tails[t] != nullptr; m += tail_rows[t++])
        tails[t](kc, A + m * lda + k0, lda, Pk, C + m * ldc + np, ldc, masks, load_c);
    }
  }
}

size_t gemm_scratch_floats(int K) { return static_cast<size_t>(K > 0 ? K : 1) * kNR; }

void pack_panel(const MatB& B, int N, int K, int panel, float* out) {
  const int n0 = panel * kNR;
  pack(B, n0, min_int(kNR, N - n0), 0, K, out);
}

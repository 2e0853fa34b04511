// tcc's sparse CPU kernels: block-sparse dense (BSR weights) and the expansion of a compressed
// (bitmask + nonzero values) tensor, called from TVM modules like cpu_kernels.cc (x86-64, aarch64).
//
// Contract: row-major contiguous CPU tensors, the result written into the last argument
// (destination-passing style, as R.call_dps_packed calls it). sparse_layout.py builds the inputs
// (to_bsr, compress) and documents the layouts. Every argument's dtype, rank and shape is checked,
// and so are the indices (row_ptr monotone from 0 to nnzb, col_idx in range), so a bad layout is a
// ValueError/TypeError through TVM-FFI naming the kernel and the argument, never a stray read.
//
//   tcc_dense_bsr_f32(x[..., K], values[nnzb, r, c], col_idx int32[nnzb], row_ptr int32[N/r + 1],
//                     b[N], out[..., N])          out = x W^T + b, W [N, K] in blocks of r x c
//   tcc_dense_bsr_nobias_f32(x, values, col_idx, row_ptr, out)
//   tcc_unmask(values[nnz], mask uint8[ceil(numel / 8)], out[...])   float32, int8 or uint8
//
// dense_bsr: block row q (output channels q r .. q r + r - 1) holds the blocks row_ptr[q] ..
// row_ptr[q + 1] - 1; block t covers input columns col_idx[t] c .. col_idx[t] c + c - 1 and
// values[t, i, j] = W[q r + i, col_idx[t] c + j]. Any r | N and c | K; an empty block row gives b.
// The summation order differs from a dense GEMM: results agree with the dense reference within fp32
// rounding of the sum of |x w| (the zero blocks contribute exact zeros).
//   M >= kTransposeRows (prefill): x is transposed once per call into xt [K][M] (M padded with zeros
//     to the vector width; slices of M when K M is large), so a block column's input is contiguous
//     over M. A register tile of R block rows x MV vectors over M accumulates a block row's blocks:
//     per block column j, MV vector loads of xt, R weight broadcasts, R MV FMAs (R | r: 8, 4, 2 or 1,
//     and MV up to 8, sized to the register file; small tiles keep several partial sums). The
//     tiles of a panel of block rows add into an accumulator buffer (L2) while the blocks are
//     visited by chunks of ~40 KiB of xt, every block row per chunk, so that xt is read from L1:
//     with 1 x c blocks each xt load feeds only one FMA, and from L2 that halves the speed. Each
//     group of >= 16 output channels is written out with an in-register transpose (plus b).
//   M < kTransposeRows (decode): up to 4 rows of x at once walk each block row's blocks, with the
//     block shape compiled (1x16, 1x8, 1x4, 1x32, 2x8, 2x4, 2x2, 4x4, 8x8, 4x1, 8x1, 16x1) and
//     vectorized over the flattened block: a block column's inputs repeated across the vector (a
//     shuffle), a tree of shuffles for the row sums, several blocks in flight. Other shapes take a
//     generic loop (a dot product per block row).
//   All tiles are GCC vector extensions at the register width (AVX-512, AVX2, SSE2, NEON): one
//   source for every target. Threads: block rows are split over TVM's pool (common.h `parallel`),
//   balanced by the number of blocks (+ 1 per block row); the transposition of x is split over K.
//
// unmask: bit i of mask byte j (little-endian bit order) says whether element 8 j + i of the flat out
// is nonzero; the nonzero ones are values, in order; the others become 0. values must hold exactly
// as many elements as the mask has set bits below numel (bits past numel are ignored). Paths, chosen
// by the compile flags: float32: AVX-512 vexpandps per 16 elements, AVX2 vpermps with a 256-entry
// table per 8, NEON tbl per 8; int8/uint8: AVX512-VBMI2 vpexpandb per 64, SSSE3 pshufb or NEON tbl
// with a 256-entry table per 8; else a portable loop (per element, a table lookup and a mask, no
// branch). The mask is cut into chunks of kUnmaskChunk elements whose offsets into values are the
// prefix popcount, and the chunks are split over TVM's pool when there are several.
#include "common.h"

#include <array>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

namespace {

// Fully unrolls a loop over registers before GCC decides what stays in registers.
#define UNROLL _Pragma("GCC unroll 64")

// ---------------------------------------------------------------------------------------------
// Vectors at the register width (GCC vector extensions)
// ---------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
constexpr int kLanes = 16, kRegs = 32;
#elif defined(__AVX__)
constexpr int kLanes = 8, kRegs = 16;
#elif defined(__aarch64__)
constexpr int kLanes = 4, kRegs = 32;
#else
constexpr int kLanes = 4, kRegs = 16;
#endif
typedef float vf __attribute__((vector_size(kLanes * 4)));
typedef float vf_u __attribute__((vector_size(kLanes * 4), aligned(1), may_alias));

inline vf load(const float* p) { return *reinterpret_cast<const vf_u*>(p); }
inline void store(float* p, vf v) { *reinterpret_cast<vf_u*>(p) = v; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// common.h's per-thread scratch, aligned to a cache line: the tiles load whole vectors from it, and
// a vector that straddles two lines costs two loads.
template <typename T, int Tag>
T* aligned_scratch(size_t n) {
  constexpr size_t pad = 64 / sizeof(T);
  T* p = scratch<T, Tag>(n + pad);
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

typedef int32_t vi __attribute__((vector_size(kLanes * 4)));

// Lanes 0 .. L/2 - 1 (lo) or L/2 .. L - 1 (hi) of a and b, interleaved: a0 b0 a1 b1 ...
template <size_t... I>
constexpr vi interleave_mask(bool hi, std::index_sequence<I...>) {
  return vi{static_cast<int32_t>((I % 2 ? kLanes : 0) + (hi ? kLanes / 2 : 0) + I / 2)...};
}
constexpr vi kInterleaveLo = interleave_mask(false, std::make_index_sequence<kLanes>{});
constexpr vi kInterleaveHi = interleave_mask(true, std::make_index_sequence<kLanes>{});

// dst[m * ldd + i] = src[i * lds + m] (+ bias[i]) for i, m < kLanes: log2(kLanes) rounds of
// interleaving row k with row k + L/2 (the perfect shuffle) transpose the block in registers.
inline void transpose_block(const float* src, int64_t lds, float* dst, int64_t ldd, const float* bias) {
  vf a[kLanes], t[kLanes];
  UNROLL for (int i = 0; i < kLanes; ++i) a[i] = load(src + i * lds);
  UNROLL for (int round = 1; round < kLanes; round *= 2) {
    UNROLL for (int k = 0; k < kLanes / 2; ++k) {
      t[2 * k] = __builtin_shuffle(a[k], a[k + kLanes / 2], kInterleaveLo);
      t[2 * k + 1] = __builtin_shuffle(a[k], a[k + kLanes / 2], kInterleaveHi);
    }
    UNROLL for (int i = 0; i < kLanes; ++i) a[i] = t[i];
  }
  const vf bv = bias ? load(bias) : vf{};
  UNROLL for (int m = 0; m < kLanes; ++m) store(dst + m * ldd, a[m] + bv);
}

// ---------------------------------------------------------------------------------------------
// dense_bsr
// ---------------------------------------------------------------------------------------------

constexpr int64_t kTransposeRows = 16;   // M from which x is transposed (see the top of the file)
constexpr int64_t kRowCost = 1;         // a block row's fixed cost, in blocks, for the thread split
constexpr int64_t kMaxTile = 8;         // vectors over M per tile (8 x 16 = 128 rows on AVX-512)
constexpr int64_t kXtBytes = 1 << 20;   // xt is built and used in slices of M of about this size
constexpr int64_t kXtChunkBytes = 40 << 10;  // a chunk of xt that stays in L1
constexpr int64_t kAccBytes = 256 << 10;     // accumulators of a panel of block rows, in L2

struct Bsr {
  int64_t m, n, k;
  int64_t r, c;          // block shape
  int64_t block_rows;    // N / r
  const float* x;
  const float* values;   // [nnzb][r][c]
  const int32_t* col_idx;
  const int32_t* row_ptr;
  const float* b;        // nullptr: no bias
  float* out;
};

// Rows of a register tile: the largest of 8, 4, 2, 1 that divides r (4 with 16 vector registers).
// Each tile loads 1/R vector of xt and 1/MV broadcast per FMA: R = 8 with MV = 3 beats R = 16 with
// MV = 1 (measured on 16x1 blocks).
constexpr int kMaxTileRows = kRegs >= 32 ? 8 : 4;
int tile_rows(int64_t r) {
  for (int R = kMaxTileRows; R > 1; R /= 2)
    if (r % R == 0) return R;
  return 1;
}

// Vectors over M per tile of R rows: R x MV accumulators + MV loads + a broadcast within the
// register file, at most kMaxTile.
constexpr int tile_vectors(int R) {
  const int mv = (kRegs - 4) / (R + 1);
  return mv < 1 ? 1 : mv > kMaxTile ? kMaxTile : mv;
}

// Groups of g block rows [*begin, *end) that task `task` of `num_tasks` owns: equal shares of the
// cost row_ptr[q] + kRowCost q (blocks so far, plus the fixed cost of each block row).
void split_groups(const Bsr& p, int64_t g, int task, int num_tasks, int64_t* begin, int64_t* end) {
  const int64_t groups = ceil_div(p.block_rows, g);
  auto cost = [&](int64_t grp) {
    const int64_t q = std::min(p.block_rows, grp * g);
    return p.row_ptr[q] + kRowCost * q;
  };
  auto first_group_at = [&](int t) -> int64_t {
    const int64_t target = cost(groups) * t / num_tasks;
    int64_t lo = 0, hi = groups;  // the first group with cost >= target
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (cost(mid) < target) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  };
  *begin = first_group_at(task);
  *end = task + 1 == num_tasks ? groups : first_group_at(task + 1);
}

// tile[i][v] += sum over blocks t0 .. t1 - 1 (of one block row) and their columns j of
//   values[t, i0 + i, j] * xt[col_idx[t] c + j][m0 + v lanes ...]          (i < R, v < MV)
// C is the block's c, or 0 to read it from p. A small tile (R MV < 8) keeps J partial sums, over
// the block columns j mod J, so that enough independent FMAs are in flight.
template <int R, int C, int MV>
void bsr_tile(const Bsr& p, const float* xt, int64_t ldx, int64_t t0, int64_t t1, int64_t i0, int64_t m0,
              float* tile, int64_t ld) {
  constexpr int J = std::clamp(8 / (R * MV), 1, 8);
  vf acc[J][R][MV];
  UNROLL for (int i = 0; i < R; ++i)
    UNROLL for (int v = 0; v < MV; ++v) {
      acc[0][i][v] = load(tile + i * ld + v * kLanes);
      UNROLL for (int jj = 1; jj < J; ++jj) acc[jj][i][v] = vf{};
    }
  const int64_t c = C ? C : p.c, rc = p.r * c;
  auto column = [&](const float* w, const float* xb, int64_t j, vf (&a)[R][MV]) {
    vf xv[MV];
    UNROLL for (int v = 0; v < MV; ++v) xv[v] = load(xb + j * ldx + v * kLanes);
    UNROLL for (int i = 0; i < R; ++i) {
      const float wi = w[i * c + j];
      UNROLL for (int v = 0; v < MV; ++v) a[i][v] += xv[v] * wi;
    }
  };
  for (int64_t t = t0; t < t1; ++t) {
    const float* w = p.values + t * rc + i0 * c;
    const float* xb = xt + p.col_idx[t] * c * ldx + m0;
    int64_t j = 0;
    for (; j + J <= c; j += J)
      UNROLL for (int jj = 0; jj < J; ++jj) column(w, xb, j + jj, acc[jj]);
    for (; j < c; ++j) column(w, xb, j, acc[0]);
  }
  UNROLL for (int i = 0; i < R; ++i)
    UNROLL for (int v = 0; v < MV; ++v) {
      UNROLL for (int jj = 1; jj < J; ++jj) acc[0][i][v] += acc[jj][i][v];
      store(tile + i * ld + v * kLanes, acc[0][i][v]);
    }
}

using TileFn = void (*)(const Bsr&, const float*, int64_t, int64_t, int64_t, int64_t, int64_t, float*, int64_t);

struct Tiles {
  int rows, vectors;     // R, MV
  TileFn fn[kMaxTile];   // fn[mv - 1]: the tile of mv vectors (mv <= MV)
};

template <int R, int C, int... V>
constexpr Tiles tiles_of(std::integer_sequence<int, V...>) {
  return {R, tile_vectors(R), {bsr_tile<R, C, (V < tile_vectors(R) ? V : tile_vectors(R) - 1) + 1>...}};
}
template <int R, int C>
constexpr Tiles kTiles = tiles_of<R, C>(std::make_integer_sequence<int, kMaxTile>{});

// The tiles for blocks of r x c: compiled for c (the loop over a block's columns unrolled) for the
// common shapes, else reading c at run time.
const Tiles& tiles_for(int64_t r, int64_t c) {
  const int R = tile_rows(r);
  struct Entry { int R, c; const Tiles* tiles; };
  static constexpr Entry kFixed[] = {
      {1, 16, &kTiles<1, 16>}, {1, 8, &kTiles<1, 8>}, {1, 4, &kTiles<1, 4>}, {2, 8, &kTiles<2, 8>},
      {4, 4, &kTiles<4, 4>},   {2, 4, &kTiles<2, 4>}, {2, 2, &kTiles<2, 2>}, {4, 1, &kTiles<4, 1>},
      {kMaxTileRows, 1, &kTiles<kMaxTileRows, 1>},
  };
  for (const Entry& e : kFixed)
    if (e.R == R && e.c == c) return *e.tiles;
  if (R == 8) return kTiles<kMaxTileRows, 0>;  // (only with 32 registers)
  if (R == 4) return kTiles<4, 0>;
  if (R == 2) return kTiles<2, 0>;
  return kTiles<1, 0>;
}

// Block rows per group: a group's G = g r output channels are written out together, G >= 16 (a
// cache line of each row of out instead of a word).
int64_t group_rows(int64_t r) { return ceil_div(16, r); }

// out[m0 + m][n0 + i] = tile[i][m] + b[n0 + i], m < rows, i < G: by blocks of kLanes x kLanes.
void store_transposed(const Bsr& p, const float* tile, int64_t ld, int64_t G, int64_t n0, int64_t m0, int64_t rows) {
  const int64_t gv = G / kLanes * kLanes, mv = rows / kLanes * kLanes;
  float* out = p.out + m0 * p.n + n0;
  for (int64_t i = 0; i < gv; i += kLanes)
    for (int64_t m = 0; m < mv; m += kLanes)
      transpose_block(tile + i * ld + m, ld, out + m * p.n + i, p.n, p.b ? p.b + n0 + i : nullptr);
  auto scalar = [&](int64_t ma, int64_t mb, int64_t ia, int64_t ib) {
    for (int64_t m = ma; m < mb; ++m)
      for (int64_t i = ia; i < ib; ++i) out[m * p.n + i] = tile[i * ld + m] + (p.b ? p.b[n0 + i] : 0.0f);
  };
  if (gv < G) scalar(0, mv, gv, G);    // channels past the last full block
  if (mv < rows) scalar(mv, rows, 0, G);  // rows past the last full block
}

// Block rows [q0, q1) (whole groups) of out for rows [m0, m1) of x, whose transpose is xt[K][ldx]
// (column 0 is row m0, zero past m1 - m0 up to a multiple of kLanes). Per tile of Mt rows of x, the
// accumulators of all these output channels live in acc [channels][Mt] (L2), and the blocks are
// visited by chunks of input columns, every block row per chunk, so that the chunk of xt stays in
// L1 while all the block rows use it.
void bsr_panel(const Bsr& p, const Tiles& tiles, const float* xt, int64_t ldx, int64_t q0, int64_t q1, int64_t m0,
               int64_t m1) {
  const int64_t R = tiles.rows, MV = tiles.vectors, Mt = MV * kLanes;
  const int64_t g = group_rows(p.r), channels = (q1 - q0) * p.r, vectors = ceil_div(m1 - m0, kLanes);
  const int64_t block_cols = p.k / p.c;
  float* acc = aligned_scratch<float, 5>(channels * Mt);
  int64_t* cursor = scratch<int64_t, 6>(q1 - q0);
  for (int64_t v = 0; v < vectors; v += MV) {
    const int64_t mv = std::min<int64_t>(MV, vectors - v);
    const int64_t chunk = std::max<int64_t>(1, kXtChunkBytes / (4 * mv * kLanes) / p.c);  // block columns
    std::fill(acc, acc + channels * Mt, 0.0f);
    for (int64_t q = q0; q < q1; ++q) cursor[q - q0] = p.row_ptr[q];
    for (int64_t kc = chunk; kc < block_cols + chunk; kc += chunk) {
      const bool last = kc >= block_cols;
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t t0 = cursor[q - q0], end = p.row_ptr[q + 1];
        int64_t t1 = last ? end : t0;
        while (t1 < end && p.col_idx[t1] < kc) ++t1;
        cursor[q - q0] = t1;
        if (t1 == t0) continue;
        for (int64_t i0 = 0; i0 < p.r; i0 += R)
          tiles.fn[mv - 1](p, xt, ldx, t0, t1, i0, v * kLanes, acc + ((q - q0) * p.r + i0) * Mt, Mt);
      }
    }
    const int64_t rows = std::min(m1 - m0 - v * kLanes, mv * kLanes);
    for (int64_t q = q0; q < q1; q += g) {
      const int64_t n0 = q * p.r, G = std::min(q1 - q, g) * p.r;
      store_transposed(p, acc + (n0 - q0 * p.r) * Mt, Mt, G, n0, m0 + v * kLanes, rows);
    }
  }
}

// Groups [g0, g1) of block rows, in panels whose accumulators take about kAccBytes.
void bsr_groups_transposed(const Bsr& p, const Tiles& tiles, const float* xt, int64_t ldx, int64_t g0, int64_t g1,
                           int64_t m0, int64_t m1) {
  const int64_t Mt = tiles.vectors * kLanes;
  const int64_t g = group_rows(p.r), q1 = std::min(p.block_rows, g1 * g);
  const int64_t panel = std::max<int64_t>(1, kAccBytes / (4 * Mt * g * p.r)) * g;  // block rows
  for (int64_t q = g0 * g; q < q1; q += panel) bsr_panel(p, tiles, xt, ldx, q, std::min(q1, q + panel), m0, m1);
}

void bsr_transposed(const Bsr& p) {
  // Rows of x per slice: xt [K][slice] stays in L2.
  const int64_t slice = std::max<int64_t>(kMaxTile * kLanes,
                                          kXtBytes / 4 / std::max<int64_t>(p.k, 1) / (kMaxTile * kLanes) * (kMaxTile * kLanes));
  const int64_t ldx = ceil_div(std::min(slice, p.m), kLanes) * kLanes;
  float* xt = aligned_scratch<float, 4>(p.k * ldx);
  const Tiles& tiles = tiles_for(p.r, p.c);
  const int64_t g = group_rows(p.r);
  for (int64_t m0 = 0; m0 < p.m; m0 += slice) {
    const int64_t m1 = std::min(p.m, m0 + slice), rows = m1 - m0;
    parallel([&](int task, int num_tasks) {  // xt[k][i] = x[m0 + i][k], zero for i >= rows
      int64_t k0, k1;
      split(p.k, kLanes, task, num_tasks, &k0, &k1);
      const float* x = p.x + m0 * p.k;
      const int64_t kv = k0 + (k1 - k0) / kLanes * kLanes, iv = rows / kLanes * kLanes;
      for (int64_t k = k0; k < kv; k += kLanes)
        for (int64_t i = 0; i < iv; i += kLanes) transpose_block(x + i * p.k + k, p.k, xt + k * ldx + i, ldx, nullptr);
      for (int64_t k = k0; k < k1; ++k) {
        for (int64_t i = k < kv ? iv : 0; i < rows; ++i) xt[k * ldx + i] = x[i * p.k + k];
        std::fill(xt + k * ldx + rows, xt + k * ldx + ldx, 0.0f);
      }
    });
    parallel([&](int task, int num_tasks) {
      int64_t g0, g1;
      split_groups(p, g, task, num_tasks, &g0, &g1);
      bsr_groups_transposed(p, tiles, xt, ldx, g0, g1, m0, m1);
    });
  }
}

// Decode (M < kTransposeRows): rows of x in xp, each padded with kLanes zeros (ld = ldp), so a
// vector load at any block column stays inside the buffer.

template <int W>
struct Vec {  // W floats (and int32 lanes for shuffle masks) as a GCC vector
  typedef float type __attribute__((vector_size(W * 4)));
  typedef float unaligned __attribute__((vector_size(W * 4), aligned(1), may_alias));
  typedef int32_t mask __attribute__((vector_size(W * 4)));
};

// Lane l takes lane l % BC: a block column's BC inputs repeated across the vector.
template <int W, int BC, size_t... I>
constexpr typename Vec<W>::mask repeat_mask(std::index_sequence<I...>) {
  return typename Vec<W>::mask{static_cast<int32_t>(I % BC)...};
}

// Lane l takes lane (l + h) mod W.
template <int W, size_t... I>
constexpr typename Vec<W>::mask rotate_mask(int h, std::index_sequence<I...>) {
  return typename Vec<W>::mask{static_cast<int32_t>((I + h) % W)...};
}
template <int W>
constexpr typename Vec<W>::mask rotate_mask(int h) {
  return rotate_mask<W>(h, std::make_index_sequence<W>{});
}

// Rows [m0, m0 + MR) of out, block rows [q0, q1), blocks of BR x BC, in vectors of W lanes over the
// flattened block (W | BR BC, and W | BC or BC | W). U blocks in flight keep enough independent
// accumulators for the FMA latency.
template <int BR, int BC, int MR>
void bsr_decode(const Bsr& p, const float* xp, int64_t ldp, int64_t q0, int64_t q1, int64_t m0) {
  constexpr int BS = BR * BC, W = BS < kLanes ? BS : kLanes, V = BS / W;
  constexpr int U = std::clamp(8 / (MR * V), 1, 4);
  static_assert(BS % W == 0 && (BC % W == 0 || W % BC == 0), "no vector layout for this block shape");
  static_assert((BC & (BC - 1)) == 0 && (W & (W - 1)) == 0, "the row sums are a tree over a power of two");
  using v = typename Vec<W>::type;
  using v_u = typename Vec<W>::unaligned;
  const typename Vec<W>::mask mask = repeat_mask<W, (BC < W ? BC : W)>(std::make_index_sequence<W>{});
  const float* x = xp + m0 * ldp;
  auto step = [&](int64_t t, v (&acc)[MR][V]) {
    const float* w = p.values + t * BS;
    const float* xc = x + p.col_idx[t] * BC;
    UNROLL for (int m = 0; m < MR; ++m) {
      if constexpr (BC % W == 0) {
        UNROLL for (int i = 0; i < V; ++i)
          acc[m][i] += *reinterpret_cast<const v_u*>(w + i * W) * *reinterpret_cast<const v_u*>(xc + m * ldp + (i * W) % BC);
      } else {
        const v xv = __builtin_shuffle(*reinterpret_cast<const v_u*>(xc + m * ldp), mask);
        UNROLL for (int i = 0; i < V; ++i) acc[m][i] += *reinterpret_cast<const v_u*>(w + i * W) * xv;
      }
    }
  };
  for (int64_t q = q0; q < q1; ++q) {
    v acc[U][MR][V];
    UNROLL for (int u = 0; u < U; ++u)
      UNROLL for (int m = 0; m < MR; ++m)
        UNROLL for (int i = 0; i < V; ++i) acc[u][m][i] = v{};
    int64_t t = p.row_ptr[q];
    const int64_t end = p.row_ptr[q + 1];
    for (; t + U <= end; t += U)
      UNROLL for (int u = 0; u < U; ++u) step(t + u, acc[u]);
    for (; t < end; ++t) step(t, acc[0]);
    UNROLL for (int m = 0; m < MR; ++m) {
      float* o = p.out + (m0 + m) * p.n + q * BR;
      if constexpr (BC >= W) {  // row i: the vectors i BC / W ..., summed, then across the lanes
        UNROLL for (int i = 0; i < BR; ++i) {
          v sum = v{};
          UNROLL for (int u = 0; u < U; ++u)
            UNROLL for (int k = 0; k < BC / W; ++k) sum += acc[u][m][i * (BC / W) + k];
          UNROLL for (int h = W / 2; h > 0; h /= 2) sum += __builtin_shuffle(sum, rotate_mask<W>(h));
          o[i] = sum[0] + (p.b ? p.b[q * BR + i] : 0.0f);
        }
      } else {  // vector k: rows k W / BC + g in lanes g BC .. g BC + BC - 1, summed into lane g BC
        UNROLL for (int k = 0; k < V; ++k) {
          v sum = acc[0][m][k];
          UNROLL for (int u = 1; u < U; ++u) sum += acc[u][m][k];
          UNROLL for (int h = BC / 2; h > 0; h /= 2) sum += __builtin_shuffle(sum, rotate_mask<W>(h));
          UNROLL for (int g = 0; g < W / BC; ++g) {
            const int i = k * (W / BC) + g;
            o[i] = sum[g * BC] + (p.b ? p.b[q * BR + i] : 0.0f);
          }
        }
      }
    }
  }
}

template <int BR, int BC>
void bsr_decode_rows(const Bsr& p, const float* xp, int64_t ldp, int64_t q0, int64_t q1) {
  for (int64_t m0 = 0; m0 < p.m; m0 += 4) {
    switch (std::min<int64_t>(4, p.m - m0)) {
      case 1: bsr_decode<BR, BC, 1>(p, xp, ldp, q0, q1, m0); break;
      case 2: bsr_decode<BR, BC, 2>(p, xp, ldp, q0, q1, m0); break;
      case 3: bsr_decode<BR, BC, 3>(p, xp, ldp, q0, q1, m0); break;
      default: bsr_decode<BR, BC, 4>(p, xp, ldp, q0, q1, m0); break;
    }
  }
}

// Decode, any block shape: one row of x and one row of a block at a time.
void bsr_decode_generic(const Bsr& p, const float* xp, int64_t ldp, int64_t q0, int64_t q1) {
  for (int64_t m = 0; m < p.m; ++m) {
    const float* x = xp + m * ldp;
    for (int64_t q = q0; q < q1; ++q) {
      float* o = p.out + m * p.n + q * p.r;
      for (int64_t i = 0; i < p.r; ++i) o[i] = p.b ? p.b[q * p.r + i] : 0.0f;
      for (int64_t t = p.row_ptr[q]; t < p.row_ptr[q + 1]; ++t) {
        const float* xc = x + p.col_idx[t] * p.c;
        for (int64_t i = 0; i < p.r; ++i) {
          const float* w = p.values + (t * p.r + i) * p.c;
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < p.c; ++j) s += w[j] * xc[j];
          o[i] += s;
        }
      }
    }
  }
}

using DecodeFn = void (*)(const Bsr&, const float*, int64_t, int64_t, int64_t);

// The compiled block shapes (those with a vector layout on this target), else the generic loop.
DecodeFn decode_kernel(int64_t r, int64_t c) {
  struct Entry { int r, c; DecodeFn fn; };
  static constexpr Entry kFixed[] = {
      {1, 16, bsr_decode_rows<1, 16>}, {1, 8, bsr_decode_rows<1, 8>}, {1, 4, bsr_decode_rows<1, 4>},
      {2, 8, bsr_decode_rows<2, 8>},   {4, 4, bsr_decode_rows<4, 4>}, {2, 2, bsr_decode_rows<2, 2>},
      {4, 1, bsr_decode_rows<4, 1>},   {8, 1, bsr_decode_rows<8, 1>}, {16, 1, bsr_decode_rows<16, 1>},
      {1, 32, bsr_decode_rows<1, 32>}, {8, 8, bsr_decode_rows<8, 8>}, {2, 4, bsr_decode_rows<2, 4>},
  };
  for (const Entry& e : kFixed)
    if (e.r == r && e.c == c) return e.fn;
  return bsr_decode_generic;
}

void bsr_run(const Bsr& p) {
  if (p.m == 0 || p.n == 0) return;
  if (p.m >= kTransposeRows && p.row_ptr[p.block_rows] > 0) return bsr_transposed(p);
  const int64_t ldp = p.k + kLanes;
  float* xp = aligned_scratch<float, 7>(p.m * ldp);
  for (int64_t m = 0; m < p.m; ++m) {
    std::copy(p.x + m * p.k, p.x + (m + 1) * p.k, xp + m * ldp);
    std::fill(xp + m * ldp + p.k, xp + (m + 1) * ldp, 0.0f);
  }
  const DecodeFn decode = decode_kernel(p.r, p.c);
  parallel([&](int task, int num_tasks) {
    int64_t q0, q1;
    split_groups(p, 1, task, num_tasks, &q0, &q1);
    decode(p, xp, ldp, q0, q1);
  });
}

// Checks the arguments (see the top of the file) and runs the kernel.
void dense_bsr(const TensorView& x, const TensorView& values, const TensorView& col_idx, const TensorView& row_ptr,
               const TensorView* b, const TensorView& out, const char* kernel) {
  Bsr p{};
  p.x = f32_in(x, kernel, "x", 1, 64);
  p.values = f32_in(values, kernel, "values", 3, 3);
  p.col_idx = data_of<const int32_t>(col_idx, kernel, "col_idx", kDLInt, 32, 1, 1);
  p.row_ptr = data_of<const int32_t>(row_ptr, kernel, "row_ptr", kDLInt, 32, 1, 1);
  p.out = f32_out(out, kernel, x.ndim(), x.ndim());
  for (int d = 0; d + 1 < x.ndim(); ++d) check_dim(out, kernel, "out", d, x.size(d), "the leading dims of x");
  p.k = x.size(-1), p.n = out.size(-1), p.r = values.size(1), p.c = values.size(2);
  p.m = p.k ? x.numel() / p.k : out.numel() / std::max<int64_t>(p.n, 1);
  const std::string layout = " (build the layout with backends/kernels/sparse_layout.py to_bsr)";
  if (p.r < 1 || p.c < 1 || p.n % p.r != 0 || p.k % p.c != 0) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'values' has shape " << shape_str(values) << ": its blocks of "
                              << p.r << " x " << p.c << " must tile W [N, K] = [" << p.n << ", " << p.k << "]" << layout;
  }
  p.block_rows = p.n / p.r;
  const int64_t nnzb = values.size(0), block_cols = p.k / p.c;
  check_dim(col_idx, kernel, "col_idx", 0, nnzb, "nnzb, the blocks in values");
  check_dim(row_ptr, kernel, "row_ptr", 0, p.block_rows + 1, ("N / r + 1, N = " + std::to_string(p.n)).c_str());
  if (b) {
    p.b = f32_in(*b, kernel, "b", 1, 1);
    check_dim(*b, kernel, "b", 0, p.n, "N, the last dim of out");
  }
  if (nnzb > std::numeric_limits<int32_t>::max()) {
    TVM_FFI_THROW(ValueError) << kernel << ": " << nnzb << " blocks do not fit the int32 row_ptr";
  }
  bool ordered = p.row_ptr[0] == 0 && p.row_ptr[p.block_rows] == nnzb;
  for (int64_t q = 0; q < p.block_rows; ++q) ordered &= p.row_ptr[q] <= p.row_ptr[q + 1];
  if (!ordered) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'row_ptr' must rise from 0 to nnzb = " << nnzb
                              << " (got " << p.row_ptr[0] << " .. " << p.row_ptr[p.block_rows] << ")" << layout;
  }
  uint32_t worst = 0;  // (a negative index becomes a large unsigned one)
  for (int64_t t = 0; t < nnzb; ++t) worst = std::max(worst, static_cast<uint32_t>(p.col_idx[t]));
  if (nnzb > 0 && worst >= static_cast<uint64_t>(block_cols)) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'col_idx' holds " << static_cast<int32_t>(worst)
                              << ", outside the K / c = " << block_cols << " block columns" << layout;
  }
  bsr_run(p);
}

// ---------------------------------------------------------------------------------------------
// unmask
// ---------------------------------------------------------------------------------------------

constexpr int64_t kUnmaskChunk = 1 << 15;  // elements per chunk (a multiple of 64)

// Tables over a mask byte m (bit i: element i is stored):
//   kSlot[m][i]     the index among m's set bits of bit i, or 0x80 where bit i is clear (pshufb and
//                   NEON tbl write 0 for such an index); kSlot[m][8] = popcount(m)
//   kSlot32[m][4 i + b] = 4 kSlot[m][i] + b: the same for the bytes of 8 floats (NEON tbl)
//   kPermute[m][i]  kSlot[m][i] as an int32 lane index, 0 where bit i is clear (AVX2 vpermps)
template <typename T, size_t N>
using Table = std::array<std::array<T, N>, 256>;

constexpr Table<uint8_t, 16> slot_table() {
  Table<uint8_t, 16> t{};
  for (int m = 0; m < 256; ++m) {
    int n = 0;
    for (int i = 0; i < 8; ++i) t[m][i] = (m >> i & 1) ? n++ : 0x80;
    t[m][8] = static_cast<uint8_t>(n);
  }
  return t;
}
alignas(64) constexpr Table<uint8_t, 16> kSlot = slot_table();

// Each path below writes out[0 : 8 bytes) from mask[0 : bytes) and the values from v on (never
// reading at or past v_end) and returns the values used: unmask_f32 for floats, unmask_u8 for
// int8 and uint8 (as bytes). unmask_portable is the fallback of both: per element, the value in
// its slot (slot 0 for a clear bit) ANDed with all ones or zeros by the bit, with no branch.
template <typename T>
const T* unmask_portable(const uint8_t* mask, int64_t bytes, const T* v, const T* v_end, T* out) {
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint8_t>;
  for (int64_t j = 0; j < bytes; ++j, out += 8) {
    const unsigned m = mask[j];
    const std::array<uint8_t, 16>& slot = kSlot[m];
    T buf[8] = {};
    const T* src = v;
    if (v_end - v < 8) {  // near the end of values: do not read past it
      std::memcpy(buf, v, (v_end - v) * sizeof(T));
      src = buf;
    }
    for (int i = 0; i < 8; ++i) {
      Bits bits;
      std::memcpy(&bits, src + (slot[i] & 7), sizeof(T));
      bits &= static_cast<Bits>(0u - (m >> i & 1u));
      std::memcpy(out + i, &bits, sizeof(T));
    }
    v += slot[8];
  }
  return v;
}

#if defined(__AVX512F__) && defined(__AVX512VL__)
const float* unmask_f32(const uint8_t* mask, int64_t bytes, const float* v, const float*, float* out) {
  int64_t j = 0;
  for (; j + 2 <= bytes; j += 2, out += 16) {  // vexpandps: loads only the values it uses
    uint16_t m;
    std::memcpy(&m, mask + j, 2);
    _mm512_storeu_ps(out, _mm512_maskz_expandloadu_ps(m, v));
    v += __builtin_popcount(m);
  }
  if (j < bytes) {
    const uint8_t m = mask[j];
    _mm256_storeu_ps(out, _mm256_maskz_expandloadu_ps(m, v));
    v += __builtin_popcount(m);
  }
  return v;
}
#elif defined(__AVX2__)
constexpr Table<int32_t, 8> permute_table() {
  Table<int32_t, 8> t{};
  for (int m = 0; m < 256; ++m)
    for (int i = 0; i < 8; ++i) t[m][i] = kSlot[m][i] & 0x80 ? 0 : kSlot[m][i];
  return t;
}
alignas(32) constexpr Table<int32_t, 8> kPermute = permute_table();

const float* unmask_f32(const uint8_t* mask, int64_t bytes, const float* v, const float* v_end, float* out) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  for (int64_t j = 0; j < bytes; ++j, out += 8) {
    const uint8_t m = mask[j];
    __m256 vals;
    if (v_end - v >= 8) {
      vals = _mm256_loadu_ps(v);
    } else {  // near the end of values: do not read past it
      float buf[8] = {};
      std::memcpy(buf, v, (v_end - v) * sizeof(float));
      vals = _mm256_loadu_ps(buf);
    }
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(kPermute[m].data()));
    const __m256i keep = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(m), bits), bits);
    _mm256_storeu_ps(out, _mm256_and_ps(_mm256_permutevar8x32_ps(vals, idx), _mm256_castsi256_ps(keep)));
    v += kSlot[m][8];
  }
  return v;
}
#elif defined(__aarch64__)
constexpr Table<uint8_t, 32> slot32_table() {
  Table<uint8_t, 32> t{};
  for (int m = 0; m < 256; ++m)
    for (int i = 0; i < 32; ++i) t[m][i] = kSlot[m][i / 4] & 0x80 ? 0xff : 4 * kSlot[m][i / 4] + i % 4;
  return t;
}
alignas(64) constexpr Table<uint8_t, 32> kSlot32 = slot32_table();

const float* unmask_f32(const uint8_t* mask, int64_t bytes, const float* v, const float* v_end, float* out) {
  for (int64_t j = 0; j < bytes; ++j, out += 8) {
    const uint8_t m = mask[j];
    uint8x16x2_t src;
    if (v_end - v >= 8) {
      src = vld1q_u8_x2(reinterpret_cast<const uint8_t*>(v));
    } else {  // near the end of values: do not read past it
      float buf[8] = {};
      std::memcpy(buf, v, (v_end - v) * sizeof(float));
      src = vld1q_u8_x2(reinterpret_cast<const uint8_t*>(buf));
    }
    const uint8_t* idx = kSlot32[m].data();
    vst1q_u8(reinterpret_cast<uint8_t*>(out), vqtbl2q_u8(src, vld1q_u8(idx)));
    vst1q_u8(reinterpret_cast<uint8_t*>(out + 4), vqtbl2q_u8(src, vld1q_u8(idx + 16)));
    v += kSlot[m][8];
  }
  return v;
}
#else
const float* unmask_f32(const uint8_t* mask, int64_t bytes, const float* v, const float* v_end, float* out) {
  return unmask_portable(mask, bytes, v, v_end, out);
}
#endif

#if defined(__AVX512VBMI2__) && defined(__AVX512VL__)
const uint8_t* unmask_u8(const uint8_t* mask, int64_t bytes, const uint8_t* v, const uint8_t*, uint8_t* out) {
  int64_t j = 0;
  for (; j + 8 <= bytes; j += 8, out += 64) {  // vpexpandb: loads only the values it uses
    uint64_t m;
    std::memcpy(&m, mask + j, 8);
    _mm512_storeu_si512(out, _mm512_maskz_expandloadu_epi8(m, v));
    v += __builtin_popcountll(m);
  }
  for (; j < bytes; ++j, out += 8) {
    const uint8_t m = mask[j];
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_maskz_expandloadu_epi8(m, v));
    v += __builtin_popcount(m);
  }
  return v;
}
#elif defined(__SSSE3__) || defined(__aarch64__)
const uint8_t* unmask_u8(const uint8_t* mask, int64_t bytes, const uint8_t* v, const uint8_t* v_end, uint8_t* out) {
  for (int64_t j = 0; j < bytes; ++j, out += 8) {  // a byte shuffle (pshufb, tbl) per mask byte
    const std::array<uint8_t, 16>& slot = kSlot[mask[j]];
    uint8_t buf[8] = {};
    const uint8_t* src = v;
    if (v_end - v < 8) {  // near the end of values: do not read past it
      std::memcpy(buf, v, v_end - v);
      src = buf;
    }
#if defined(__aarch64__)
    vst1_u8(out, vtbl1_u8(vld1_u8(src), vld1_u8(slot.data())));
#else
    const __m128i vals = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src));
    const __m128i idx = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(slot.data()));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_shuffle_epi8(vals, idx));
#endif
    v += slot[8];
  }
  return v;
}
#else
const uint8_t* unmask_u8(const uint8_t* mask, int64_t bytes, const uint8_t* v, const uint8_t* v_end, uint8_t* out) {
  return unmask_portable(mask, bytes, v, v_end, out);
}
#endif

template <typename T>
const T* unmask_bytes(const uint8_t* mask, int64_t bytes, const T* v, const T* v_end, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    return unmask_f32(mask, bytes, v, v_end, out);
  } else {
    static_assert(sizeof(T) == 1);
    auto u8 = [](const T* p) { return reinterpret_cast<const uint8_t*>(p); };
    return reinterpret_cast<const T*>(unmask_u8(mask, bytes, u8(v), u8(v_end), reinterpret_cast<uint8_t*>(out)));
  }
}

// The last `count` (< 8) elements, from one mask byte.
template <typename T>
void unmask_tail(uint8_t m, int64_t count, const T* v, T* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = (m >> i & 1) ? *v++ : T(0);
}

int64_t popcount_bytes(const uint8_t* mask, int64_t bytes) {
  int64_t n = 0, j = 0;
  for (; j + 8 <= bytes; j += 8) {
    uint64_t w;
    std::memcpy(&w, mask + j, 8);
    n += __builtin_popcountll(w);
  }
  for (; j < bytes; ++j) n += __builtin_popcount(mask[j]);
  return n;
}

template <typename T>
void unmask_run(const T* values, int64_t nnz, const uint8_t* mask, int64_t numel, T* out, const char* kernel) {
  // Values offset of each chunk: the popcount of the mask before it (bits past numel masked off).
  const int64_t chunks = ceil_div(numel, kUnmaskChunk), tail = numel % 8;
  std::vector<int64_t> offset(chunks + 1, 0);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t e0 = ch * kUnmaskChunk, e1 = std::min(numel, e0 + kUnmaskChunk);
    int64_t count = popcount_bytes(mask + e0 / 8, (e1 - e0) / 8);
    if (e1 == numel && tail) count += __builtin_popcount(mask[numel / 8] & ((1u << tail) - 1));
    offset[ch + 1] = offset[ch] + count;
  }
  if (offset[chunks] != nnz) {
    TVM_FFI_THROW(ValueError) << kernel << ": argument 'values' has " << nnz << " elements, but the mask has "
                              << offset[chunks] << " set bits below numel = " << numel
                              << " (build both with backends/kernels/sparse_layout.py compress)";
  }
  auto run_chunks = [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) {
      const int64_t e0 = ch * kUnmaskChunk, e1 = std::min(numel, e0 + kUnmaskChunk);
      const T* v = unmask_bytes<T>(mask + e0 / 8, (e1 - e0) / 8, values + offset[ch], values + nnz, out + e0);
      if (e1 == numel && tail) unmask_tail<T>(mask[numel / 8], tail, v, out + numel - tail);
    }
  };
  if (chunks <= 1) return run_chunks(0, chunks);
  parallel([&](int task, int num_tasks) {
    int64_t c0, c1;
    split(chunks, 1, task, num_tasks, &c0, &c1);
    run_chunks(c0, c1);
  });
}

void unmask(const TensorView& values, const TensorView& mask, const TensorView& out, const char* kernel) {
  const DLDataType dt = out.dtype();
  const int64_t numel = out.numel();
  const uint8_t* mp = data_of<const uint8_t>(mask, kernel, "mask", kDLUInt, 8, 1, 1);
  check_dim(mask, kernel, "mask", 0, ceil_div(numel, 8), ("ceil(numel / 8), numel = " + std::to_string(numel) +
                                                          " elements of out").c_str());
  const auto code = static_cast<DLDataTypeCode>(dt.code);
  if (dt.lanes == 1 && dt.code == kDLFloat && dt.bits == 32) {
    unmask_run(f32_in(values, kernel, "values", 1, 1), values.size(0), mp, numel, f32_out(out, kernel, 0, 64), kernel);
  } else if (dt.lanes == 1 && dt.code == kDLInt && dt.bits == 8) {
    unmask_run(data_of<const int8_t>(values, kernel, "values", code, 8, 1, 1), values.size(0), mp, numel,
               data_of<int8_t>(out, kernel, "out", code, 8, 0, 64), kernel);
  } else if (dt.lanes == 1 && dt.code == kDLUInt && dt.bits == 8) {
    unmask_run(data_of<const uint8_t>(values, kernel, "values", code, 8, 1, 1), values.size(0), mp, numel,
               data_of<uint8_t>(out, kernel, "out", code, 8, 0, 64), kernel);
  } else {
    TVM_FFI_THROW(TypeError) << kernel << ": argument 'out' must be float32, int8 or uint8, got " << dtype_name(dt);
  }
}

// ---------------------------------------------------------------------------------------------
// Exported kernels
// ---------------------------------------------------------------------------------------------

void dense_bsr_f32(TensorView x, TensorView values, TensorView col_idx, TensorView row_ptr, TensorView b,
                   TensorView out) {
  dense_bsr(x, values, col_idx, row_ptr, &b, out, "tcc_dense_bsr_f32");
}

void dense_bsr_nobias_f32(TensorView x, TensorView values, TensorView col_idx, TensorView row_ptr, TensorView out) {
  dense_bsr(x, values, col_idx, row_ptr, nullptr, out, "tcc_dense_bsr_nobias_f32");
}

void unmask_any(TensorView values, TensorView mask, TensorView out) { unmask(values, mask, out, "tcc_unmask"); }

}  // namespace

TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_bsr_f32, dense_bsr_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_dense_bsr_nobias_f32, dense_bsr_nobias_f32);
TVM_FFI_DLL_EXPORT_TYPED_FUNC(tcc_unmask, unmask_any);

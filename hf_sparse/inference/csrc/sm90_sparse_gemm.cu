// Hopper (sm_90a) 2:4 structured-sparse fp16 GEMM with a fused per-output-feature bias and optional erf-GELU,
// built from CUTLASS 3.x collectives and exposed through a plain C ABI for ctypes (no torch headers).
//
// Math (HF nn.Linear): y = act(x @ W^T + bias), act = identity or erf-GELU (HF "gelu").
//   W    fp16 (m = out_features, k = in_features) row-major, exactly 2:4 along k (<= 2 nonzeros per 4).
//   x    fp16 (n = tokens, k) row-major contiguous.
//   y    fp16 (n, m) row-major contiguous.
//   bias fp16 (m) or NULL (NULL = no bias: CUTLASS's column broadcast falls back to 0 for a null pointer).
// CUTLASS sm90 can only make operand A sparse, so this computes D^T:
//   A = W (M=m, K=k, RowMajor, sparse), B = x as ColumnMajor (K-major, N=n), D ColumnMajor (M,N) == y's memory.
//   fp32 accumulate, fp32 epilogue (LinCombPerRowBiasEltAct: "per row" = per M = per output feature), C = void.
//
// Shape / alignment requirements (checked by hfs_can_implement and again by hfs_gemm / hfs_compress):
//   * 1 <= m, k <= INT32_MAX, 0 <= n <= INT32_MAX (n == 0 is a no-op success); m*k, m*n, n*k < 2^62.
//   * m % 64 == 0 and k % 128 == 0. This library's choice: the metadata E is then unpadded and every buffer size
//     is a plain formula. CUTLASS itself needs less: TMA alignment gives m % 8 (D's leading dim) and k % 16
//     (compressed A has k/2 columns), E is padded to (round_up(m,64), round_up(k,128)), the compressor needs k % 4.
//   * n: no alignment (n is never a leading dimension).
//   * values, meta, x, y (and w for the compressor): 16-byte aligned device pointers (TMA / 128-bit accesses).
//     bias: NULL or 16-byte aligned.
//   * Device: compute capability 9.0 (sm_90a cubin only).
//
// Compressed format (one format for every config: all configs use tile K = 128 and every config TU
// static_asserts that its mainloop's SparseConfig is the canonical one below):
//   values: (m, k/2) fp16 row-major, the kept elements of each group of 4 in order  -> m*k bytes.
//   meta  : uint8, CUTLASS's reordered sm90 layout (SparseConfig::fill_layoutE)      -> m*k/8 bytes.
//
// Build (hf_sparse/inference/cutlass.py, build()): one TU per GEMM config (-DHFS_ONLY_CONFIG=<i>) plus one TU for the
// compressor and the C ABI (-DHFS_ONLY_MAIN); with neither macro the file builds everything as a single TU.

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>

#include "cutlass/cutlass.h"
#include "cute/tensor.hpp"
#include "cutlass/device_kernel.h"
#include "cutlass/kernel_hardware_info.h"
#include "cutlass/epilogue/dispatch_policy.hpp"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/collective/builders/sm90_sparse_config.inl"
#include "cutlass/transform/kernel/sparse_gemm_compressor.hpp"

#if !defined(HFS_ONLY_MAIN)
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/epilogue/fusion/operations.hpp"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"
#endif

#if !defined(CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED)
#error "CUTLASS_ARCH_MMA_SPARSE_SM90_SUPPORTED is not defined: need nvcc >= 12.2"
#endif

#define HFS_API extern "C" __attribute__((visibility("default")))

namespace hfs {

using half = cutlass::half_t;
using ProblemShape = cute::Shape<int, int, int, int>;  // (M, N, K, L)

// The canonical sparse config: fp16 A, K-major, uint8 metadata holding 8 logical elements, tile K clamped to 128.
// The CUTLASS sparse builder derives exactly this from <half, RowMajor, TileK >= 128>; TileK = 64 would give
// MinTileShapeK = 64, a different TensorEAtom, and so a different metadata layout.
using SparseConfig = cutlass::Sm90GemmSparseConfig<cute::sparse_elem<2, half>, cute::GMMA::Major::K,
                                                   cute::sparse_elem<8, uint8_t>, cute::Int<128>>;
using CompressorKernel =
    cutlass::transform::kernel::SM90StructuredSparseCompressor<ProblemShape, half, cutlass::layout::RowMajor,
                                                               SparseConfig>;

// ---- configs ---------------------------------------------------------------------------------------------
using namespace cute;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Pingpong = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingpongEpi = cutlass::epilogue::TmaWarpSpecialized;

template <class Tile_, class Cluster_, class KernelSchedule_, class EpilogueSchedule_>
struct Config {
  using Tile = Tile_;
  using Cluster = Cluster_;
  using KernelSchedule = KernelSchedule_;
  using EpilogueSchedule = EpilogueSchedule_;
};
using Config0 = Config<Shape<_128, _128, _128>, Shape<_1, _2, _1>, Coop, CoopEpi>;
using Config1 = Config<Shape<_128, _256, _128>, Shape<_1, _1, _1>, Coop, CoopEpi>;
using Config2 = Config<Shape<_64, _128, _128>, Shape<_1, _1, _1>, Pingpong, PingpongEpi>;
using Config3 = Config<Shape<_128, _128, _128>, Shape<_2, _1, _1>, Coop, CoopEpi>;
constexpr int kNumConfigs = 4;
constexpr const char* kConfigNames[kNumConfigs] = {
    "128x128x128_c1x2x1_coop",
    "128x256x128_c1x1x1_coop",
    "64x128x128_c1x1x1_pingpong",
    "128x128x128_c2x1x1_coop",
};

// ---- shared helpers ----------------------------------------------------------------------------------------
struct GemmCall {
  const void* values;
  const void* meta;
  const void* x;
  const void* bias;
  void* y;
  int64_t m, n, k;
  void* workspace;
  int64_t workspace_bytes;
  cudaStream_t stream;
};

enum Op { kOpWorkspace = 0, kOpCanImplement = 1, kOpRun = 2 };

int fail(const char* fmt, ...);  // records the message for hfs_last_error, returns 1
int check_shape(int64_t m, int64_t n, int64_t k);
int device_info(int* device, int* sm_count);  // current device (checked to be sm_90) and its SM count

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class Cfg>
int config_op(int op, int gelu, const GemmCall& call, int64_t* out);

}  // namespace hfs

// ===========================================================================================================
// GEMM instantiations (one TU per config with -DHFS_ONLY_CONFIG=<i>)
// ===========================================================================================================
#if !defined(HFS_ONLY_MAIN)
namespace hfs {

template <class Cfg, template <class> class Activation>
struct SparseGemm {
  using FusionOp = cutlass::epilogue::fusion::LinCombPerRowBiasEltAct<Activation, half, float, half>;
  static constexpr int kAlign = 8;  // 16 bytes of fp16

  using CollectiveEpilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float,
      void, cutlass::layout::ColumnMajor, kAlign,   // C: none
      half, cutlass::layout::ColumnMajor, kAlign,   // D = y^T
      typename Cfg::EpilogueSchedule, FusionOp>::CollectiveOp;

  using CollectiveMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassSparseTensorOp,
      half, cutlass::layout::RowMajor, kAlign,      // A = W (sparse)
      half, cutlass::layout::ColumnMajor, kAlign,   // B = x^T (K-major)
      float, typename Cfg::Tile, typename Cfg::Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename CollectiveEpilogue::SharedStorage))>,
      typename Cfg::KernelSchedule>::CollectiveOp;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, CollectiveMainloop, CollectiveEpilogue>;
  using Params = typename Kernel::Params;

  // One compressed weight must serve every config: the gmem layouts of A_c and E are functions of SparseConfig.
  static_assert(std::is_same_v<typename CollectiveMainloop::SparseConfig, SparseConfig>,
                "config's sparse metadata layout differs from the canonical one (tile K must be >= 128)");
  static_assert(std::is_same_v<typename CollectiveMainloop::LayoutA, decltype(SparseConfig::deduce_layoutA())>);
  static_assert(std::is_same_v<typename CollectiveMainloop::LayoutE, decltype(SparseConfig::deduce_layoutE())>);
  static_assert(std::is_same_v<typename CollectiveMainloop::ElementE, uint8_t>);

  static typename Kernel::Arguments make_args(const GemmCall& c, int device, int sm_count, int max_clusters) {
    const int M = int(c.m), N = int(c.n), K = int(c.k);
    ProblemShape ps{M, N, K, 1};
    auto stride_b = cutlass::make_cute_packed_stride(typename Kernel::StrideB{}, cute::make_shape(N, K, 1));
    auto stride_c = cutlass::make_cute_packed_stride(typename Kernel::StrideC{}, cute::make_shape(M, N, 1));
    auto stride_d = cutlass::make_cute_packed_stride(typename Kernel::StrideD{}, cute::make_shape(M, N, 1));
    cutlass::KernelHardwareInfo hw{};
    hw.device_id = device;
    hw.sm_count = sm_count;
    hw.max_active_clusters = max_clusters;
    typename Kernel::Arguments args{
        cutlass::gemm::GemmUniversalMode::kGemm,
        ps,
        {static_cast<const half*>(c.values), SparseConfig::fill_layoutA(ps), static_cast<const half*>(c.x),
         stride_b, static_cast<const uint8_t*>(c.meta), SparseConfig::fill_layoutE(ps)},
        {{}, nullptr, stride_c, static_cast<half*>(c.y), stride_d},
        hw};
    args.epilogue.thread.alpha = 1.0f;
    args.epilogue.thread.beta = 0.0f;
    args.epilogue.thread.bias_ptr = static_cast<const half*>(c.bias);  // NULL -> broadcast of 0
    return args;
  }

  // Max co-resident clusters (the persistent scheduler sizes its grid with it); cached per device.
  static int max_active_clusters(int device) {
    constexpr int cluster_size = int(cute::size(typename Cfg::Cluster{}));
    if constexpr (cluster_size == 1) {
      return 0;
    } else {
      static std::atomic<int> cache[64];
      if (device >= 0 && device < 64) {
        int v = cache[device].load(std::memory_order_relaxed);
        if (v != 0) return v > 0 ? v : 0;
      }
      cudaLaunchConfig_t cfg{};
      cfg.gridDim = dim3(cute::size<0>(typename Cfg::Cluster{}), cute::size<1>(typename Cfg::Cluster{}),
                         cute::size<2>(typename Cfg::Cluster{}));
      cfg.blockDim = dim3(Kernel::MaxThreadsPerBlock, 1, 1);
      cfg.dynamicSmemBytes = Kernel::SharedStorageSize;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeClusterDimension;
      attr[0].val.clusterDim.x = cfg.gridDim.x;
      attr[0].val.clusterDim.y = cfg.gridDim.y;
      attr[0].val.clusterDim.z = cfg.gridDim.z;
      cfg.attrs = attr;
      cfg.numAttrs = 1;
      int n = 0;
      if (cudaOccupancyMaxActiveClusters(&n, cutlass::device_kernel<Kernel>, &cfg) != cudaSuccess || n <= 0) {
        (void)cudaGetLastError();
        n = -1;  // unknown: let CUTLASS size the grid from the SM count
      }
      if (device >= 0 && device < 64) cache[device].store(n, std::memory_order_relaxed);
      return n > 0 ? n : 0;
    }
  }

  static int set_smem_attribute(int device) {
    constexpr int smem = Kernel::SharedStorageSize;
    if constexpr (smem < (48 << 10)) {
      return 0;
    } else {
      static std::atomic<uint64_t> done{0};
      const uint64_t bit = (device >= 0 && device < 64) ? (uint64_t(1) << device) : 0;
      if (bit && (done.load(std::memory_order_relaxed) & bit)) return 0;
      cudaError_t e = cudaFuncSetAttribute(cutlass::device_kernel<Kernel>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return fail("cudaFuncSetAttribute(MaxDynamicSharedMemorySize=%d) failed: %s", smem, cudaGetErrorString(e));
      }
      if (bit) done.fetch_or(bit, std::memory_order_relaxed);
      return 0;
    }
  }

  static int run(int op, const GemmCall& c, int64_t* out) {
    if (op == kOpWorkspace || op == kOpCanImplement) {
      // Host-only: no CUDA calls, so these work without a GPU.
      auto args = make_args(c, 0, 1, 0);
      if (op == kOpWorkspace) {
        *out = int64_t(Kernel::get_workspace_size(args));
        return 0;
      }
      if (!Kernel::can_implement(args))
        return fail("CUTLASS can_implement rejected m=%lld n=%lld k=%lld", (long long)c.m, (long long)c.n,
                    (long long)c.k);
      return 0;
    }

    int device = 0, sm_count = 0;
    if (device_info(&device, &sm_count)) return 1;
    if (set_smem_attribute(device)) return 1;  // before the cluster occupancy query, which needs it
    auto args = make_args(c, device, sm_count, max_active_clusters(device));
    if (!Kernel::can_implement(args))
      return fail("CUTLASS can_implement rejected m=%lld n=%lld k=%lld", (long long)c.m, (long long)c.n,
                  (long long)c.k);
    const size_t ws = Kernel::get_workspace_size(args);
    if (ws > 0 && (c.workspace == nullptr || c.workspace_bytes < int64_t(ws)))
      return fail("workspace too small: need %zu bytes, got %lld", ws, (long long)c.workspace_bytes);

    cudaError_t pending = cudaGetLastError();
    if (pending != cudaSuccess)
      return fail("a CUDA error was pending before hfs_gemm (now cleared): %s", cudaGetErrorString(pending));

    cutlass::Status st = Kernel::initialize_workspace(args, c.workspace, c.stream, nullptr);
    if (st != cutlass::Status::kSuccess)
      return fail("initialize_workspace failed: %s", cutlass::cutlassGetStatusString(st));
    Params params = Kernel::to_underlying_arguments(args, c.workspace);

    cudaLaunchConfig_t cfg{};
    cfg.gridDim = Kernel::get_grid_shape(params);
    cfg.blockDim = Kernel::get_block_shape();
    cfg.dynamicSmemBytes = Kernel::SharedStorageSize;
    cfg.stream = c.stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cute::size<0>(typename Cfg::Cluster{});
    attr[0].val.clusterDim.y = cute::size<1>(typename Cfg::Cluster{});
    attr[0].val.clusterDim.z = cute::size<2>(typename Cfg::Cluster{});
    cfg.attrs = attr;
    cfg.numAttrs = int(cute::size(typename Cfg::Cluster{})) > 1 ? 1 : 0;  // CUTLASS launches 1x1x1 plainly
    void* kernel_args[] = {&params};
    cudaError_t e = cudaLaunchKernelExC(&cfg, reinterpret_cast<const void*>(cutlass::device_kernel<Kernel>),
                                        kernel_args);
    cudaError_t last = cudaGetLastError();
    if (e == cudaSuccess) e = last;
    if (e != cudaSuccess)
      return fail("kernel launch failed (grid %u,%u,%u block %u smem %d): %s", cfg.gridDim.x, cfg.gridDim.y,
                  cfg.gridDim.z, cfg.blockDim.x, int(Kernel::SharedStorageSize), cudaGetErrorString(e));
    return 0;
  }
};

template <class Cfg>
int config_op(int op, int gelu, const GemmCall& call, int64_t* out) {
  if (gelu) return SparseGemm<Cfg, cutlass::epilogue::thread::GELU>::run(op, call, out);
  return SparseGemm<Cfg, cutlass::epilogue::thread::Identity>::run(op, call, out);
}

#if !defined(HFS_ONLY_CONFIG) || HFS_ONLY_CONFIG == 0
template int config_op<Config0>(int, int, const GemmCall&, int64_t*);
#endif
#if !defined(HFS_ONLY_CONFIG) || HFS_ONLY_CONFIG == 1
template int config_op<Config1>(int, int, const GemmCall&, int64_t*);
#endif
#if !defined(HFS_ONLY_CONFIG) || HFS_ONLY_CONFIG == 2
template int config_op<Config2>(int, int, const GemmCall&, int64_t*);
#endif
#if !defined(HFS_ONLY_CONFIG) || HFS_ONLY_CONFIG == 3
template int config_op<Config3>(int, int, const GemmCall&, int64_t*);
#endif

}  // namespace hfs
#endif  // !HFS_ONLY_MAIN

// ===========================================================================================================
// Compressor, dispatch table and C ABI (skipped in the per-config TUs)
// ===========================================================================================================
#if !defined(HFS_ONLY_CONFIG)
namespace hfs {

// In the split build config_op<ConfigN> is only declared here and comes from the per-config objects.
using ConfigOpFn = int (*)(int, int, const GemmCall&, int64_t*);
constexpr ConfigOpFn kConfigOps[kNumConfigs] = {&config_op<Config0>, &config_op<Config1>, &config_op<Config2>,
                                                &config_op<Config3>};

thread_local char g_error[512] = "";

int fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return 1;
}

int check_shape(int64_t m, int64_t n, int64_t k) {
  const int64_t kMax = 0x7fffffff;
  if (m <= 0 || k <= 0 || n < 0 || m > kMax || n > kMax || k > kMax)
    return fail("bad shape m=%lld n=%lld k=%lld (need 1 <= m,k <= 2^31-1, 0 <= n <= 2^31-1)", (long long)m,
                (long long)n, (long long)k);
  if (m % 64 != 0) return fail("m=%lld (out_features) must be a multiple of 64", (long long)m);
  if (k % 128 != 0) return fail("k=%lld (in_features) must be a multiple of 128", (long long)k);
  return 0;
}

// Current device, checked to be compute capability 9.0, and its SM count; cached per device.
int device_info(int* device, int* sm_count) {
  static std::atomic<int> cache[64];  // 0 unknown, -1 not sm_90, else SM count
  cudaError_t e = cudaGetDevice(device);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return fail("cudaGetDevice failed: %s", cudaGetErrorString(e));
  }
  const int d = *device;
  int v = (d >= 0 && d < 64) ? cache[d].load(std::memory_order_relaxed) : 0;
  if (v == 0) {
    int major = 0, minor = 0, sms = 0;
    if ((e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d)) != cudaSuccess ||
        (e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, d)) != cudaSuccess ||
        (e = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d)) != cudaSuccess) {
      (void)cudaGetLastError();
      return fail("cudaDeviceGetAttribute failed: %s", cudaGetErrorString(e));
    }
    v = (major == 9 && minor == 0 && sms > 0) ? sms : -(major * 10 + minor) - 1;
    if (d >= 0 && d < 64) cache[d].store(v, std::memory_order_relaxed);
  }
  if (v < 0) return fail("device %d is sm_%d; this library only has sm_90a kernels", d, -v - 1);
  *sm_count = v;
  return 0;
}

// CUTLASS's SM90 compressor encodes an all-zero group of 4 as metadata nibble 0b0000 (index pair (0,0)), which
// is not one of the index pairs that PTX documents for 2:4 fp16 sparse MMA. Rewrite every zero nibble to 0b0100
// (pair (0,1)): both kept values of such a group are 0, so the math is unchanged. Valid groups never encode
// 0b0000 (their two indices differ), and this does not depend on E's reordering (every nibble is one group).
__global__ void fix_zero_groups_kernel(uint32_t* meta, int64_t words) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < words; i += int64_t(gridDim.x) * blockDim.x) {
    uint32_t w = meta[i];
    uint32_t t = w | (w >> 1);
    t |= t >> 2;
    const uint32_t zero_nibbles = ~t & 0x11111111u;  // bit 0 of each nibble that is 0
    meta[i] = w | (zero_nibbles << 2);
  }
}

}  // namespace hfs

// ---------------------------------------------------------------------------------------------------------
HFS_API const char* hfs_last_error(void) { return hfs::g_error; }

HFS_API int hfs_num_configs(void) { return hfs::kNumConfigs; }

HFS_API const char* hfs_config_name(int config) {
  hfs::g_error[0] = '\0';
  if (config < 0 || config >= hfs::kNumConfigs) {
    hfs::fail("config %d out of range [0, %d)", config, hfs::kNumConfigs);
    return nullptr;
  }
  return hfs::kConfigNames[config];
}

HFS_API int hfs_compressed_sizes(int64_t m, int64_t k, int64_t* values_bytes, int64_t* meta_bytes) {
  hfs::g_error[0] = '\0';
  if (hfs::check_shape(m, 0, k)) return 1;
  using Utility = cutlass::transform::kernel::StructuredSparseCompressorUtility<
      hfs::ProblemShape, hfs::half, cutlass::layout::RowMajor, hfs::SparseConfig>;
  Utility u(hfs::ProblemShape{int(m), 1, int(k), 1},
            cute::make_stride(int64_t(k), cute::Int<1>{}, int64_t(0)));
  const int64_t vb = int64_t(u.get_tensorA_m_physical()) * u.get_tensorA_k_physical() * int64_t(sizeof(hfs::half));
  const int64_t mb = int64_t(u.get_metadata_m_physical()) * u.get_metadata_k_physical();
  if (vb != m * k || mb != m * k / 8)  // the documented formulas; holds whenever check_shape passes
    return hfs::fail("internal: unexpected compressed sizes %lld/%lld", (long long)vb, (long long)mb);
  if (values_bytes) *values_bytes = vb;
  if (meta_bytes) *meta_bytes = mb;
  return 0;
}

// The CUTLASS 4.2 SM90 compressor kernel never reads its workspace (get_workspace_size() reports the size of
// its shared-memory staging struct "for backward compatibility with the host compressor"), so none is needed.
HFS_API int64_t hfs_compress_workspace_bytes(int64_t m, int64_t k) {
  hfs::g_error[0] = '\0';
  if (hfs::check_shape(m, 0, k)) return -1;
  return 0;
}

HFS_API int hfs_compress(const void* w, void* values, void* meta, int64_t m, int64_t k, void* workspace,
                         int64_t workspace_bytes, void* stream) {
  (void)workspace;
  (void)workspace_bytes;
  hfs::g_error[0] = '\0';
  if (hfs::check_shape(m, 0, k)) return 1;
  if (!w || !values || !meta) return hfs::fail("hfs_compress: null pointer");
  if (!hfs::aligned16(w) || !hfs::aligned16(values) || !hfs::aligned16(meta))
    return hfs::fail("hfs_compress: w, values and meta must be 16-byte aligned");
  int device = 0, sm_count = 0;
  if (hfs::device_info(&device, &sm_count)) return 1;
  cudaStream_t s = static_cast<cudaStream_t>(stream);

  using Kernel = hfs::CompressorKernel;
  typename Kernel::Arguments args{};
  args.problem_shape = hfs::ProblemShape{int(m), 1, int(k), 1};
  args.transform.ptr_A = w;
  args.transform.dA = cute::make_stride(int64_t(k), cute::Int<1>{}, int64_t(0));
  args.transform.ptr_ACompress = values;
  args.transform.ptr_E = meta;
  args.hw_info.device_id = device;
  args.hw_info.sm_count = sm_count;
  if (Kernel::can_implement(args) != cutlass::Status::kSuccess)
    return hfs::fail("compressor can_implement rejected m=%lld k=%lld", (long long)m, (long long)k);

  cudaError_t pending = cudaGetLastError();
  if (pending != cudaSuccess)
    return hfs::fail("a CUDA error was pending before hfs_compress (now cleared): %s", cudaGetErrorString(pending));

  typename Kernel::Params params = Kernel::to_underlying_arguments(args, nullptr);
  constexpr int smem = Kernel::SharedStorageSize;
  static_assert(smem < (48 << 10), "compressor smem would need cudaFuncSetAttribute");
  cutlass::device_kernel<Kernel><<<Kernel::get_grid_shape(params), Kernel::get_block_shape(), smem, s>>>(params);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return hfs::fail("compressor launch failed: %s", cudaGetErrorString(e));

  const int64_t words = m * k / 8 / 4;  // meta bytes / 4
  const int blocks = int(std::min<int64_t>((words + 255) / 256, int64_t(sm_count) * 8));
  hfs::fix_zero_groups_kernel<<<blocks, 256, 0, s>>>(static_cast<uint32_t*>(meta), words);
  e = cudaGetLastError();
  if (e != cudaSuccess) return hfs::fail("metadata fix-up launch failed: %s", cudaGetErrorString(e));
  return 0;
}

static int hfs_prepare(int config, int gelu, int64_t m, int64_t n, int64_t k) {
  hfs::g_error[0] = '\0';
  if (config < 0 || config >= hfs::kNumConfigs)
    return hfs::fail("config %d out of range [0, %d)", config, hfs::kNumConfigs);
  if (gelu != 0 && gelu != 1) return hfs::fail("gelu must be 0 or 1, got %d", gelu);
  return hfs::check_shape(m, n, k);
}

HFS_API int64_t hfs_gemm_workspace_bytes(int config, int gelu, int64_t m, int64_t n, int64_t k) {
  if (hfs_prepare(config, gelu, m, n, k)) return -1;
  if (n == 0) return 0;
  hfs::GemmCall c{nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, nullptr, 0, nullptr};
  int64_t bytes = -1;
  if (hfs::kConfigOps[config](hfs::kOpWorkspace, gelu, c, &bytes)) return -1;
  return bytes;
}

HFS_API int hfs_can_implement(int config, int gelu, int64_t m, int64_t n, int64_t k) {
  if (hfs_prepare(config, gelu, m, n, k)) return 1;
  if (n == 0) return 0;
  hfs::GemmCall c{nullptr, nullptr, nullptr, nullptr, nullptr, m, n, k, nullptr, 0, nullptr};
  return hfs::kConfigOps[config](hfs::kOpCanImplement, gelu, c, nullptr);
}

HFS_API int hfs_gemm(int config, int gelu, const void* values, const void* meta, const void* x, const void* bias,
                     void* y, int64_t m, int64_t n, int64_t k, void* workspace, int64_t workspace_bytes,
                     void* stream) {
  if (hfs_prepare(config, gelu, m, n, k)) return 1;
  if (n == 0) return 0;
  if (!values || !meta || !x || !y) return hfs::fail("hfs_gemm: null values/meta/x/y pointer");
  if (!hfs::aligned16(values) || !hfs::aligned16(meta) || !hfs::aligned16(x) || !hfs::aligned16(y) ||
      !hfs::aligned16(bias))
    return hfs::fail("hfs_gemm: values, meta, x, y and bias must be 16-byte aligned");
  hfs::GemmCall c{values, meta, x, bias, y, m, n, k, workspace, workspace_bytes, static_cast<cudaStream_t>(stream)};
  return hfs::kConfigOps[config](hfs::kOpRun, gelu, c, nullptr);
}

#endif  // !HFS_ONLY_CONFIG

// Reports which architecture-specific features a build was compiled with: tests assert that
// sm_90a builds get Hopper's (wgmma, setmaxnreg) and that the plain targets do not.
#include "common.cuh"

#if defined(EXPECT_SM90A) && EXPECT_SM90A && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "built for sm_90a without __CUDA_ARCH_FEAT_SM90_ALL"
#endif

extern "C" __global__ void arch_probe(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  out[0] = 1;
#else
  out[0] = 0;
#endif
  out[1] = __CUDA_ARCH__;
}

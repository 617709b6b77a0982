#define FD_ISA avx2
#define FD_ISA_IS_AVX2 1
#include "../isa_begin.h"
#include "../attention_impl.h"

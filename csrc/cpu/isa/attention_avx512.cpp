#define FD_ISA avx512
#define FD_ISA_IS_AVX512 1
#include "../isa_begin.h"
#include "../attention_impl.h"

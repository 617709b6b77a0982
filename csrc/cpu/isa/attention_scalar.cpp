#define FD_ISA scalar
#define FD_ISA_IS_SCALAR 1
#include "../isa_begin.h"
#include "../attention_impl.h"

// The CPU kernels for any x86-64 / other CPU (the compiler's baseline instruction set).
#define CPU_CAPABILITY DEFAULT
#include "kernels.inl"

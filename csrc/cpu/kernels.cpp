// Picks the CPU kernel table for the instruction set torch uses on this machine.
#include "kernels.h"

#include <ATen/Version.h>

#include <string>

namespace recallprune::cpu {

const KernelTable& kernels() {
  static const KernelTable* table = [] {
    const std::string capability = at::get_cpu_capability();
    if (capability == "AVX512") return AVX512::table();
    if (capability == "AVX2") return AVX2::table();
    return DEFAULT::table();
  }();
  return *table;
}

}  // namespace recallprune::cpu

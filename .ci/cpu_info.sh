#!/usr/bin/env bash
# Prints the CPU model, its vector/matrix extensions and the kernel level PyTorch will pick (ATEN_CPU_CAPABILITY).
model=$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')
flags=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -E '^(avx2|avx512f|avx512_bf16|avx512_fp16|amx_[a-z0-9]+)$' | tr '\n' ' ')
echo "cpu: ${model:-unknown} ($(nproc) cores); flags: ${flags:-none of avx2/avx512/amx}; ATEN_CPU_CAPABILITY=${ATEN_CPU_CAPABILITY:-native}"

"""The megatron-core runtime: model construction (`model`), process groups (`parallel`), the
training loop (`training`), checkpoints (`checkpoint`), tensor-parallel shards of parameters
(`shards`), run directories (`run_dir`), the CPU workarounds megatron-core needs without
CUDA (`cpu_compat`) and a CPU run's allocator settings (`host_memory`)."""

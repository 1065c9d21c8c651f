"""Benchmarks: numbers printed by real runs, never asserted by tests.

  python -m experiments.bench               every ladder step's training step, JAX beside timm
  python -m experiments.bench.gpu_check     the acceptance run on a GPU (stages a-d; e, f alone)
  python -m experiments.bench.data          the input pipeline's images/s
  python -m experiments.bench.depthwise     the depthwise conv's implementations
  python -m experiments.bench.seeds         several seeds per device: one vmapped program or
                                            processes sharing it
"""

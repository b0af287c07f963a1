"""CM3Leon-style retrieval-augmented token decoders for text and images, in JAX/Flax."""

from cm3leon_jax.parallel.platform import describe_host_without_tpu

describe_host_without_tpu()

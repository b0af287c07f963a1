"""Ahead-of-time compilation for TPU pods that are not attached (`cm3leon compile`): the real
train and generation steps, compiled by libtpu for a named topology, with memory and cost."""

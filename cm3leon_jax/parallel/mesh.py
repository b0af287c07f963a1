"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters are annotated with parameter axis names (`embed`, `mlp`, ...), activations with
`act_*` names. They are separate because the batch already uses the `fsdp` mesh axis:
an activation's embedding dimension must not be split over `fsdp` a second time, while a
weight's embedding dimension is (that is what makes it FSDP).
"""

from __future__ import annotations

import jax
from flax import linen as nn
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from cm3leon_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH = ("data", "fsdp")  # mesh axes the batch is split over

RULES = (
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("pos", None),
    ("layers", None),
    # activations
    ("act_batch", BATCH),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_head_dim", None),
    ("act_vocab", "tensor"),
)


def make_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), in JAX's
    topology-aware device order (on TPU, `tensor` gets the best-connected chips).

    Devices of several TPU slices: the slices split `data` (else `fsdp`), so only that
    axis's collectives cross the data-centre network.
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
        dcn = _across_slices(shape, slices)
        grid = mesh_utils.create_hybrid_device_mesh(
            [s // d for s, d in zip(shape, dcn)], dcn, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def _across_slices(shape: tuple[int, ...], slices: int) -> list[int]:
    for i in (0, 1):  # data, then fsdp
        if shape[i] % slices == 0:
            return [slices if j == i else 1 for j in range(len(shape))]
    raise ConfigError(f"mesh: {slices} slices divide neither mesh.data={shape[0]} nor "
                      f"mesh.fsdp={shape[1]}; make one of them a multiple of {slices}")


def spec(axes: tuple[str | None, ...]) -> P:
    """Logical axis names -> PartitionSpec, through RULES."""
    unknown = [a for a in axes if a is not None and a not in dict(RULES)]
    if unknown:
        raise KeyError(f"logical axes {unknown} have no rule in parallel.mesh.RULES")
    return nn.logical_to_mesh_axes(axes, RULES)


def is_axes(x) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def shardings(axes_tree, mesh: Mesh):
    """A tree of logical-axes tuples -> a tree of NamedShardings."""
    return jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), axes_tree, is_leaf=is_axes)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH, *([None] * (ndim - 1))))


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin an activation's layout inside jit; a no-op when no mesh is set."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec(axes))


def global_batch(local: dict, mesh: Mesh) -> dict:
    """This process's rows -> global arrays split over the batch axes of `mesh`."""
    return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
            for k, v in local.items()}

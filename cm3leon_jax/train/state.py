"""The train state (step, parameters, optimizer state) and how it is laid out on a mesh.

The model is only ever built abstractly on the host (`nnx.eval_shape`); the real arrays are
created inside one jitted function whose `out_shardings` come from the rule table, so every
device materialises only its own shards — no parameter is ever whole on one device.
Parameters travel as a plain nested dict; `nnx.merge(graphdef, params)` rebuilds the model
inside jitted code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from cm3leon_jax.config import Config
from cm3leon_jax.model.transformer import Transformer
from cm3leon_jax.parallel import mesh as mesh_lib
from cm3leon_jax.train.optimizer import make_optimizer


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: dict
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class ModelDef:
    """What is needed to rebuild the model from a params dict, and where its axes go."""
    graphdef: Any
    param_axes: dict  # same tree as params, leaves = logical axis-name tuples
    abstract_params: dict  # same tree, leaves = ShapeDtypeStruct

    def bind(self, params: dict) -> Transformer:
        return nnx.merge(self.graphdef, params)

    def param_shardings(self, mesh: Mesh) -> dict:
        return mesh_lib.shardings(self.param_axes, mesh)


def _new_model(cfg: Config, seed: int) -> Transformer:
    with nnx.use_eager_sharding(False):
        return Transformer(cfg.model, cfg.vocab.build().size, rngs=nnx.Rngs(seed))


def model_def(cfg: Config) -> ModelDef:
    # Under `jax.set_mesh`, nnx.eval_shape would turn the *logical* axis names into mesh
    # shardings (and fail on `layers`); the abstract model needs no mesh at all.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        abstract = nnx.eval_shape(lambda: _new_model(cfg, 0))
    graphdef, state = nnx.split(abstract)
    axes = jax.tree.map(lambda v: v.get_metadata()["out_sharding"], state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return ModelDef(graphdef, nnx.to_pure_dict(axes), nnx.to_pure_dict(state))


def init_params(cfg: Config, seed: int) -> dict:
    """The real initial parameters; call under jit with out_shardings."""
    return nnx.to_pure_dict(nnx.state(_new_model(cfg, seed)))


def _init_state(cfg: Config, tx: optax.GradientTransformation) -> TrainState:
    params = init_params(cfg, cfg.train.seed)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def state_shardings(cfg: Config, mdef: ModelDef, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
    abstract = jax.eval_shape(lambda: _init_state(cfg, tx))
    params = mdef.param_shardings(mesh)
    replicated = NamedSharding(mesh, P())
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract.opt_state, params,
                                transform_non_params=lambda _: replicated)
    return TrainState(step=replicated, params=params, opt_state=opt)


class StateLayout(NamedTuple):
    """What building, restoring or compiling a config's train state on a mesh needs."""
    tx: optax.GradientTransformation
    mdef: ModelDef
    shardings: TrainState


def state_layout(cfg: Config, mesh) -> StateLayout:
    """The optimizer, the model definition and the train state's shardings on `mesh` (a
    Mesh or an AbstractMesh)."""
    tx = make_optimizer(cfg.optimizer, cfg.train.steps)
    mdef = model_def(cfg)
    return StateLayout(tx, mdef, state_shardings(cfg, mdef, tx, mesh))


def abstract_state(cfg: Config, tx: optax.GradientTransformation | None = None,
                   shardings: TrainState | None = None) -> TrainState:
    """ShapeDtypeStructs of the whole train state (with shardings when given)."""
    tx = tx or make_optimizer(cfg.optimizer, cfg.train.steps)
    abstract = jax.eval_shape(lambda: _init_state(cfg, tx))
    if shardings is None:
        return abstract
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def create_state(cfg: Config, tx: optax.GradientTransformation, shardings: TrainState):
    """Initial train state, created directly in its sharded layout."""
    return jax.jit(lambda: _init_state(cfg, tx), out_shardings=shardings)()


def state_from_params(params: dict, tx: optax.GradientTransformation,
                      shardings: TrainState) -> TrainState:
    """A fresh train state (step 0, new optimizer state) around given parameters, e.g. an
    export to fine-tune from."""
    return jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p,
                                        opt_state=tx.init(p)),
                   out_shardings=shardings, donate_argnums=0)(params)


def tree_bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (or arrays)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def state_bytes_per_device(cfg: Config, num_devices: int) -> int:
    """Train-state bytes one device holds on the config's mesh of `num_devices`; needs no
    devices (an abstract mesh of that shape)."""
    shape = cfg.mesh.shape(num_devices)
    mesh = AbstractMesh(shape, mesh_lib.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))
    tx, _, shardings = state_layout(cfg, mesh)
    return shard_bytes(abstract_state(cfg, tx, shardings))

"""Device mesh, logical-axis rules and shardings.

Params and activations are named with logical axes (`embed`, `mlp`, `act_batch`, ...); the
config's `sharding.rules` map each logical name to mesh axes. The mesh is the only thing that
changes between a laptop and a pod.
"""

from collections.abc import Iterator, Sequence
import contextlib
import math
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from fm import ConfigError

AXES = ('data', 'fsdp', 'sequence', 'tensor')  # The mesh axes the rules below name.
# Logical name -> mesh axes. Params use the model's names; activations use `act_*` names so
# that the batch can take (data, fsdp) while weights take fsdp on their embed dimension.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
  ('act_batch', ('data', 'fsdp')),
  ('act_length', 'sequence'),  # Long sequences: activations split along their length.
  ('act_embed', None),
  ('act_heads', 'tensor'),
  ('act_kv_heads', 'tensor'),
  ('act_mlp', 'tensor'),
  ('act_vocab', 'tensor'),
  ('embed', 'fsdp'),
  ('vocab', 'tensor'),
  ('mlp', 'tensor'),
  ('heads', 'tensor'),
  ('kv_heads', 'tensor'),
  ('head_dim', None),
  ('norm', None),
  ('layers', None),
)


@contextlib.contextmanager
def use(mesh: Mesh, rules) -> Iterator[None]:
  """The mesh and the logical rules in effect: what init, steps and constraints are traced in."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` (one axis may be -1, meaning "the rest") against the device count."""
  shape = {}
  for name, size in mesh_cfg.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(
        f'config.mesh.{name}={size!r} must be a positive integer or -1 ("the rest").'
      )
    shape[name] = size
  rest = [n for n, s in shape.items() if s == -1]
  if len(rest) > 1:
    raise ConfigError(f'config.mesh has -1 on {", ".join(rest)}; at most one axis may be -1.')
  fixed = math.prod(s for s in shape.values() if s != -1)
  if rest:
    if num_devices % fixed:
      raise ConfigError(
        f'config.mesh fixes {fixed} devices ({_fmt(shape)}), which does not divide the '
        f'{num_devices} devices available; choose axis sizes whose product divides {num_devices}.'
      )
    shape[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
      f'config.mesh ({_fmt(shape)}) spans {fixed} devices but '
      f'{"1 is" if num_devices == 1 else f"{num_devices} are"} available; '
      f'make the product of the axis sizes {num_devices}, or set one axis to -1.'
    )
  return shape


def _fmt(shape: dict[str, int]) -> str:
  return ','.join(f'{k}={v}' for k, v in shape.items())


def make_mesh(
  mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  # Auto axes: linen's logical constraints do not work under the Explicit default.
  return jax.make_mesh(
    tuple(shape.values()),
    tuple(shape.keys()),
    axis_types=(AxisType.Auto,) * len(shape),
    devices=devices,
  )


def local_mesh() -> Mesh:
  """A mesh of this process's first device, for tools that read a checkpoint whole (LoRA merge,
  Hugging Face export)."""
  return make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1)), jax.devices()[:1])


def rules_from_config(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """Default rules, with `config.sharding.rules` (a list of [name, axes]) taking precedence."""
  overrides = [tuple(r) for r in config.sharding.rules]
  names = {name for name, _ in overrides}
  return tuple(overrides) + tuple(r for r in DEFAULT_RULES if r[0] not in names)


def _fit(spec: P, shape: Sequence[int], mesh_shape: dict[str, int]) -> P:
  """Drops mesh axes from dimensions they do not divide (those dimensions stay replicated)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if a in mesh_shape)
    size = math.prod(mesh_shape[a] for a in names)
    if not names or dim % size:
      out.append(None)
    else:
      out.append(names[0] if len(names) == 1 else names)
  return P(*out)


def logical_to_sharding(logical: P, shape: Sequence[int], mesh: Mesh, rules) -> NamedSharding:
  spec = nn.logical_to_mesh_axes(tuple(logical), rules)
  return NamedSharding(mesh, _fit(spec, shape, dict(mesh.shape)))


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a pytree whose leaves are `nn.LogicallyPartitioned` or plain arrays.

  Leaves without logical names (optimizer counts, the step, rng keys) are replicated.
  """

  def one(leaf):
    if isinstance(leaf, nn.Partitioned):
      return logical_to_sharding(leaf.get_partition_spec(), leaf.value.shape, mesh, rules)
    return NamedSharding(mesh, P())

  return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def unbox(tree: Any) -> Any:
  """Strips logical-axis boxes (no sharding constraint), e.g. from `jax.eval_shape` output."""
  return jax.tree.map(
    lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nn.Partitioned),
  )


def constrain(x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
  """Activation sharding constraint by logical names; a no-op outside a mesh context."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return x
  spec = _fit(nn.logical_to_mesh_axes(logical_axes, rules), x.shape, dict(mesh.shape))
  return jax.lax.with_sharding_constraint(x, spec)


def split(logical_axis: str) -> bool:
  """Whether the mesh in context splits activations along `logical_axis` (e.g. act_length)."""
  mesh = jax.sharding.get_abstract_mesh()
  rules = nn.get_logical_axis_rules()
  if mesh.empty or not rules:
    return False
  return any(dict(mesh.shape).get(a, 1) > 1 for a in mesh_axes(logical_axis, rules))


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Host batches are split over the batch axes; other dimensions are replicated (the default
  one-dimensional spec fits arrays of any rank)."""
  spec = nn.logical_to_mesh_axes(('act_batch',) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def mesh_axes(logical_axis: str, rules) -> tuple[str, ...]:
  """The mesh axes `rules` map a logical axis to (none, one or several)."""
  axes = nn.logical_to_mesh_axes((logical_axis,), rules)[0]
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def batch_axes(rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over."""
  return mesh_axes('act_batch', rules)


def batch_divisor(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split; the global batch must be a multiple of it."""
  return math.prod(mesh.shape[a] for a in batch_axes(rules))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh, rules) -> dict[str, jax.Array]:
  """Assembles each host's local rows into global arrays sharded over the batch axes."""
  return {
    k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
    for k, v in batch.items()
  }

"""Device mesh and logical axis names.

Every weight carries logical axis names in its variable metadata (`logical_axes`, e.g. ("embed", "mlp")) and the
main activations are constrained with `constrain(x, "batch", "length", "act_embed")`. One rules table in the
config (`cfg.sharding.rules`) maps each logical name to mesh axes (data, fsdp, tensor), in the style of
big_vision/maxtext:

    ("batch", ("data", "fsdp"))   # samples over the data-parallel and the FSDP axes
    ("embed", "fsdp")             # FSDP: the model dimension of every weight is split over the fsdp axis
    ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")   # tensor (Megatron-style) parallelism

The training state is created inside `jax.jit` with these shardings as `out_shardings`, so parameters and optimizer
state are born sharded: the full state never has to fit on one device.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterable, Sequence

import jax
import ml_collections
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# The default table (configs/demo.py copies it into cfg.sharding.rules). A name mapped to None is replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("act_embed", None),  # the model dimension of activations (replicated; tensor parallel splits heads/mlp)
    ("length", None),
    ("anatomy", None),
    ("proj", None),
    ("patch", None),
    ("norm", None),
)


def logical(*names: str | None) -> dict:
    """Variable metadata naming the logical axes of a weight: nnx.Linear(..., kernel_metadata=logical(...))."""
    return {"logical_axes": tuple(names)}


def rules_dict(rules: Iterable[Sequence]) -> dict[str, tuple[str, ...]]:
    out = {}
    for name, axes in rules:
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        unknown = set(axes) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"sharding rule {name!r} -> {axes}: unknown mesh axes {sorted(unknown)}; "
                             f"the mesh axes are {MESH_AXES}")
        out[name] = axes
    return out


def logical_to_spec(names: Sequence[str | None], rules, shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> P:
    """PartitionSpec for an array with these logical axis names.

    A mesh axis is used at most once per array (later dimensions lose it). With `shape` and `mesh`, mesh axes that
    do not divide a dimension are dropped for that dimension (it stays replicated there) instead of failing.
    """
    table = rules if isinstance(rules, dict) else rules_dict(rules)
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in cfg.sharding.rules (rules: {sorted(table)})")
        axes = [a for a in table[name] if a not in used]
        if shape is not None and mesh is not None:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return P(*spec)


def make_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The (data, fsdp, tensor) mesh of cfg.mesh; data = -1 takes the devices the other axes leave."""
    fsdp, tensor = int(cfg.mesh.fsdp), int(cfg.mesh.tensor)
    n_dev = jax.device_count()
    if fsdp < 1 or tensor < 1 or n_dev % (fsdp * tensor):
        raise ValueError(f"mesh fsdp={fsdp} x tensor={tensor} does not divide the {n_dev} visible devices")
    data = n_dev // (fsdp * tensor) if cfg.mesh.data == -1 else int(cfg.mesh.data)
    shape = (data, fsdp, tensor)
    n = math.prod(shape)
    if data < 1 or n > n_dev:
        raise ValueError(f"mesh data x fsdp x tensor = {shape} needs {n} devices; {n_dev} are visible")
    if n < n_dev and jax.process_count() > 1:
        # jax.devices()[:n] would leave whole hosts without a device, and their batches nowhere to go.
        raise ValueError(f"mesh data x fsdp x tensor = {shape} uses {n} of the {n_dev} devices of this "
                         f"{jax.process_count()}-process job: with several processes the mesh must use every device "
                         "(mesh.data=-1 does)")
    batch_shards = data * fsdp
    if cfg.train.batch_size % batch_shards:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} is not divisible by the {batch_shards} batch "
                         f"shards of the mesh (data={data} x fsdp={fsdp})")
    auto = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=jax.devices()[:n])


# Rules in effect while tracing the model (set by the trainer; none outside it, e.g. in the exported Predictor).
_active = threading.local()


@contextlib.contextmanager
def axis_rules(rules):
    old = getattr(_active, "rules", None)
    _active.rules = rules_dict(rules)
    try:
        yield
    finally:
        _active.rules = old


def _active_rules_and_mesh():
    """(rules table, abstract mesh) while tracing under both, else None."""
    rules = getattr(_active, "rules", None)
    mesh = jax.sharding.get_abstract_mesh()
    return None if rules is None or mesh.empty else (rules, mesh)


def active_mesh_axes(name: str) -> tuple[str, ...]:
    """The mesh axes the active rules map logical axis `name` to (empty without active rules or mesh)."""
    active = _active_rules_and_mesh()
    return () if active is None else tuple(active[0].get(name, ()))


def active_mesh_size(name: str) -> int:
    """How many ways the active rules and mesh split logical axis `name` (1 without active rules or mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in active_mesh_axes(name))


def constrain(x, *names: str | None):
    """with_sharding_constraint by logical names, when a mesh and rules are active; the identity otherwise."""
    active = _active_rules_and_mesh()
    if active is None:
        return x
    rules, mesh = active
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, x.shape, mesh))


def state_shardings(tree, mesh: jax.sharding.Mesh, rules):
    """NamedShardings for a (possibly abstract) tree of nnx Variables and plain arrays.

    Variables are sharded by their `logical_axes` metadata (optimizer moments inherit the metadata of their
    parameter); everything else (step counters, unnamed scalars) is replicated.
    """
    table = rules_dict(rules)

    def one(x):
        if isinstance(x, nnx.Variable):
            names = x.get_metadata().get("logical_axes")
            shape = x.get_value().shape
            if names is None:
                spec = P()
            elif len(names) != len(shape):
                raise ValueError(f"logical axes {names} do not match a weight of shape {shape}")
            else:
                spec = logical_to_spec(names, table, shape, mesh)
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def unnamed_weights(state) -> list[str]:
    """Paths of parameters without logical axis names (a test keeps this list empty)."""
    out = []
    for path, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
        if isinstance(v, nnx.Variable) and v.get_metadata().get("logical_axes") is None:
            out.append(jax.tree_util.keystr(path))
    return out

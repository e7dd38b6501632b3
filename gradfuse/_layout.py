"""Where this rank's gradients sit in a model spread over processes: the distributed layout.

A call is distributed when a gradient is a DTensor or ``group=`` is given. Its layout says which
local tensors this rank counts in the norm, over which process group the one collective runs, and
how DTensors group by mesh (for the per-tensor reductions of p=0 and of global per-layer norms):

* a DTensor contributes its local shard; on a mesh dimension where it is ``Replicate``, only the
  rank at coordinate 0 counts it (an exact mask, never a 1/n weight); ``Shard`` and
  ``_StridedShard`` dimensions hold distinct pieces, counted by every rank; ``Partial`` is refused
  (its local value is a pending sum, so its norm is not the sum of local norms);
* a plain tensor is whole on this rank and counted here unless listed in ``exclude_from_norm``
  (a copy that another rank of the group counts);
* the group is ``group=`` when given (it must contain every mesh), else the union of the meshes'
  ranks: the mesh's own group when one mesh dimension spans it, ``WORLD`` when it is every rank,
  otherwise a group created once for those ranks (``new_group(use_local_synchronization=True)``:
  only its members take part) and cached.

DTensors on meshes that are proper subsets of the group (pipeline stages, expert groups) must be
distinct parameters: a copy of a parameter held outside its mesh is invisible in its placements,
so it is counted again unless listed in ``exclude_from_norm``. Layouts are cached by the meshes'
identities, placements, devices, the group and the exclusions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import torch.distributed as dist

    _HAS_DIST = dist.is_available()
except ImportError:  # pragma: no cover - builds without torch.distributed
    _HAS_DIST = False


def _dtensor_api():
    """(DTensor, Replicate, the shard placement types), wherever this torch keeps them."""
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor import placement_types as pt
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import DTensor
        from torch.distributed._tensor import placement_types as pt
    shards = tuple(t for t in (getattr(pt, "Shard", None), getattr(pt, "_StridedShard", None)) if t is not None)
    return DTensor, pt.Replicate, shards


_API = None


def dtensor_api():
    global _API
    if _API is None:
        _API = _dtensor_api()
    return _API


def is_dtensor(t) -> bool:
    return _HAS_DIST and type(t) is not torch.Tensor and isinstance(t, dtensor_api()[0])


def has_dtensors(tensors) -> bool:
    """Whether any of ``tensors`` is a DTensor (one set lookup when all are plain tensors)."""
    return _HAS_DIST and set(map(type, tensors)) != {torch.Tensor} and any(map(is_dtensor, tensors))


def refuse_dtensors(params, fn: str) -> None:
    """Per-tensor and per-unit clipping need whole tensors: a shard's norm is not its layer's."""
    if has_dtensors(params):
        raise ValueError(
            f"{fn}: DTensor (sharded) parameters are not supported: a local shard's norm is not its layer's; "
            "clip globally (gradfuse.clip_grad_norm_ takes DTensors)"
        )


def local_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """This rank's part of each tensor: a DTensor's local shard, a plain tensor itself."""
    return [t._local_tensor if is_dtensor(t) else t for t in tensors]


# --------------------------------------------------------------------------------------------------
# group= and process groups


def check_group(group, fn: str):
    """``group=``: None, a ProcessGroup or a 1-D DeviceMesh (taken as its group) this rank is in."""
    if group is None:
        return None
    if not _HAS_DIST or not dist.is_initialized():
        raise RuntimeError(f"{fn}: group= needs an initialised torch.distributed process group")
    from torch.distributed.device_mesh import DeviceMesh

    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"{fn}: group= takes a ProcessGroup or a 1-D DeviceMesh, got a {group.ndim}-D mesh; pass "
                "mesh._flatten() (a 1-D mesh over the same ranks) or a ProcessGroup over its ranks"
            )
        group = group.get_group()
    if group is dist.GroupMember.NON_GROUP_MEMBER:  # what new_group returns on the ranks left out
        raise ValueError(f"{fn}: this rank ({dist.get_rank()}) is not a member of the group given as group=")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, not {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{fn}: this rank ({dist.get_rank()}) is not a member of the group given as group=")
    return group


_GROUP_RANKS: dict[int, tuple] = {}  # id(group) -> (group, sorted global ranks); the group kept alive
_CREATED: dict[tuple[int, ...], object] = {}  # rank sets -> the group created for them
_MESH_RANKS: dict[int, tuple] = {}  # id(mesh) -> (mesh, sorted global ranks)


def group_ranks(group) -> tuple[int, ...]:
    entry = _GROUP_RANKS.get(id(group))
    if entry is None or entry[0] is not group:
        entry = _GROUP_RANKS[id(group)] = (group, tuple(sorted(dist.get_process_group_ranks(group))))
    return entry[1]


def _mesh_ranks(mesh) -> tuple[int, ...]:
    entry = _MESH_RANKS.get(id(mesh))
    if entry is None or entry[0] is not mesh:
        # The mesh's rank table is a CPU tensor (never a device's): read it outside any dispatch
        # mode (a sub-mesh indexes its parent's table, which a sync counter would take for a sync).
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():
            ranks = tuple(sorted(mesh.mesh.flatten().tolist()))
        entry = _MESH_RANKS[id(mesh)] = (mesh, ranks)
    return entry[1]


def group_for(ranks: tuple[int, ...], meshes) -> object:
    """A process group over exactly ``ranks`` (sorted global ranks): a mesh dimension's own group,
    WORLD, or one created for them once."""
    for mesh in meshes:
        for dim in range(mesh.ndim):
            if mesh.size(dim) == len(ranks) and _mesh_ranks(mesh) == ranks:
                return mesh.get_group(dim)
    if len(ranks) == dist.get_world_size():
        return dist.group.WORLD
    if ranks not in _CREATED:
        _CREATED[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _CREATED[ranks]


def collective_device(group) -> torch.device:
    """Where a rank holding no gradient builds its part of the collective."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend or "cuda:" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# The layout


@dataclass(frozen=True, eq=False)
class MeshSet:
    """The DTensor gradients whose meshes cover the same ranks."""

    ranks: tuple[int, ...]
    group: object
    indices: torch.Tensor  # int64, on the layout's device
    leader: bool  # this rank is the set's lowest rank: it counts a per-set result once


@dataclass(frozen=True, eq=False)
class Layout:
    group: object  # the ProcessGroup of the one collective
    ranks: tuple[int, ...]  # its sorted global ranks
    device: torch.device  # where the partials and the collective's buffer live
    counted: tuple[bool, ...]  # gradient t counts in the norm on this rank
    mask: torch.Tensor | None  # the same as a bool device tensor; None when every one counts
    mesh_sets: tuple[MeshSet, ...]  # in one global order (deadlock-free on every rank)
    plain: torch.Tensor  # int64 indices of the plain tensors (whole on this rank)
    total_mesh: object | None  # the mesh a DTensor total is returned on (the first DTensor's)
    meshes: tuple  # every mesh involved (kept alive: the cache key holds their ids)


_LAYOUTS: dict[tuple, Layout] = {}
_LAYOUT_CACHE_SIZE = 16


def _spec(g):
    if not is_dtensor(g):
        return None
    spec = g._spec
    return (id(spec.mesh), tuple(spec.placements))


def layout_of(grads: list[torch.Tensor], group, excluded: tuple[int, ...], fn: str) -> Layout:
    """The layout of ``grads`` (``group``: from :func:`check_group`; ``excluded``: indices of the
    gradients this rank does not count), cached."""
    device = grads[0].device if grads else collective_device(group)
    key = (id(group), device, tuple(map(_spec, grads)), excluded)
    lay = _LAYOUTS.get(key)
    if lay is not None and (group is None or lay.group is group):
        return lay
    lay = _build(grads, group, set(excluded), device, fn)
    _LAYOUTS[key] = lay
    if len(_LAYOUTS) > _LAYOUT_CACHE_SIZE:
        del _LAYOUTS[next(iter(_LAYOUTS))]
    return lay


def _counts_here(g, i: int, fn: str) -> bool:
    """Whether this rank counts its shard of DTensor gradient ``i``."""
    _, replicate, shards = dtensor_api()
    mesh, placements = g.device_mesh, g.placements
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise ValueError(f"{fn}: gradient {i} is a DTensor on a mesh that does not include this rank ({dist.get_rank()})")
    counted = True
    for dim, placement in enumerate(placements):
        if placement.is_partial():
            raise ValueError(
                f"{fn}: gradient {i} (shape {list(g.shape)}) is a DTensor with a Partial placement on mesh dimension "
                f"{dim}: its local values are a pending sum over ranks. Reduce it first "
                "(grad.redistribute(placements=[Replicate() or Shard(d), ...])) before clipping"
            )
        if isinstance(placement, replicate):
            counted = counted and coordinate[dim] == 0
        elif not isinstance(placement, shards):
            raise ValueError(f"{fn}: gradient {i} has the placement {placement!r}, which gradfuse does not know how to count")
    return counted


def _build(grads, group, excluded: set[int], device: torch.device, fn: str) -> Layout:
    meshes, by_ranks, counted, plain = [], {}, [], []
    total_mesh = None
    for i, g in enumerate(grads):
        if is_dtensor(g):
            mesh = g.device_mesh
            if not any(m is mesh for m in meshes):
                meshes.append(mesh)
            total_mesh = total_mesh or mesh
            counted.append(_counts_here(g, i, fn) and i not in excluded)
            by_ranks.setdefault(_mesh_ranks(mesh), []).append(i)
        else:
            counted.append(i not in excluded)
            plain.append(i)
    if plain and group is None:  # torch's type: its stack of mixed norms raises a RuntimeError
        raise RuntimeError(
            f"{fn}: gradient {plain[0]} is a plain tensor among DTensor gradients; make it a DTensor (e.g. "
            "Replicate() on its mesh), or pass group= to say that plain tensors are this rank's part of a "
            "model spread over that group"
        )
    if len({m.device_type for m in meshes}) > 1:
        raise RuntimeError(f"{fn}: the DTensor gradients are on meshes of several device types ({sorted({m.device_type for m in meshes})})")
    union = tuple(sorted(set().union(*by_ranks))) if by_ranks else ()
    if group is not None:
        ranks = group_ranks(group)
        outside = sorted(set(union) - set(ranks))
        if outside:
            raise ValueError(f"{fn}: the DTensor gradients' meshes include ranks {outside}, which are not in the group given as group=")
    else:
        ranks, group = union, group_for(union, meshes)
    here = dist.get_rank()
    mesh_sets = tuple(
        MeshSet(r, group if r == ranks else group_for(r, [m for m in meshes if _mesh_ranks(m) == r]),
                torch.tensor(idx, dtype=torch.int64, device=device), leader=here == r[0])  # fmt: skip
        for r, idx in sorted(by_ranks.items())
    )
    mask = None if all(counted) else torch.tensor(counted, dtype=torch.bool, device=device)
    return Layout(
        group=group,
        ranks=ranks,
        device=device,
        counted=tuple(counted),
        mask=mask,
        mesh_sets=mesh_sets,
        plain=torch.tensor(plain, dtype=torch.int64, device=device),
        total_mesh=total_mesh,
        meshes=tuple(meshes),
    )


def check_scaler_group(scaler_group, grads: list[torch.Tensor], group, fn: str) -> None:
    """A ShardedGradScaler agrees found_inf over ``scaler_group``; the clip agrees it over its own
    group (DTensor meshes or ``group=``), which must contain those ranks."""
    group = check_group(group, fn)
    if group is None and not has_dtensors(grads):
        raise ValueError(
            f"{fn}: a ShardedGradScaler needs found_inf to agree across ranks, and these gradients are plain "
            "local tensors: pass group= (the ranks the gradients are spread over)"
        )
    ranks = set(layout_of(grads, group, (), fn).ranks)
    missing = sorted(set(group_ranks(scaler_group if scaler_group is not None else dist.group.WORLD)) - ranks)
    if missing:
        raise ValueError(
            f"{fn}: the ShardedGradScaler's process_group includes ranks {missing}, outside the clip's group "
            f"{sorted(ranks)}; pass group= covering them so that found_inf agrees there too"
        )


def excluded_indices(items: list, exclude, fn: str) -> tuple[int, ...]:
    """Indices into ``items`` (the parameters whose gradients are clipped, or the tensors, in order)
    of those named by ``exclude_from_norm`` (the item itself or its gradient, by identity)."""
    if exclude is None:
        return ()
    if isinstance(exclude, torch.Tensor):
        exclude = [exclude]
    ids = set()
    for j, t in enumerate(exclude):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: exclude_from_norm[{j}] is of type {type(t).__name__}, not a torch.Tensor")
        ids.add(id(t))
    return tuple(i for i, t in enumerate(items) if id(t) in ids or id(getattr(t, "grad", None)) in ids)

"""`AdapterStore`: which adapters are resident in a `FusedLoraModel`'s slots, LRU-evicted.

The catalog (`{name: adapter dir}`) can name far more adapters than there are slots; `ensure`
makes one batch's adapters resident just before it runs, loading on demand and evicting the
least recently used adapters that this batch does not need (vLLM `AdapterLRUCache`, Ray Serve
multiplexing).

Atomicity: the store is not thread-safe and does not lock. A caller that serves concurrent
requests must hold one lock across `ensure(names)` + `generate(...)` for a batch (otherwise
another batch's `ensure` could evict a slot between the two), and call `swap_catalog` only
between batches, under the same lock. Ray Serve's `@serve.batch` running one batch at a time on
a replica satisfies this with an `asyncio.Lock` (or a `threading.Lock` for sync handlers).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path

from routing.lora.model import FusedLoraModel


class CapacityError(RuntimeError):
    """One batch needs more distinct adapters than the model has slots."""


class AdapterStore:
    """LRU cache of resident adapters on top of `fused`; capacity = `fused.max_loras`.

    Residency is keyed on (name, path): a catalog swap that points a name at a new directory
    evicts the old weights. Adapters loaded into `fused` behind the store's back are not tracked;
    let the store own the slots.
    """

    def __init__(self, fused: FusedLoraModel, paths: Mapping[str, str | Path]):
        self.fused = fused
        self.capacity = fused.max_loras
        self._paths: dict[str, Path] = {k: Path(v) for k, v in paths.items()}
        self._resident: OrderedDict[str, Path] = OrderedDict()  # least recently used first
        self.loads = self.evictions = 0

    @property
    def paths(self) -> dict[str, Path]:
        return dict(self._paths)

    @property
    def resident(self) -> list[str]:
        """Resident adapter names, least recently used first."""
        return list(self._resident)

    def __contains__(self, name: str) -> bool:
        return name in self._resident

    def ensure(self, names: Iterable[str]) -> None:
        """Make every adapter in `names` resident and mark them most recently used.

        Missing ones are loaded from the catalog; when slots run out, the least recently used
        resident adapters outside `names` are evicted. Raises `KeyError` for a name not in the
        catalog and `CapacityError` when `names` has more distinct adapters than slots, both before
        changing anything. `AdapterLoadError` from a bad adapter directory propagates; the
        adapters made resident before it stay resident.
        """
        needed = list(dict.fromkeys(names))
        unknown = [n for n in needed if n not in self._paths]
        if unknown:
            raise KeyError(f"adapters not in the catalog: {unknown}")
        if len(needed) > self.capacity:
            raise CapacityError(f"batch needs {len(needed)} distinct adapters but there are only "
                                f"{self.capacity} slots (max_loras); split the batch")
        for name in needed:
            if name in self._resident:
                self._resident.move_to_end(name)
        for name in needed:
            if name in self._resident:
                continue
            while len(self._resident) >= self.capacity:
                victim = next(n for n in self._resident if n not in needed)
                self._evict(victim)
            self.fused.load_adapter(name, self._paths[name])
            self._resident[name] = self._paths[name]
            self.loads += 1

    def swap_catalog(self, new_paths: Mapping[str, str | Path]) -> None:
        """Replace the catalog; resident adapters dropped from it, or whose path changed, are evicted.

        Call between batches (see the module docstring). New adapters load lazily on `ensure`.
        """
        new = {k: Path(v) for k, v in new_paths.items()}
        for name, path in list(self._resident.items()):
            if new.get(name) != path:
                self._evict(name)
        self._paths = new

    def _evict(self, name: str) -> None:
        self.fused.unload_adapter(name)
        del self._resident[name]
        self.evictions += 1

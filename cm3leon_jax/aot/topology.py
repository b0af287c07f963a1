"""TPU pod names (`v5e-16`, `v5p-128`, `2xv6e-256`) -> compile-only device descriptions.

`jax.experimental.topologies` asks libtpu (the `tpu` extra) for the devices of a slice
that is not attached, so the real train step can be compiled for it on any machine. Names
follow Cloud TPU: v4 and v5p count TensorCores (two per chip), v5e and v6e count chips.
Slice shapes are the standard ones (the table MaxText's `accelerator_to_spec_map.py` and
Cloud TPU's docs list); only power-of-two slices are supported.
"""

from __future__ import annotations

import dataclasses
import re

from jax.experimental import topologies

from cm3leon_jax.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Chip:
    generation: str  # user-facing name prefix
    libtpu_name: str  # prefix of libtpu's topology name ("v5:2x2x1" is a v5p slice)
    chip_config: str  # "megacore": one JAX device per chip over its two TensorCores
    cores_in_name: int  # TensorCores per chip counted by the slice name
    dims: int  # torus dimensions
    hbm_bytes: int  # datasheet HBM per chip
    peak_tflops: float  # dense bf16 per chip (datasheet)
    max_chips: int  # largest slice


GiB = 2**30
CHIPS = {c.generation: c for c in (
    Chip("v4", "v4", "megacore", 2, 3, 32 * GiB, 275.0, 4096),
    Chip("v5p", "v5", "megacore", 2, 3, 95 * GiB, 459.0, 4096),
    Chip("v5e", "v5e", "default", 1, 2, 16 * GiB, 197.0, 256),
    Chip("v6e", "v6e", "default", 1, 2, 32 * GiB, 918.0, 256),
)}
_NAME = re.compile(r"^(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Topology:
    name: str
    chip: Chip
    grid: tuple[int, ...]  # chips along each torus dimension of one slice
    num_slices: int

    @property
    def chips_per_slice(self) -> int:
        n = 1
        for g in self.grid:
            n *= g
        return n

    @property
    def num_chips(self) -> int:
        return self.chips_per_slice * self.num_slices

    @property
    def libtpu_topology(self) -> str:
        return f"{self.chip.libtpu_name}:{'x'.join(map(str, self.grid))}"

    def devices(self) -> list:
        """One compile-only JAX device per chip (slice-major when several slices)."""
        host = (2, 2, 1) if self.chips_per_slice >= 4 else (1, 1, 1)
        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=self.libtpu_topology,
            chip_config_name=self.chip.chip_config, chips_per_host_bounds=host,
            num_slices=self.num_slices)
        return list(desc.devices)


def slice_grid(chips: int, dims: int) -> tuple[int, ...]:
    """The standard torus shape of a power-of-two slice: 2x2 -> 2x4 -> 4x4 -> ... and
    2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> ..."""
    if dims == 2:
        grid = [2, 2]
        while grid[0] * grid[1] < chips:
            grid[1 if grid[0] == grid[1] else 0] *= 2
        return tuple(grid)
    if chips == 4:
        return (2, 2, 1)
    grid = [2, 2, 2]
    while grid[0] * grid[1] * grid[2] < chips:
        grid[2 if grid[0] == grid[1] == grid[2] else 1 if grid[1] == grid[0] else 0] *= 2
    return tuple(grid)


def parse_topology(name: str) -> Topology:
    """`v5e-16` / `2xv5p-128` -> Topology, or a ConfigError that lists what is accepted."""
    m = _NAME.match(name.strip().lower())
    known = ", ".join(CHIPS)
    if not m:
        raise ConfigError(f"--topology {name!r}: expected GENERATION-SIZE or NxGENERATION-SIZE "
                          f"with GENERATION one of {known} (e.g. v5e-16, v5p-128, 2xv5p-128)")
    slices = int(m.group(1) or 1)
    chip = CHIPS[m.group(2)]
    size = int(m.group(3))
    chips, rest = divmod(size, chip.cores_in_name)
    unit = "TensorCores (2 per chip)" if chip.cores_in_name == 2 else "chips"
    if rest or chips < 4 or chips > chip.max_chips or chips & (chips - 1) or slices < 1:
        smallest, largest = 4 * chip.cores_in_name, chip.max_chips * chip.cores_in_name
        raise ConfigError(
            f"--topology {name!r}: {chip.generation} slice sizes count {unit} and must be a "
            f"power of two from {chip.generation}-{smallest} to {chip.generation}-{largest}")
    return Topology(name, chip, slice_grid(chips, chip.dims), slices)

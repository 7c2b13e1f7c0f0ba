"""The devices workers can run on: those `[[device]]` in llmos.toml declares, else this host's.

A declared list plans a cluster from one machine (and makes tests independent of the hardware):

    [[device]]
    name = "cuda:0"        # what a worker's --device gets
    kind = "cuda"          # "cpu" or "cuda"
    memory_mb = 81920      # what models may use of it
    host = "gpu-node-1"    # optional; default this host

Discovery: the CPU with the RAM /proc/meminfo (or psutil) reports, and each CUDA device torch
sees (torch.cuda.mem_get_info), when torch is installed and a GPU is present.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from llmos.errors import ConfigError
from llmos.settings import Settings

DeviceKind = Literal["cpu", "cuda"]
KINDS = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class Device:
    """One device: its name (a worker's --device), kind, total and free memory (MiB), host.

    `max_workers`: most workers the planner puts on it (a CPU: its cores; None: memory decides).
    """

    name: str
    kind: DeviceKind
    total_mb: float
    free_mb: float
    host: str
    max_workers: int | None = None

    @property
    def key(self) -> tuple[str, str]:
        """(host, name): unique across a cluster (every host has a "cpu")."""
        return (self.host, self.name)

    @property
    def ref(self) -> str:
        """"host/name": how a plan names a device across hosts."""
        return f"{self.host}/{self.name}"


def config_path(settings: Settings) -> Path | None:
    """LLMOS_CONFIG, else ./llmos.toml, when it is a file."""
    path = settings.config or (Path.cwd() / "llmos.toml")
    return path if path.is_file() else None


def devices(settings: Settings) -> list[Device]:
    """The `[[device]]` entries of llmos.toml when it has any, else this host's devices."""
    path = config_path(settings)
    if path is not None:
        declared = read_devices(path)
        if declared:
            return declared
    return discover()


def read_devices(path: Path) -> list[Device]:
    """The `[[device]]` entries of a TOML file (a clear ConfigError for a bad one)."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    entries = data.get("device", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: `device` must be an array of tables ([[device]])")
    out = [parse_device(entry, f"{path}: [[device]] #{i + 1}") for i, entry in enumerate(entries)]
    seen: set[tuple[str, str]] = set()
    for d in out:
        if d.key in seen:
            raise ConfigError(f"{path}: device {d.name!r} is declared twice on host {d.host!r}")
        seen.add(d.key)
    return out


def parse_device(entry: Any, where: str) -> Device:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(entry) - {"name", "kind", "memory_mb", "free_mb", "host", "max_workers"}
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: name, kind, memory_mb, "
                          "free_mb, host, max_workers")
    name = entry.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{where}: `name` must be a non-empty string, e.g. \"cuda:0\"")
    kind = entry.get("kind", "cuda" if name.startswith("cuda") else "cpu")
    if kind not in KINDS:
        raise ConfigError(f"{where} ({name}): `kind` must be \"cpu\" or \"cuda\", not {kind!r}")
    memory = entry.get("memory_mb")
    if isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0:
        raise ConfigError(f"{where} ({name}): `memory_mb` must be a positive number of MiB, not {memory!r}")
    free = entry.get("free_mb", memory)
    if isinstance(free, bool) or not isinstance(free, (int, float)) or not 0 <= free <= memory:
        raise ConfigError(f"{where} ({name}): `free_mb` must be a number between 0 and memory_mb")
    host = entry.get("host", this_host())
    if not isinstance(host, str) or not host:
        raise ConfigError(f"{where} ({name}): `host` must be a non-empty string")
    slots = entry.get("max_workers")
    if slots is not None and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise ConfigError(f"{where} ({name}): `max_workers` must be a positive integer")
    return Device(name=name, kind=kind, total_mb=float(memory), free_mb=float(free), host=host,
                  max_workers=slots)


def this_host() -> str:
    return socket.gethostname()


def discover() -> list[Device]:
    """This host's CPU (RAM) and CUDA devices (torch, only when it is already importable)."""
    host = this_host()
    total, free = _ram_mb()
    found = [Device(name="cpu", kind="cpu", total_mb=total, free_mb=free, host=host,
                    max_workers=os.cpu_count() or 1)]
    found.extend(_cuda_devices(host))
    return found


def _ram_mb() -> tuple[float, float]:
    """(total, available) RAM in MiB."""
    try:
        import psutil  # type: ignore[import-not-found]

        vm = psutil.virtual_memory()
        return vm.total / 2**20, vm.available / 2**20
    except ImportError:
        pass
    try:
        info: dict[str, float] = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            info[key] = float(rest.split()[0]) / 1024  # kB → MiB
        return info["MemTotal"], info.get("MemAvailable", info.get("MemFree", 0.0))
    except (OSError, KeyError, ValueError, IndexError):
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size / 2**20, pages * size / 2**20


def _cuda_devices(host: str) -> list[Device]:
    try:
        import torch
    except ImportError:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            out.append(Device(name=f"cuda:{i}", kind="cuda", total_mb=total / 2**20,
                              free_mb=free / 2**20, host=host))
        return out
    except Exception:  # a driver that answers is_available but fails mem_get_info: no GPU for us
        return []

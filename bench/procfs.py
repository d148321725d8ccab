"""Process memory figures the benchmarks read from Linux's /proc (sizes in bytes)."""

from __future__ import annotations

from pathlib import Path


def _field_bytes(path: str, field: str) -> int:
    for line in Path(path).read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # the kernel writes these in kB
    raise KeyError(f"no {field} in {path} (Linux only)")


def status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of /proc/PID/status: VmRSS (resident now) or VmHWM (peak resident)."""
    return _field_bytes(f"/proc/{pid}/status", field)


def reset_peak(pid: int | str = "self") -> None:
    """Reset VmHWM to the current RSS (write 5 to clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def machine_memory_bytes() -> int:
    """MemTotal of /proc/meminfo."""
    return _field_bytes("/proc/meminfo", "MemTotal")

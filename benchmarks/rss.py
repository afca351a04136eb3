"""The process's resident-memory high-water mark (Linux /proc), resettable so that one call's peak can be read."""


def reset_rss_peak():
    """Set the high-water mark to the current resident size (where /proc allows)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")          # resets VmHWM to the current RSS (Linux)
    except OSError:
        pass


def rss_peak(key: str = "VmHWM") -> int | None:
    """Bytes of /proc/self/status `key` (VmHWM: peak resident, VmRSS: now); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None

"""These tests run in launch-only mode only (`FURA_LAUNCH_ONLY=1`, read when fura_kernels is
imported, so in a process of their own): `tests/test_launch_only_mode.py` starts that process."""

from fura_kernels.triton import launch_only

if not launch_only.ENABLED:
    collect_ignore_glob = ["test_*.py"]

"""Kernel backends of the SINQ linear op (docs/design.md §4)."""

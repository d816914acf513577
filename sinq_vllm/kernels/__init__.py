"""Kernel backends of the SINQ linear op (DESIGN.md §4)."""

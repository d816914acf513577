"""The on-disk SINQ format of the reference implementation (see docs/format.md §2)."""

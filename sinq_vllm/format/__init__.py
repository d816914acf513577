"""The on-disk SINQ format of the reference implementation (see sinq-format.md §2)."""

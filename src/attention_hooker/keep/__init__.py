"""Keepers: where captured calls go (memory, disk, reductions), the storage policy, the allocator."""

"""Training over a device mesh: the mesh and its sharding rules, placing arrays onto it, multi-process start-up."""

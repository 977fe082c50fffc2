"""The defenses practitioners use today, each in its own module, registered by name (see benchmark.registry)."""

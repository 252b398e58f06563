"""--metrics: counters the workers keep in shared memory, served by the master."""

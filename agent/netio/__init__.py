"""I/O helpers the node, the relay and the coordinator share (none of them imports another)."""

"""The local provider: jobs on a Redis stream, taken by ``gengui worker`` processes."""

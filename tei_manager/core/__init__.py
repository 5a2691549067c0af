"""The manager's pure core: registry, port allocation, log slicing, restart policy.

Nothing here imports Trio or does I/O of its own (the port probe and the log
reader are the two explicit, injectable exceptions); the Trio layer drives it.
"""

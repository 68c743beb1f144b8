"""The RESP transport under the Redis bucket store: one pipelined connection per Redis node,
and the three ways of finding the nodes (one server, Sentinel, Cluster).

    resp.py       framing: commands as bytes, replies parsed by hiredis; one-off queries
    node.py       one node: connection, reply FIFO, coalescing, deadlines, reconnect, NOSCRIPT
    topology.py   standalone, Sentinel (master discovery) and Cluster (slot map, MOVED/ASK)

Why hand-written and not redis-py: measured side by side (loadtests/redis_client_cpu.py), its
pipeline cost 2-3x the client CPU per decision of this transport, at 1 and at 64 in flight.
"""

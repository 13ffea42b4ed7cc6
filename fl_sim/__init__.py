"""Simulate a federation of many virtual hospitals on Ray (``python -m fl_sim``).

The simulation calls the daemons' own code for everything a round computes: the
client's trainer and privacy ledger, the server's strategies, selection, task seeds,
quorum and metric averaging, and the task's partitioner. Only the transport differs:
updates travel through Ray's object store instead of sealed gRPC streams.
"""

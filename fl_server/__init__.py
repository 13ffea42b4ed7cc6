"""The federated learning server: coordinator, aggregator, rounds, identity and trust."""

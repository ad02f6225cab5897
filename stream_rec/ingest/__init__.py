"""Kafka in and out: client construction, topics, micro-batches, dead letters."""

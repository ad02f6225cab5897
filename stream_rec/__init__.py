"""stream-rec: recommendations that track fresh data.

Click events arrive on Kafka; workers learn from them in micro-batches and
publish versioned snapshots; serving readers hot-swap them and answer top-K.
"""

__version__ = "0.1.0"

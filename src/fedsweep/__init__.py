"""fedsweep: federated fine-tuning sweeps of Transformer text classifiers.

The package holds every computation of the pipeline (data, shards, models, the FedAvg
engine, metrics, figures); the Snakemake workflow only calls the ``fedsweep`` CLI.
"""

__version__ = "0.1.0"


class FedsweepError(Exception):
    """A bad input or state, reported to the user as one line naming the field and value."""


__all__ = ["FedsweepError", "__version__"]

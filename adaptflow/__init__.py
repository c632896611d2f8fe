"""adaptflow: build domain-specialised language models as a tracked, multi-stage workflow.

The engine (this package) computes; `flows/` and `tasks/` orchestrate it with Prefect.
"""

__version__ = "0.1.0"

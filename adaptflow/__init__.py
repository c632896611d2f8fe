"""adaptflow: build domain-specialised language models as a tracked, multi-stage workflow.

The engine (this package) computes; `adaptflow.flows` and `adaptflow.tasks` (the `flows/` and `tasks/` folders)
orchestrate it with Prefect. DESIGN.md says where everything lives.
"""

__version__ = "0.2.0"

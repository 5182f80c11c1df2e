"""The stage protocol every stage implements (``Stage``, ``register_stage``) and the contexts the
runner hands it (``RunContext``, ``ValidationContext``, ``Artifact``, ``LedgerRow``).

This package sits below every stage package and knows none of them; the runner in
``edgekd.pipeline`` sits above them all (see the layers contract in pyproject.toml).
"""

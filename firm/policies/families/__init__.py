"""Model families of the flow policy: one file each, registered in :data:`firm.registry.FAMILIES`.

:mod:`~firm.policies.families.base` says what a family implements; docs/models.md shows how to add one and which
parity test to copy.
"""

"""Bridges to other libraries' tools (each an optional extra): ``quantus`` runs Quantus's metrics on
our projections."""

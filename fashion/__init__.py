"""The `fashion` command and the torch-free pieces every stage shares (preprocessing contract, label
schema, the ``UserError`` base class)."""

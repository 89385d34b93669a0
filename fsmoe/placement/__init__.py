"""Where each expert lives: ``Placement`` (logical expert -> physical (rank, slot)) and moving
experts between ranks (``migrate``) with their weights and optimizer state."""

"""modelpeerd: the node daemon."""

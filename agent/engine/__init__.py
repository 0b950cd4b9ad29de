"""Sans-I/O engines above the protocol cores: which path each peer's packets take."""

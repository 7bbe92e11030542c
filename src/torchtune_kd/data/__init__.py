"""Real-text preparation from files that ship with Python and registry packages."""

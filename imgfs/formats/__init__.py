"""Format drivers, one module (or package) each; each registers itself at the bottom."""

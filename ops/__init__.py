"""The op vocabulary (leaf: imports only torch)."""

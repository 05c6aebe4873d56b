"""tbo_compiler.runtime."""

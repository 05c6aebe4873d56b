"""tbo_compiler.passes."""

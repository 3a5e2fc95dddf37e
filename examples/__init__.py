"""Small example models that piperc compiles: each module exposes `make(**overrides)`."""

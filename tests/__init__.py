"""The test suite; importing the package first runs its quiet start (TensorFlow's native log
lines off) before any test module imports TensorFlow itself."""

import experiments  # noqa: F401

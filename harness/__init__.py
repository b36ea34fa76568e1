from harness import quiet  # noqa: F401, I001  (narrow filters for third-party messages, first)
from harness import exiting  # noqa: F401  (no final garbage collection at exit)

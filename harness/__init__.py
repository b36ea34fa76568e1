from harness import quiet  # noqa: F401  (narrow filters for third-party messages, first)
